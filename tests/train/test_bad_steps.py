"""Non-finite losses skip the step (weights, optimizer and schedule untouched) and stop a run that keeps failing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monkeytune.train.loop import TrainingError, train
from monkeytune.train.metrics import read_metrics
from monkeytune.train.step import TrainingModule


def poison(monkeypatch, bad_calls):
    """Make the given forward calls (1-based) return NaN: a fault injected into the real loss."""
    original = TrainingModule.forward
    calls = {"n": 0}

    def forward(self, batch, token_weights=None, loss_chunks=None):
        calls["n"] += 1
        out = original(self, batch, token_weights, loss_chunks)
        return out * float("nan") if bad_calls(calls["n"]) else out

    monkeypatch.setattr(TrainingModule, "forward", forward)


def test_nan_steps_are_skipped(make_config, monkeypatch):
    poison(monkeypatch, lambda n: n in (2, 3))
    result = train(make_config("nan", train={"max_steps": 5}, checkpoint={"every": 5, "final_save": "full"}))
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, True, False, False]
    # A skipped step's NaN loss is written as null: every line is strict JSON.
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert strict == rows
    assert rows[1]["loss"] is None and math.isfinite(rows[3]["loss"])
    # The schedule did not advance on skipped steps: steps 2-4 all use the rate of step 2.
    assert rows[1]["lr"] == rows[2]["lr"] == rows[3]["lr"] != rows[4]["lr"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert (result.run_dir / "final" / "model.safetensors").is_file()


def test_a_run_that_keeps_failing_stops_with_a_clear_error(make_config, monkeypatch):
    poison(monkeypatch, lambda n: n > 1)
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        train(make_config("stop", train={"max_steps": 10, "max_bad_steps": 3}, checkpoint={"every": 1}))
