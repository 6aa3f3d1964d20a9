"""The Qwen compat layer over ``flash_attention_2``: transformers sees the flash name, numerics equal sdpa.

There is no flash_attn package on CPU, so the tests stand in for it, and only inside the tests:
a function registered under ``flash_attention_2`` records the implementation name it reads from
``module.config._attn_implementation`` (the real flash function loads its kernels by that name)
and computes plain attention with transformers' sdpa function; and the model's
``_check_and_adjust_attn_implementation`` (where transformers refuses flash without flash_attn,
and loads its kernels by name) is patched on the instance to record the flash names it is asked
about and accept them. Other names go through the real check.
"""

import copy
import types

import pytest
import torch
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.utils.generic import is_flash_attention_requested

from monkeytune.model.qwen_compat import CompatConfig, apply_compat, get_compat
from monkeytune.train.setup import select_attention

SEQ_LENGTH = 8
PROMPT = 20  # > SEQ_LENGTH: NTK alpha 7 and log-n on the queries past position 8


@pytest.fixture
def flash(monkeypatch):
    """The stand-in flash attention; ``allow(llm)`` lets that model select it. Restored afterwards."""
    seen = types.SimpleNamespace(by_kernel=[], by_check=[], kwargs=[])

    def stand_in(module, query, key, value, attention_mask, **kwargs):
        seen.by_kernel.append(module.config._attn_implementation)
        seen.kwargs.append(set(kwargs))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def allow(llm):
        real_check = llm._check_and_adjust_attn_implementation

        def check(implementation, *args, **kwargs):
            if is_flash_attention_requested(requested_attention_implementation=implementation):
                seen.by_check.append(implementation)
                return implementation
            return real_check(implementation, *args, **kwargs)

        monkeypatch.setattr(llm, "_check_and_adjust_attn_implementation", check)
        return llm

    previous = AttentionInterface()["flash_attention_2"]
    AttentionInterface.register("flash_attention_2", stand_in)
    seen.allow = allow
    yield seen
    AttentionInterface.register("flash_attention_2", previous)


def tiny_llm(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


def compat_pair(flash):
    """The same weights with the compat layer over sdpa and over the stand-in flash attention."""
    on_sdpa = apply_compat(tiny_llm(), CompatConfig(seq_length=SEQ_LENGTH))
    on_flash = flash.allow(copy.deepcopy(on_sdpa))
    select_attention(types.SimpleNamespace(llm=on_flash), "flash_attention_2")
    return on_sdpa, on_flash


def logits(llm, ids, **kwargs):
    with torch.no_grad():
        return llm(ids, **kwargs).logits


def test_flash_attention_2_reaches_transformers_under_its_own_name(flash):
    on_sdpa, on_flash = compat_pair(flash)
    assert on_sdpa.config._attn_implementation == "monkeytune_qwen_sdpa"
    assert get_compat(on_flash) == CompatConfig(seq_length=SEQ_LENGTH)
    # Transformers checked and loaded kernels only for "flash_attention_2", and still treats the
    # model as flash (generation, chunked masks, packed-sequence lengths key on the name).
    assert flash.by_check == ["flash_attention_2"]
    assert is_flash_attention_requested(on_flash.config)
    logits(on_flash, torch.arange(PROMPT)[None] % 97)
    assert flash.by_kernel == ["flash_attention_2"] * 2  # one per layer, each seeing the exact name


def test_compat_on_flash_equals_compat_on_sdpa_with_logn(flash):
    on_sdpa, on_flash = compat_pair(flash)
    ids = torch.randint(0, 97, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    expected = logits(on_sdpa, ids)
    torch.testing.assert_close(logits(on_flash, ids), expected, atol=1e-5, rtol=0)
    # log-n is really in play at this length: without it the logits move.
    on_sdpa.config.qwen_compat = {**on_sdpa.config.qwen_compat, "use_logn_attn": False}
    assert (logits(on_sdpa, ids) - expected).abs().max() > 1e-3
    # Training mode: log-n off on both, and the padding-free (varlen) arguments reach the flash function.
    on_sdpa.config.qwen_compat = {**on_sdpa.config.qwen_compat, "use_logn_attn": True}
    on_sdpa.train(), on_flash.train()
    torch.testing.assert_close(logits(on_flash, ids), logits(on_sdpa, ids), atol=1e-5, rtol=0)
    lens = torch.tensor([0, PROMPT], dtype=torch.int32)
    logits(on_flash, ids[:1], position_ids=torch.arange(PROMPT)[None], cu_seq_lens_q=lens, cu_seq_lens_k=lens,
           max_length_q=PROMPT, max_length_k=PROMPT)
    assert {"cu_seq_lens_q", "cu_seq_lens_k"} <= flash.kwargs[-1]
    assert set(flash.by_kernel) == {"flash_attention_2"}
