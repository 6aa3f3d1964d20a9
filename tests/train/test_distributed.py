"""Under DDP, every rank stops with the message when another run holds the folder.

The two ranks fork from a fork server (``fork_ranks`` in conftest.py). That DDP trains like one
process is checked in test_engines.py (two launchers, uneven data).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .conftest import fork_ranks, wait_ranks

pytestmark = pytest.mark.processes(seconds=2)  # starts several processes (see tests/conftest.py)


def test_under_ddp_every_rank_is_refused_when_another_run_holds_the_folder(make_config, tmp_path):
    from monkeytune.train.lock import RunLock

    cfg = make_config("busy", train={"max_steps": 1})
    cfg.save(tmp_path / "busy.yaml")
    run = Path(cfg.checkpoint.output_dir)
    run.mkdir(parents=True)
    with RunLock(run):  # this test process plays the running training
        ranks = wait_ranks(fork_ranks(tmp_path / "busy.yaml", tmp_path), tmp_path)
    # Rank 0 tried the lock and told rank 1; both stop with the message instead of rank 1 hanging.
    refusal = f"monkeytune train: {run} is in use by another monkeytune run (PID {os.getpid()})"
    for code, stderr in ranks:
        assert code == 2 and stderr.count(refusal) == 1, (code, stderr[-3000:])
    assert not (run / "metrics.jsonl").exists()
