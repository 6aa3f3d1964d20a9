"""The assembled model on the real tiny configuration."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from monkeytune.config import ImageConfig, get_config
from monkeytune.model import ImageTokenMismatch, build_model
from monkeytune.model.loss import loss_chunk_count, supervised_loss


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def image_prompt(cfg, before=(5, 6), after=(7, 8, 9, 10)):
    n = cfg.tokens_per_image
    return [*before, cfg.image_start_id, *[cfg.image_pad_id] * n, cfg.image_end_id, *after]


def views(n_images, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image.window_size
    pv = torch.randn(n_images * cfg.image.num_views, 3, s, s, generator=g)
    one = list(range(cfg.image.num_windows)) + ([-1] if cfg.image.global_view else [])
    return pv, torch.tensor(one * n_images)


def test_token_count_follows_config():
    cfg = get_config("tiny")
    assert cfg.tokens_per_image == 5 * 64
    cfg.image = ImageConfig(grid=[1, 3], window_size=224, global_view=False)
    assert cfg.tokens_per_image == 3 * 64
    assert get_config("monkey-7b").tokens_per_image == 1280
    assert get_config("qwen-vl-7b").tokens_per_image == 256
    big_grid = dataclasses.replace(get_config("tiny"), image=ImageConfig(grid=[3, 3], window_size=224))
    with pytest.raises(ValueError, match="adapter slot"):
        big_grid.validate()


def test_features_land_in_placeholders(model):
    cfg = model.config
    ids = torch.tensor([image_prompt(cfg), image_prompt(cfg, before=(11, 12), after=(13, 14, 15, 16))])
    pv, slots = views(2, cfg)
    embeds = model.embed_inputs(ids, pv, slots)
    visual = model.encode_images(pv, slots).reshape(2, cfg.tokens_per_image, -1)
    text = model.llm.get_input_embeddings()(ids)
    pad = ids == cfg.image_pad_id
    for b in range(2):
        torch.testing.assert_close(embeds[b][pad[b]], visual[b])
        assert torch.equal(embeds[b][~pad[b]], text[b][~pad[b]])


def test_two_images_in_one_sample_and_text_only(model):
    cfg = model.config
    two = image_prompt(cfg) + image_prompt(cfg, before=(20,), after=(21,))
    pv, slots = views(2, cfg)
    out = model(torch.tensor([two]), pixel_values=pv, view_slots=slots)
    assert out.logits.shape == (1, len(two), cfg.llm.vocab_size)
    text_only = model(torch.tensor([[1, 2, 3]]))
    assert text_only.logits.shape == (1, 3, cfg.llm.vocab_size)


def test_placeholder_mismatch_is_a_clear_error(model):
    cfg = model.config
    ids = torch.tensor([image_prompt(cfg)])
    pv, slots = views(2, cfg)
    with pytest.raises(ImageTokenMismatch, match="placeholder"):
        model(ids, pixel_values=pv, view_slots=slots)
    with pytest.raises(ImageTokenMismatch, match="no images"):
        model(ids)


def test_supervised_loss_equals_full_logits_loss(model):
    cfg = model.config
    ids = torch.tensor([image_prompt(cfg), image_prompt(cfg, after=(30, 31, 32, 33))])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    labels[1, -2:] = ids[1, -2:]
    pv, slots = views(2, cfg)
    out = model(ids, labels=labels, pixel_values=pv, view_slots=slots)
    logits = model(ids, pixel_values=pv, view_slots=slots).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    assert out.num_tokens.item() == 6
    # Chunked LM-head (recomputed in backward) gives the same loss and gradients.
    model.zero_grad()
    model(ids, labels=labels, pixel_values=pv, view_slots=slots, loss_chunk_size=2).loss.backward()
    g_chunk = model.llm.lm_head.weight.grad.clone()
    model.zero_grad()
    model(ids, labels=labels, pixel_values=pv, view_slots=slots).loss.backward()
    torch.testing.assert_close(g_chunk, model.llm.lm_head.weight.grad, atol=1e-6, rtol=1e-5)
    model.zero_grad()


def test_packed_rows_equal_separate_rows(model):
    """Two samples packed in one row (positions restart, no mask) give the separate losses."""
    cfg = model.config
    a = image_prompt(cfg)
    b = [40, 41, 42, 43, 44]
    la = [-100] * (len(a) - 3) + a[-3:]
    lb = [-100, -100] + b[2:]
    pv, slots = views(1, cfg)
    sep_a = model(torch.tensor([a]), labels=torch.tensor([la]), pixel_values=pv, view_slots=slots)
    sep_b = model(torch.tensor([b]), labels=torch.tensor([lb]))
    packed = model(
        torch.tensor([a + b]),
        labels=torch.tensor([la + lb]),
        position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))]),
        pixel_values=pv,
        view_slots=slots,
    )
    # The first label of b is -100, so no loss term crosses the sample boundary.
    expected = (sep_a.loss_sum + sep_b.loss_sum) / (sep_a.num_tokens + sep_b.num_tokens)
    torch.testing.assert_close(packed.loss, expected, atol=1e-5, rtol=1e-5)


def test_generation_with_image_matches_greedy_loop(model):
    cfg = model.config
    ids = torch.tensor([image_prompt(cfg)])
    pv, slots = views(1, cfg)
    gen = model.generate(ids, pixel_values=pv, view_slots=slots, max_new_tokens=6, do_sample=False, eos_token_id=0)
    assert gen.shape[0] == 1 and 1 <= gen.shape[1] <= 6
    # Reference: greedy decoding without a cache, recomputing the whole sequence each step.
    seq = ids
    for _ in range(gen.shape[1]):
        nxt = model(seq, pixel_values=pv, view_slots=slots).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq[:, ids.shape[1]:])
    sampled = model.generate(ids, pixel_values=pv, view_slots=slots, max_new_tokens=4, do_sample=True,
                             temperature=0.8, top_p=0.9, eos_token_id=0)
    assert sampled.shape[0] == 1


def test_batched_left_padded_generation_matches_single(model):
    cfg = model.config
    p1, p2 = image_prompt(cfg), image_prompt(cfg, before=(50, 51, 52, 53, 54))
    pad = len(p2) - len(p1)
    ids = torch.tensor([[0] * pad + p1, p2])
    mask = torch.tensor([[0] * pad + [1] * len(p1), [1] * len(p2)])
    pv, slots = views(2, cfg)
    both = model.generate(ids, attention_mask=mask, pixel_values=pv, view_slots=slots, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    one = model.generate(torch.tensor([p1]), pixel_values=pv[:5], view_slots=slots[:5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(both[0], one[0])


def test_config_matched_to_tokenizer():
    from monkeytune.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer.train(["a red square in the top-left part", "vertical stripes"] * 5, vocab_size=300)
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="image_start_id"):
        cfg.check_tokenizer(tok)
    fitted = cfg.matched_to_tokenizer(tok)
    fitted.check_tokenizer(tok)
    assert fitted.image_pad_id == tok.image_pad_id and fitted.llm.vocab_size % 64 == 0
    assert fitted.llm.vocab_size >= tok.vocab_size and cfg.image_pad_id == 1023  # the original is unchanged
    fitted.validate()


def test_batch_without_supervised_tokens_reaches_every_trainable_parameter(model):
    # Data-parallel training hangs or fails when one rank's backward skips a parameter the
    # others update: a zero loss must still give every parameter on the path a gradient.
    cfg = model.config
    ids = torch.tensor([image_prompt(cfg)])
    pv, slots = views(1, cfg)
    model.zero_grad()
    out = model(ids, labels=torch.full_like(ids, -100), pixel_values=pv, view_slots=slots)
    assert out.num_tokens.item() == 0 and out.loss.item() == 0.0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    model.zero_grad()
    assert not missing, missing[:5]


def test_text_only_training_batch_runs_the_vision_path_and_adds_exactly_zero(model):
    # Sharded engines gather each module's weights when it runs: a rank whose micro-batch has no
    # image must still run the tower and resampler, and its loss and gradients must be exactly
    # those of the text alone.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = ids.clone()
    ran = []
    hooks = [m.register_forward_hook(lambda *_: ran.append(1)) for m in (model.vision, model.resampler)]
    try:
        model.eval()
        plain = model(ids, labels=labels)
        assert not ran  # inference and scoring skip it
        model.train()
        model.zero_grad()
        out = model(ids, labels=labels)
        assert len(ran) == 2
    finally:
        for h in hooks:
            h.remove()
        model.eval()
    assert torch.equal(out.loss_sum, plain.loss_sum)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    vision_grads = [p.grad for n, p in model.named_parameters() if n.startswith(("vision.", "resampler."))]
    model.zero_grad()
    assert not missing, missing[:5]
    assert all(not g.any() for g in vision_grads)


@pytest.mark.parametrize("supervised, calls", [(0, 1), (0, 3), (5, 1), (5, 4), (9, 2)])
def test_loss_calls_the_head_exactly_the_given_number_of_times(supervised, calls):
    # ZeRO-3 gathers the head at every call: ranks must make the same number, whatever their data.
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.full((2, 6), -100)
    labels.view(-1)[torch.randperm(12)[:supervised]] = torch.randint(0, 11, (supervised,))
    forwards = []
    head.register_forward_hook(lambda *_: forwards.append(1))
    loss, n = supervised_loss(hidden, labels, head, chunk_size=4, num_chunks=calls)
    assert len(forwards) == calls and n.item() == int((labels[:, 1:] != -100).sum())
    logits = head(hidden[:, :-1]).reshape(-1, 11)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert hidden.grad is not None and head.weight.grad is not None
    assert loss_chunk_count(labels, chunk_size=4) == max(1, -(-n.item() // 4))


def test_windows_without_adapters_run_on_the_shared_tower():
    # The config accepts a grid with vision.lora_slots 0 (tiling without per-window adapters);
    # the processor still numbers the windows, which such a model must accept.
    from PIL import Image

    from monkeytune.vision.processor import ImageProcessor

    cfg = get_config("tiny")
    cfg.vision = dataclasses.replace(cfg.vision, lora_slots=0, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    processed = ImageProcessor(cfg.image)(Image.new("RGB", (90, 70), (200, 30, 30)))
    assert processed.slots.tolist() == [0, 1, 2, 3, -1]
    ids = torch.tensor([image_prompt(cfg)])
    out = model(ids, pixel_values=processed.views, view_slots=processed.slots)
    unslotted = model(ids, pixel_values=processed.views, view_slots=torch.full((5,), -1))
    assert torch.equal(out.logits, unslotted.logits)


def test_weighted_loss_matches_per_target_reference(model):
    cfg = model.config
    ids = torch.tensor([image_prompt(cfg), image_prompt(cfg, after=(30, 31, 32, 33))])
    labels = torch.full_like(ids, -100)
    labels[0, -4:] = ids[0, -4:]
    labels[1, -2:] = ids[1, -2:]
    weights = torch.zeros(ids.shape)
    weights[0, -4:] = 1 / 4
    weights[1, -2:] = 1 / 2
    pv, slots = views(2, cfg)
    out = model(ids, labels=labels, pixel_values=pv, view_slots=slots, token_weights=weights, loss_chunk_size=3)
    logits = model(ids, pixel_values=pv, view_slots=slots).logits
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    torch.testing.assert_close(out.loss_sum, (ce * weights[:, 1:]).sum(), atol=1e-5, rtol=1e-5)
