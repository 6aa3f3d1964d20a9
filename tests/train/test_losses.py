"""Loss normalisation: one number per optimizer step, whatever the batching."""

from __future__ import annotations

import pytest
import torch

from monkeytune.data import ConversationDataset
from monkeytune.train.loop import train
from monkeytune.train.setup import load_model_and_tokenizer
from monkeytune.train.step import sample_weights


def test_sample_weights_follow_packed_samples():
    #            sample A (targets at 1, 2)   sample B (targets at 2, 3, 4)   padding
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, 8, 9, -100, -100]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    w, n = sample_weights(labels, positions)
    assert n == 2
    torch.testing.assert_close(w[0], torch.tensor([0, 1 / 2, 1 / 2, 0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0]))
    w, n = sample_weights(labels, None)  # without positions a row is one sample
    assert n == 1 and torch.isclose(w.sum(), torch.tensor(1.0))


@pytest.fixture
def eight(synthetic, make_config, micro_model):
    """A config factory over the first 8 samples, without dropout (so batch shapes cannot matter)."""
    train_file, _ = synthetic
    subset = train_file.with_name("first8.jsonl")
    subset.write_text("".join(train_file.read_text().splitlines(keepends=True)[:8]))
    micro_model["vision"]["lora_dropout"] = 0.0

    def make(run, train_overrides=None, data=None):
        return make_config(
            run, model={"config": micro_model}, data={"train": str(subset), **(data or {})},
            train={"max_steps": 1, **(train_overrides or {})},
        )

    return make


def test_per_token_loss_is_independent_of_accumulation_padding_and_packing(eight):
    ref = train(eight("b8", {"micro_batch_size": 8, "grad_accum": 1}))
    variants = [
        train(eight("b2g4", {"micro_batch_size": 2, "grad_accum": 4})),
        train(eight("b3g3", {"micro_batch_size": 3, "grad_accum": 3})),  # micro-batches of 3, 3 and 2
        train(eight("maxlen", {"micro_batch_size": 8}, {"padding": "max_length"})),
        train(eight("packed", {"micro_batch_size": 8}, {"packing": True})),  # every row in one batch
    ]
    ref_params = dict(ref.model.named_parameters())
    for v in variants:
        assert v.losses[0] == pytest.approx(ref.losses[0], rel=1e-5)
        for name, p in v.model.named_parameters():
            torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-6)


def test_logged_loss_is_the_chosen_normalisation(eight):
    cfg = eight("manual")
    model, tokenizer = load_model_and_tokenizer(cfg)
    data = ConversationDataset(cfg.data.train, tokenizer, model.config, max_length=cfg.data.max_length)
    sums, counts = [], []
    with torch.no_grad():
        for item in (data[i] for i in range(len(data))):
            out = model(item["input_ids"][None], labels=item["labels"][None],
                        pixel_values=item["pixel_values"], view_slots=item["view_slots"])
            sums.append(float(out.loss_sum))
            counts.append(int(out.num_tokens))
    per_token = sum(sums) / sum(counts)
    per_sample = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert abs(per_token - per_sample) > 1e-3  # the two really differ on this data

    got_token = train(eight("tok", {"micro_batch_size": 3, "grad_accum": 3})).losses[0]
    got_sample = train(eight("smp", {"micro_batch_size": 3, "grad_accum": 3, "loss_norm": "per_sample"})).losses[0]
    packed_sample = train(eight("smp-packed", {"micro_batch_size": 8, "loss_norm": "per_sample"},
                                {"packing": True})).losses[0]
    assert got_token == pytest.approx(per_token, rel=1e-5)
    assert got_sample == pytest.approx(per_sample, rel=1e-5)
    assert packed_sample == pytest.approx(per_sample, rel=1e-5)


def test_gradient_checkpointing_and_bf16(eight):
    ref = train(eight("plain", {"micro_batch_size": 4, "grad_accum": 2}))
    ckpt = train(eight("ckpt", {"micro_batch_size": 4, "grad_accum": 2, "gradient_checkpointing": ["llm", "vit"]}))
    assert ckpt.losses[0] == pytest.approx(ref.losses[0], rel=1e-6)
    ref_params = dict(ref.model.named_parameters())
    for name, p in ckpt.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-7)
    bf16 = train(eight("bf16", {"micro_batch_size": 4, "grad_accum": 2, "precision": "bf16"}))
    assert bf16.losses[0] == pytest.approx(ref.losses[0], rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights
