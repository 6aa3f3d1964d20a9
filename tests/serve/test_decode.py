"""Continuous batching: rows join a running batch mid-decode, leave it when done, and answer as alone.

The references are transformers' own ``generate`` (through :func:`monkeytune.generate.generate_ids`)
run on each prompt alone. The models are tiny and random, so their answers are arbitrary token
sequences and any mix-up of rows, positions, padding or images shows.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from monkeytune.config import get_config
from monkeytune.generate import GenerationSettings, generate_ids, prompt_ids
from monkeytune.model import build_model
from monkeytune.model.monkey import MonkeyForCausalLM
from monkeytune.model.qwen_compat import CompatConfig, apply_compat
from monkeytune.serve.batching import Batcher, Job
from monkeytune.serve.decode import Decoder, GrowingLayer
from monkeytune.tokenizer.simple import SimpleTokenizer

TEXTS = ["what is in the picture? Answer: a red square", "the quick brown fox jumps over the lazy dog",
         "how many boxes are there? two boxes", "a blue circle on the right"]


@pytest.fixture(scope="module")
def tok():
    return SimpleTokenizer.train(TEXTS * 3, vocab_size=320)


def small_config(tok):
    # Vocabulary rounded up past the tokenizer's: rows no token maps to exist (OnlyTokenizerIds).
    cfg = get_config("tiny").matched_to_tokenizer(tok, pad_vocab_to=128)
    cfg.vision = dataclasses.replace(cfg.vision, layers=1, n_queries=16)
    cfg.image = dataclasses.replace(cfg.image, window_size=56)
    return cfg


def with_llm(cfg, llm_class, config_class, **extra):
    """A Monkey model around a plain transformers causal LM of the tiny preset's sizes."""
    llm = llm_class(config_class(vocab_size=cfg.llm.vocab_size, hidden_size=cfg.llm.hidden_size,
                                 intermediate_size=cfg.llm.intermediate_size, num_hidden_layers=cfg.llm.num_layers,
                                 num_attention_heads=cfg.llm.num_heads, num_key_value_heads=cfg.llm.num_kv_heads,
                                 max_position_embeddings=cfg.llm.max_position_embeddings, **extra))
    return MonkeyForCausalLM(cfg, llm=llm)


def make(kind: str, tok):
    """A tiny random model of one kind monkeytune loads."""
    cfg = small_config(tok)
    torch.manual_seed(0)
    if kind == "llama":  # any transformers causal LM inside, as composed models hold one
        model = with_llm(cfg, LlamaForCausalLM, LlamaConfig)
    elif kind == "sliding":  # sliding-window layers: a cache that cannot take rows in
        model = with_llm(cfg, Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=6,
                         max_window_layers=0)
    else:
        model = build_model(cfg)
        if kind == "official":  # the official Qwen inference: dynamic NTK and log-n past 256 positions
            apply_compat(model.llm, CompatConfig(seq_length=256))
    return model.eval()


@pytest.fixture(scope="module", params=["native", "official", "llama", "sliding"])
def model(request, tok):
    return make(request.param, tok)


def prompt(model, tok, text, image=None):
    return prompt_ids("vqa", tok, model.config.tokens_per_image, text, image)


def alone(model, tok, ids, images, n):
    """What transformers' generate answers to one prompt: ``n`` greedy tokens, no stop."""
    return generate_ids(model, tok, [(ids, images)], GenerationSettings(n), [])[0]


def drive(decoder, arrivals, n):
    """Run the decode loop: ``arrivals`` maps a step to the jobs that join there; each row stops at ``n`` tokens.

    Returns the width of the batch at every step.
    """
    batch, widths, step = None, [], 0
    while batch is not None or any(s >= step for s in arrivals):
        if step in arrivals:
            new = decoder.start(arrivals[step])
            batch = new if batch is None else decoder.join(batch, new)
        if batch is not None:
            tokens = decoder.pick(batch)
            open_rows = []
            for row, (job, token) in enumerate(zip(batch.rows, tokens)):
                if job.finish_reason is None:
                    job.tokens.append(token)
                    if len(job.tokens) < min(n, job.max_tokens):
                        open_rows.append(row)
                    else:
                        job.finish_reason = "length"
            picked = dict(zip(batch.rows, tokens))
            batch = decoder.keep(batch, open_rows)
            if batch is not None:
                if batch.joins and len(batch.rows) == 1:  # a lone row has no padding left
                    assert bool(batch.mask.all())
                decoder.step(batch, [picked[job] for job in batch.rows])
                widths.append(batch.width)
        step += 1
    return widths


