"""Under DDP launched by torchrun, every rank stops with the message when another run holds the folder.

That DDP trains like one process is checked in test_engines.py (two launchers, uneven data).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes(seconds=17)  # starts several processes (see tests/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_ddp_every_rank_is_refused_when_another_run_holds_the_folder(make_config, tmp_path):
    from monkeytune.train.lock import RunLock

    cfg = make_config("busy", train={"max_steps": 1})
    cfg.save(tmp_path / "busy.yaml")
    run = Path(cfg.checkpoint.output_dir)
    run.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "monkeytune.cli.train", str(tmp_path / "busy.yaml")]
    with RunLock(run):  # this test process plays the running training
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    # Rank 0 tried the lock and told rank 1; both stop with the message instead of rank 1 hanging.
    refusal = f"monkeytune train: {run} is in use by another monkeytune run (PID {os.getpid()})"
    assert proc.returncode != 0 and proc.stderr.count(refusal) == 2, proc.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()
