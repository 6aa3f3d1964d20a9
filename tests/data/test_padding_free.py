"""Padding-free packed batches (flash_attention_2's varlen contract), checked on CPU.

flash_attn cannot run here (no GPU). What is checked instead: the batch carries exactly what
transformers' flash-attention path reads (position ids restarting at 0, ``cu_seq_lens_*`` equal
to what transformers derives from them, ``max_length_*``), the model hands those arguments to
the attention function, and attention confined by them (an SDPA-per-sample implementation
registered through transformers' ``AttentionInterface``, SDPA with the block-diagonal mask, and
SDPA finding the samples from the position ids) gives every sample the logits it has alone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from monkeytune.config import get_config
from monkeytune.data.collate import Collator, model_inputs, pack_items, packed_attention_mask
from monkeytune.model import build_model

X = -100


def sample(cfg, text: int, image: bool, seed: int, sid: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 900, (text,), generator=g)
    views = cfg.image.num_views if image else 0
    if image:
        img = torch.cat([torch.tensor([cfg.image_start_id]), torch.full((cfg.tokens_per_image,), cfg.image_pad_id),
                         torch.tensor([cfg.image_end_id])])
        ids = torch.cat([ids[:2], img, ids[2:]])
    labels = ids.clone()
    labels[: len(ids) // 2] = X
    slots = torch.tensor(list(range(cfg.image.num_windows)) + [-1])[:views]
    return {"input_ids": ids, "labels": labels, "num_images": int(image), "id": sid,
            "pixel_values": torch.randn(views, 3, cfg.image.window_size, cfg.image.window_size, generator=g),
            "view_slots": slots}


@pytest.fixture(scope="module")
def tiny_eval():
    torch.manual_seed(0)
    return build_model(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def items(tiny_eval):
    cfg = tiny_eval.config
    return [sample(cfg, 9, True, 1, "a"), sample(cfg, 14, False, 2, "b"), sample(cfg, 6, True, 3, "c"),
            sample(cfg, 11, False, 4, "d")]


def test_flattened_batch_layout(items):
    rows = [pack_items(items[:2]), pack_items(items[2:])]
    flat = Collator(pad_id=0, padding_free=True)(rows)
    lens = [len(it["input_ids"]) for it in items]
    total = sum(lens)
    assert flat["input_ids"].shape == flat["labels"].shape == flat["position_ids"].shape == (1, total)
    assert "attention_mask" not in flat  # no padding, so nothing to mask
    assert flat["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    starts = [0, lens[0], lens[0] + lens[1], lens[0] + lens[1] + lens[2]]
    assert flat["cu_seq_lens_q"].tolist() == flat["cu_seq_lens_k"].tolist() == [*starts, total]
    assert flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == flat["max_length_k"] == max(lens)
    # What transformers' flash path would derive from the position ids alone agrees.
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert torch.equal(cu_q, flat["cu_seq_lens_q"]) and int(max_q) == max(lens)
    assert all(flat["labels"][0, s] == X for s in starts)  # no target crosses a boundary
    assert flat["seq_lens"].tolist() == [lens] and flat["num_samples"] == 4 and flat["ids"] == ["a", "b", "c", "d"]
    padded = Collator(pad_id=0)(rows)
    assert torch.equal(flat["pixel_values"], padded["pixel_values"]) and torch.equal(flat["view_slots"], padded["view_slots"])
    assert set(model_inputs(flat)) >= {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    # Plain samples flatten the same way, one sequence each.
    plain = Collator(pad_id=0, padding_free=True)(items)
    assert torch.equal(plain["input_ids"], flat["input_ids"]) and torch.equal(plain["cu_seq_lens_q"], flat["cu_seq_lens_q"])


def _alone(model, it) -> torch.Tensor:
    batch = Collator(pad_id=0)([it])
    with torch.no_grad():
        return model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits[0]


def _varlen_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each ``cu_seq_lens_q`` segment, as ``flash_attn_varlen_func`` computes it.

    Shapes: query/key/value ``[1, heads, T, head_dim]``; returns ``[1, T, heads, head_dim]``.
    """
    cu = kwargs["cu_seq_lens_q"]
    assert attention_mask is None and torch.equal(cu, kwargs["cu_seq_lens_k"]) and kwargs["max_length_q"] > 0
    _varlen_sdpa.calls += 1
    out = torch.empty_like(query)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out[:, :, s:e] = F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                        is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_varlen_sdpa.calls = 0


def test_every_sample_sees_only_itself(tiny_eval, items):
    model = tiny_eval
    rows = [pack_items(items[:2]), pack_items(items[2:])]
    flat = Collator(pad_id=0, padding_free=True)(rows)
    cu = flat["cu_seq_lens_q"].tolist()
    alone = [_alone(model, it) for it in items]

    def per_sample(logits):
        return [logits[0, s:e] for s, e in zip(cu[:-1], cu[1:])]

    inputs = {k: v for k, v in model_inputs(flat).items() if k != "labels"}
    with torch.no_grad():
        # SDPA finds the samples from the restarting position ids (B = 1) and ignores cu_seq_lens.
        by_positions = model(**inputs).logits
        # SDPA with the explicit block-diagonal causal mask.
        mask = packed_attention_mask(flat["seq_lens"], flat["input_ids"].shape[1])
        by_mask = model(**{k: v for k, v in inputs.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k",
                                                                        "max_length_q", "max_length_k")},
                        attention_mask=mask).logits
        # An attention implementation that reads only cu_seq_lens, like flash_attention_2's varlen path.
        AttentionInterface.register("test_varlen_sdpa", _varlen_sdpa)
        AttentionMaskInterface.register("test_varlen_sdpa", AttentionMaskInterface()["flash_attention_2"])
        model.llm.set_attn_implementation("test_varlen_sdpa")
        try:
            by_cu = model(**inputs).logits
        finally:
            model.llm.set_attn_implementation("sdpa")
    assert _varlen_sdpa.calls == model.config.llm.num_layers
    for logits in (by_positions, by_mask, by_cu):
        for got, want in zip(per_sample(logits), alone):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    # The padded packed rows (today's SDPA batches) and the flattened row give the same loss.
    padded = Collator(pad_id=0)(rows)
    with torch.no_grad():
        a = model(**model_inputs(padded)).loss_sum
        b = model(**model_inputs(flat)).loss_sum
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