def test_rows_that_join_and_leave_mid_decode_answer_as_alone(model, tok, picture):
    n = 12
    long_ = Job(prompt(model, tok, "how many boxes are there?")[0], [], n, None)
    ids, images = prompt(model, tok, "what is in the picture?", str(picture))
    pictured = Job(ids, images, n, None)
    wide = Job(prompt(model, tok, "the quick brown fox jumps over the lazy dog " * 3)[0], [], n, None)  # pads the others
    short = Job(prompt(model, tok, "a")[0], [], 3, None)  # leaves early
    decoder = Decoder(model, tok.vocab_size, tok.pad_id)
    joins = decoder.start([long_]).joins
    if not joins:  # a cache that cannot take rows in: its rows start together
        widths = drive(decoder, {0: [long_, pictured, wide, short]}, n)
    else:
        widths = drive(decoder, {0: [long_], 3: [pictured], 5: [wide], 6: [short]}, n)
        assert max(widths) > widths[-1], "columns only the rows that left needed are dropped"
    for job in (long_, pictured, wide, short):
        assert job.tokens == alone(model, tok, job.ids, job.images, job.max_tokens), job.ids[:8]
    assert joins == (model.llm.config.model_type != "qwen2" or not model.llm.config.use_sliding_window)


def test_a_growing_layer_holds_what_concatenation_holds():
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    layer = GrowingLayer(keys, values)
    for step, width in enumerate((1, 7, GrowingLayer.ROOM, 1, 1, 3)):  # past the spare columns twice
        if step == 4:  # transformers' own reordering (beam search) replaces the tensors: still in step
            layer.reorder_cache(torch.tensor([2, 0, 1]))
            keys, values = keys[[2, 0, 1]], values[[2, 0, 1]]
        k, v = torch.randn(3, 2, width, 4), torch.randn(3, 2, width, 4)
        keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
        assert layer.get_seq_length() == keys.shape[-2] and layer.get_mask_sizes(1) == (keys.shape[-2] + 1, 0)


def test_a_growing_layer_adopts_a_buffer_with_spare_columns_and_writes_into_it():
    torch.manual_seed(0)
    buffer_k, buffer_v = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    layer = GrowingLayer(buffer_k, buffer_v, width=5)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    got_k, got_v = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([buffer_k[:, :, :5], k], dim=-2))
    assert torch.equal(got_v, torch.cat([buffer_v[:, :, :5], v], dim=-2))
    assert got_k.data_ptr() == buffer_k.data_ptr()  # written in place, not copied


def test_a_growing_layer_keeps_some_rows_and_columns_in_one_copy_and_grows_on():
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
    layer = GrowingLayer(keys, values)
    rows = torch.tensor([2, 0])
    kept = layer.select(rows, 2)
    keys, values = keys[[2, 0], :, 2:], values[[2, 0], :, 2:]
    assert torch.equal(kept.keys, keys) and torch.equal(kept.values, values)
    assert kept.keys.data_ptr() == kept._k.data_ptr() and kept._k.shape[-2] > 4  # its spare columns came along
    for width in (1, GrowingLayer.ROOM):  # into them, then past them
        k, v = torch.randn(2, 2, width, 4), torch.randn(2, 2, width, 4)
        keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        got_k, got_v = kept.update(k, v)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    kept.reorder_cache(torch.tensor([1, 0]))  # tensors no longer in its buffers: still right
    again = kept.select(torch.tensor([0]), 0)
    assert torch.equal(again.keys, keys[[1]]) and torch.equal(again.values, values[[1]])


def test_rows_decoded_past_the_spare_columns_answer_as_alone(tok, picture):
    model = make("native", tok)
    n = GrowingLayer.ROOM + 12
    first = Job(prompt(model, tok, "how many boxes are there?")[0], [], n, None)
    ids, images = prompt(model, tok, "what is in the picture?", str(picture))
    second = Job(ids, images, n, None)
    drive(Decoder(model, tok.vocab_size, tok.pad_id), {0: [first], 40: [second]}, n)
    for job in (first, second):
        assert job.tokens == alone(model, tok, job.ids, job.images, n)


def test_ids_no_token_maps_to_are_never_picked(tok):
    model = make("native", tok)
    assert model.config.llm.vocab_size > tok.vocab_size
    with torch.no_grad():  # the likeliest next token everywhere is a row past the tokenizer's
        model.llm.get_output_embeddings().weight[tok.vocab_size + 1] = 50.0
    job = Job(prompt(model, tok, "a")[0], [], 4, None)
    drive(Decoder(model, tok.vocab_size, tok.pad_id), {0: [job]}, 4)
    assert max(job.tokens) < tok.vocab_size


