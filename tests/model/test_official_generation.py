"""Generation from official checkpoints, proven equal three ways.

KV-cached ``generate`` = greedy recomputation without a cache = the official reference (this
folder's conftest), for single prompts, left-padded batches and prompts longer than
``seq_length`` (dynamic NTK alpha > 1 and log-n active), in float32 and bfloat16. These are the
tests that name an upstream break: the CI job against the newest transformers runs this file.
"""

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from monkeytune.cli import main
from monkeytune.generate import cut_at_stop, load_views, prompt_ids, stop_ids
from monkeytune.model.io import load_model
from monkeytune.model.qwen_compat import ATTENTION_PREFIX, QwenRotaryEmbedding, get_compat, ntk_alpha

PAD = 0


def batch(rows):
    """Left-pad ``(ids, views)`` rows into ``input_ids``, ``attention_mask``, views and slots."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r, _ in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _ in rows])
    views = [v for _, v in rows if v is not None]
    pixel_values = torch.cat(views) if views else None
    slots = torch.tensor([0, 1, 2, 3, -1] * len(views)) if views else None
    return ids, mask, pixel_values, slots


def recompute_greedy(model, ids, mask, pixel_values, slots, steps, seq_length):
    """Greedy decoding by a full forward per step, no cache, with the prompt's NTK alpha held."""
    rotary = model.llm.model.rotary_emb
    rotary.pinned_alpha = ntk_alpha(ids.shape[1], seq_length)
    try:
        out = []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(ids, attention_mask=mask, pixel_values=pixel_values, view_slots=slots).logits
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(out, dim=1)
    finally:
        rotary.pinned_alpha = None


def cached_greedy(model, ids, mask, pixel_values, slots, steps):
    return model.generate(ids, attention_mask=mask, pixel_values=pixel_values, view_slots=slots,
                          max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=PAD)


def three_ways(off, model, cfg, sd, rows, steps):
    ids, mask, pixel_values, slots = batch(rows)
    cached = cached_greedy(model, ids, mask, pixel_values, slots, steps)
    recomputed = recompute_greedy(model, ids, mask, pixel_values, slots, steps, cfg["seq_length"])
    reference = off.ref_greedy(sd, cfg, rows, steps, pad_id=PAD)
    return cached, recomputed, reference


def test_compat_uses_public_extension_points(monkey_ckpt):
    model, _ = load_model(monkey_ckpt[0])
    assert all(type(layer.self_attn) is Qwen2Attention for layer in model.llm.model.layers)
    assert isinstance(model.llm.model.rotary_emb, QwenRotaryEmbedding)
    assert model.llm.config._attn_implementation == ATTENTION_PREFIX + "sdpa"
    assert get_compat(model).seq_length == 23
    assert not model.llm.model._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.llm.modules())


def test_single_long_prompt_three_ways(off, monkey_ckpt):
    """seq_length is 23: the 89-token prompt gets alpha 7, kept past 92 tokens where a fresh prompt gets 15."""
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder)
    ids = off.prompt_with_image(cfg)
    assert len(ids) == 89 and ntk_alpha(89, 23) == 7 and ntk_alpha(89 + 6, 23) == 15
    views = off.random_views(5, seed=3)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixel_values=views, view_slots=torch.tensor([0, 1, 2, 3, -1])).logits
    torch.testing.assert_close(ours, off.ref_logits(sd, cfg, off.ref_embeds(sd, cfg, ids, views), 7.0), atol=1e-4, rtol=0)
    cached, recomputed, reference = three_ways(off, model, cfg, sd, [(ids, views)], 8)
    assert cached.tolist() == recomputed.tolist() == reference.tolist()


