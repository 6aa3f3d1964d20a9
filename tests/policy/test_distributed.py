"""Two CPU processes (gloo): DDP through an unfreezing stage, and the cross-rank consistency check."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from monkeytune.policy import TrainPlan, apply_plan, check_trainable_consistent

pytestmark = pytest.mark.processes(seconds=1)  # starts several processes (see tests/conftest.py)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker on 2 processes once; return each rank's saved results."""
    here = str(Path(__file__).parent)
    sys.path.insert(0, here)  # spawned children inherit sys.path and import the worker by name
    try:
        worker = importlib.import_module("policy_ddp_worker")
        out = tmp_path_factory.mktemp("ddp")
        # Forked, the ranks start with torch and monkeytune already imported (spawned, each
        # would import them again: about 10 s of a 2-core machine).
        mp.start_processes(worker.run, args=(2, str(out)), nprocs=2, join=True, start_method="fork")
    finally:
        sys.path.remove(here)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_unfrozen_weights_stay_in_sync_after_rewrap(ranks):
    r0, r1 = ranks[0]["rewrap"], ranks[1]["rewrap"]
    # Newly unfrozen layer: moved, and identical on both ranks although their data differ.
    assert not torch.equal(r0["layer1"], r0["start"])
    torch.testing.assert_close(r0["layer1"], r1["layer1"], rtol=0, atol=0)
    torch.testing.assert_close(r0["resampler"], r1["resampler"], rtol=0, atol=0)
    torch.testing.assert_close(r0["layer0"], r1["layer0"], rtol=0, atol=0)
    # Without rebuilding DDP the new parameters get no all-reduce and the ranks drift apart,
    # which is what the rewrap prevents.
    c0, c1 = ranks[0]["no_rewrap"], ranks[1]["no_rewrap"]
    assert not torch.allclose(c0["layer1"], c1["layer1"])


def test_trainable_mismatch_is_reported_on_every_rank(ranks):
    for r in ranks:
        msg = r["mismatch_error"]
        assert "trainable parameters differ across ranks" in msg
        assert "rank 1 trains 2 that rank 0 does not: llm.model.layers.0.bias, llm.model.layers.0.weight" in msg
        assert r["consistent"] is True


def test_check_is_a_no_op_without_torch_distributed():
    model = nn.Linear(2, 2)
    model.resampler = nn.Linear(2, 2)
    apply_plan(model, TrainPlan("monkey"))
    assert check_trainable_consistent(model) is False
