"""An interrupted and resumed run reproduces the uninterrupted one exactly."""

from __future__ import annotations

import pytest
import torch

from monkeytune.train.checkpoint import CheckpointManager
from monkeytune.train.loop import train
from monkeytune.train.metrics import read_metrics


class Interrupt(Exception):
    pass


def stop_at(step):
    def hook(row):
        if row["step"] == step:
            raise Interrupt

    return hook


SECTIONS = dict(
    policy={
        "preset": "monkey-fix-llm",
        "unfreeze": [{"start_step": 4, "rules": ["train: llm.model.layers.1.*"], "lr_multipliers": {"llm": 0.5}}],
    },
    # 48 samples in micro-batches of 7 make 7 micro-batches per epoch, so the window of step 4
    # (micro-batches 7 and 8) straddles the epoch boundary, and step 4 also starts stage 0.
    train={"epochs": 2, "micro_batch_size": 7, "grad_accum": 2},
    checkpoint={"every": 2, "keep_last": 2},
)


def test_resume_is_exact_across_epoch_boundary_and_unfreezing(make_config):
    ref = train(make_config("ref", **SECTIONS))
    assert ref.steps == 7
    ref_params = {n: p.detach().clone() for n, p in ref.model.named_parameters()}

    cfg = make_config("cut", **SECTIONS)
    with pytest.raises(Interrupt):
        train(cfg, on_step=stop_at(3))  # newest checkpoint: step 2, before the stage and the epoch change
    ckpts = CheckpointManager(cfg.checkpoint.output_dir + "/checkpoints")
    assert ckpts.latest().name == "step-00000002"
    with pytest.raises(Interrupt):
        resumed = train(cfg, resume="latest", on_step=stop_at(5))  # crosses both; checkpoint at step 4
    assert ckpts.latest().name == "step-00000004"
    resumed = train(cfg, resume="latest")  # starts inside stage 0 and epoch 1
    assert resumed.steps == 7 and len(resumed.losses) == 3

    ref_rows = read_metrics(ref.run_dir / "metrics.jsonl")
    cut_rows = read_metrics(resumed.run_dir / "metrics.jsonl")
    assert [r["step"] for r in cut_rows] == list(range(1, 8))
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in ref_rows]
    assert [r["lr"] for r in cut_rows] == [r["lr"] for r in ref_rows]
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    assert [p.name for p in ckpts.checkpoints()] == ["step-00000004", "step-00000006"]  # keep_last: 2


def test_resume_refuses_a_changed_batch_size(make_config):
    cfg = make_config("a", train={"max_steps": 2, "micro_batch_size": 4}, checkpoint={"every": 1})
    train(cfg)
    changed = make_config("a", train={"max_steps": 3, "micro_batch_size": 5})
    from monkeytune.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="train.micro_batch_size"):
        train(changed, resume="latest")


def test_a_fresh_run_refuses_a_folder_with_checkpoints(make_config):
    from monkeytune.train.setup import SetupError

    cfg = make_config("used", train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    with pytest.raises(SetupError, match="pass --resume to continue it"):
        train(cfg)