@pytest.mark.parametrize("seq_length", [23, 2048], ids=["ntk-and-logn", "short"])
def test_left_padded_batch_three_ways(off, tmp_path, seq_length):
    """Rows of 89, 30 (text only) and 96 tokens; with seq_length 23 the batch runs at alpha 7."""
    cfg = off.official_config("monkey", seq_length=seq_length)
    sd = off.official_state(cfg)
    model, _ = load_model(off.write_official(tmp_path, cfg, sd))
    text = torch.randint(0, off.NUM_RANKS, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    rows = [
        (off.prompt_with_image(cfg, seed=1), off.random_views(5, seed=1)),
        (text, None),
        (off.prompt_with_image(cfg, n_text_before=5, n_text_after=9, seed=2), off.random_views(5, seed=2)),
    ]
    ids, mask, pixel_values, slots = batch(rows)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, pixel_values=pixel_values, view_slots=slots).logits
    x = torch.cat([off.ref_embeds(sd, cfg, row.tolist(), v) for row, (_, v) in zip(ids, rows)])
    ref = off.ref_logits(sd, cfg, x, ntk_alpha(ids.shape[1], seq_length), mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)
    cached, recomputed, reference = three_ways(off, model, cfg, sd, rows, 6)
    assert cached.tolist() == recomputed.tolist() == reference.tolist()


def test_bfloat16_rotary_in_float32_and_generation(off, tmp_path, monkey_ckpt):
    """bf16 weights: the rotary tables stay float32 (q and k are rotated in float32 and rounded
    back, as the official code does), logits stay within bf16 noise of the reference, and the
    cached generation equals the recomputation."""
    folder, cfg, sd = monkey_ckpt
    model, _ = load_model(folder, dtype=torch.bfloat16)
    ids = off.prompt_with_image(cfg)
    views = off.random_views(5, seed=3).to(torch.bfloat16)
    slots = torch.tensor([0, 1, 2, 3, -1])
    cos, sin = model.llm.model.rotary_emb(torch.zeros(1, dtype=torch.bfloat16), torch.arange(4)[None])
    assert cos.dtype == sin.dtype == torch.float32
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixel_values=views, view_slots=slots).logits
    assert ours.dtype == torch.bfloat16
    sd16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
    embeds = off.ref_embeds(sd, cfg, ids, views.float())  # the vision reference runs in float32
    ref16 = off.ref_logits(sd16, cfg, embeds.to(torch.bfloat16), 7.0)
    ref32 = off.ref_logits(sd, cfg, embeds, 7.0)
    spread = ref32.std().item()
    assert (ours.float() - ref16.float()).abs().max().item() < 0.1 * spread
    assert (ours.float() - ref32).abs().max().item() < 0.1 * spread
    batch_ids, mask, _, _ = batch([(ids, views)])
    cached = cached_greedy(model, batch_ids, mask, views, slots, 6)
    recomputed = recompute_greedy(model, batch_ids, mask, views, slots, 6, cfg["seq_length"])
    assert cached.tolist() == recomputed.tolist()


def test_chat_raw_reproduces_official_greedy_tokens(off, tmp_path, monkey_ckpt, capsys):
    """`monkeytune chat --raw` on an official-layout folder: a long prompt (alpha 7, log-n on)."""
    from PIL import Image

    cfg = off.official_config("monkey", seq_length=23)
    _, tok = load_model(monkey_ckpt[0])
    cfg["vocab_size"] = tok.vocab_size  # no padded embedding rows: every greedy id decodes
    sd = off.official_state(cfg)
    folder = off.write_official(tmp_path / "ckpt", cfg, sd)
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 90)).save(image)
    question = "the cat at the hat " * 4
    model, tok = load_model(folder)
    ids, paths = prompt_ids("raw", tok, model.config.tokens_per_image, question, str(image))
    pixel_values, _ = load_views(model, paths)
    assert len(ids) > 2 * cfg["seq_length"]
    reference = off.ref_greedy(sd, cfg, [(ids, pixel_values)], 8)[0].tolist()
    expected = tok.decode(cut_at_stop(reference, stop_ids(tok, "raw"))).strip()
    code = main(["chat", "--model", str(folder), "--raw", "--image", str(image), "--max-new-tokens", "8", question])
    assert code == 0
    assert capsys.readouterr().out.strip() == expected


def test_preallocated_caches_and_chunked_prefill_are_refused(off, monkey_ckpt):
    model, _ = load_model(monkey_ckpt[0])
    ids = torch.tensor([off.prompt_with_image(off.official_config("monkey", seq_length=23))])
    views, slots = off.random_views(5), torch.tensor([0, 1, 2, 3, -1])
    for kwargs in ({"cache_implementation": "static"}, {"prefill_chunk_size": 16}):
        with pytest.raises(ValueError, match="dynamic KV cache and the whole prompt at once"):
            model.generate(ids, pixel_values=views, view_slots=slots, max_new_tokens=2, **kwargs)