def test_official_models_take_rows_in_only_short_of_log_n(tok):
    model = make("official", tok)
    decoder = Decoder(model, tok.vocab_size, tok.pad_id)
    running = decoder.start([Job(prompt(model, tok, "a")[0], [], 20, None)])
    assert decoder.fits(running, [Job([5] * 200, [], 40, None)])
    # 230 prompt tokens and 40 new ones pass the 256 positions where log-n scaling starts.
    assert not decoder.fits(running, [Job([5] * 230, [], 40, None)])


def test_each_row_samples_with_its_own_settings(tok):
    model = make("native", tok)
    decoder = Decoder(model, tok.vocab_size, tok.pad_id)
    ids = prompt(model, tok, "what is in the picture?")[0]

    def seeded(seed=7):
        return Job(ids, [], 10, None, temperature=1.5, seed=seed)

    by_itself = seeded()
    drive(decoder, {0: [by_itself]}, 10)
    greedy, nearly_greedy, crowded = Job(ids, [], 10, None), Job(ids, [], 10, None, temperature=1.0, top_p=1e-6), seeded()
    drive(decoder, {0: [greedy, Job(ids, [], 10, None, temperature=2.0)], 2: [crowded, nearly_greedy]}, 10)
    assert crowded.tokens == by_itself.tokens  # its own generator: the same seed, the same answer
    assert greedy.tokens == nearly_greedy.tokens == alone(model, tok, ids, [], 10)
    other = seeded(8)
    drive(decoder, {0: [other]}, 10)
    assert other.tokens != by_itself.tokens


def run_in_batcher(model, tok, first, second, after_pieces=3):
    """Run ``first`` (streamed) in a Batcher and submit ``second`` once ``first`` has streamed a few pieces."""
    batcher = Batcher(model, tok, "raw", max_batch_size=4)
    done = threading.Semaphore(0)
    sizes_when_submitted = []

    def on_first(event):
        if event[0] == "text" and len(first.tokens) >= after_pieces and not sizes_when_submitted:
            sizes_when_submitted.append(batcher.running)
            batcher.submit(second)  # from the worker thread, between two steps
        if event[0] == "done":
            done.release()

    first.on_event, second.on_event = on_first, lambda event: event[0] == "done" and done.release()
    batcher.submit(first)
    assert done.acquire(timeout=30) and done.acquire(timeout=30)
    batcher.close()
    return sizes_when_submitted, list(batcher.recent)


@pytest.mark.parametrize("kind", ["native", "sliding"])
def test_a_request_submitted_while_another_decodes_joins_it(tok, picture, kind):
    model = make(kind, tok)
    first = Job(prompt(model, tok, "how many boxes are there?")[0], [], 24, None, stream=True)
    ids, images = prompt(model, tok, "what is in the picture?", str(picture))
    second = Job(ids, images, 8, None)
    submitted, steps = run_in_batcher(model, tok, first, second)
    assert submitted == [1]
    for job in (first, second):
        assert job.finish_reason == "length"
        assert job.tokens == alone(model, tok, job.ids, job.images, job.max_tokens)
    if kind == "native":  # the second row ran beside the first, then left before it
        assert steps[:3] == [1, 1, 1] and 2 in steps and steps[-1] == 1
    else:  # the second waited for the first batch to end
        assert set(steps) == {1} and len(steps) == 24 + 8


def test_a_picture_that_cannot_be_read_fails_its_own_request_only(tok, picture, tmp_path):
    model = make("native", tok)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture at all")
    good = Job(*prompt(model, tok, "what is in the picture?", str(picture)), 6, None)
    bad = Job(*prompt(model, tok, "what is in the picture?", str(broken)), 6, None)
    done = threading.Semaphore(0)
    for job in (good, bad):
        job.on_event = lambda event: event[0] == "done" and done.release()
    batcher = Batcher(model, tok, "raw", max_batch_size=4)
    with batcher._cond:  # the worker waits for this lock: both start in one prefill
        batcher.submit(good)
        batcher.submit(bad)
    assert done.acquire(timeout=30) and done.acquire(timeout=30)
    batcher.close()
    assert bad.finish_reason == "error" and "broken.png" in str(bad.error)
    assert good.finish_reason == "length" and good.tokens == alone(model, tok, good.ids, good.images, 6)
    assert list(batcher.recent) == [1] * 6  # the good one ran alone
