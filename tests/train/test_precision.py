"""Under bf16, parameters no stage trains are held in bf16; trained ones stay fp32 masters."""

from __future__ import annotations

import pytest
import torch

from monkeytune.model.io import load_model, read_tensors
from monkeytune.train.loop import train


@pytest.mark.parametrize("unfreeze", [False, True], ids=["fixed-plan", "with-unfreezing"])
def test_frozen_weights_follow_the_compute_dtype(make_config, unfreeze):
    # monkey-fix-llm: ViT base, LLM, embeddings and head frozen; adapters and resampler train.
    policy = {"preset": "monkey-fix-llm"}
    if unfreeze:
        policy["unfreeze"] = [{"start_step": 2, "rules": ["train: llm.model.layers.1.*"]}]
    sections = dict(policy=policy, train={"max_steps": 3, "micro_batch_size": 4, "precision": "bf16"},
                    checkpoint={"final_save": "full"})
    ref = train(make_config("fp32", **{**sections, "train": {**sections["train"], "precision": "fp32"}}))
    got = train(make_config("bf16", **sections))

    dtypes = {n: p.dtype for n, p in got.model.named_parameters()}
    trained = {n for n, p in got.model.named_parameters() if p.requires_grad}
    assert all(dtypes[n] == torch.float32 for n in trained)
    later = {n for n in dtypes if n.startswith("llm.model.layers.1.")}
    assert all(dtypes[n] == (torch.float32 if unfreeze else torch.bfloat16) for n in later)
    frozen = set(dtypes) - trained - later
    assert frozen and all(dtypes[n] == torch.bfloat16 for n in frozen if "llm." in n or "blocks" in n)
    assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(got.losses, ref.losses))

    # The final folder holds one dtype, the run's compute dtype, and loads as a normal model.
    assert {t.dtype for t in read_tensors(got.final_dir).values() if t.is_floating_point()} == {torch.bfloat16}
    model, _ = load_model(got.final_dir)
    assert next(model.parameters()).dtype == torch.bfloat16
