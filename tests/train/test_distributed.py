"""Under DDP, every rank stops with the message when another run holds the folder.

The two ranks are forked from this process with the environment torchrun gives a rank, and each
runs the command line (``monkeytune train``) with its own stderr, so they start with torch
already imported. That DDP trains like one process is checked in test_engines.py (two
launchers, uneven data).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes(seconds=3)  # starts several processes (see tests/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, run_yaml: Path, port: int, stderr: Path) -> int:
    """In a forked child: ``monkeytune train run_yaml`` as torchrun's rank ``rank`` of 2; its exit code."""
    from monkeytune.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    with open(stderr, "w") as err:
        os.dup2(err.fileno(), 2)
        sys.stderr = os.fdopen(2, "w", closefd=False)
        try:
            return main(["train", str(run_yaml)])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()


def fork_ranks(run_yaml: Path, folder: Path, timeout: float = 120) -> list[tuple[int, str]]:
    """Fork two ranks of ``monkeytune train``; each one's ``(exit code, stderr)``, killed past ``timeout``."""
    port, pids = free_port(), []
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            code = 1
            try:
                code = _rank(rank, run_yaml, port, folder / f"rank{rank}.err")
            finally:
                os._exit(code)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(codes) < 2 and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in pids:
        if pid not in codes:  # hung (waiting for a peer that stopped): the failure this test is for
            os.kill(pid, signal.SIGKILL)
            codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [(codes[pid], (folder / f"rank{rank}.err").read_text()) for rank, pid in enumerate(pids)]


def test_under_ddp_every_rank_is_refused_when_another_run_holds_the_folder(make_config, tmp_path):
    from monkeytune.train.lock import RunLock

    cfg = make_config("busy", train={"max_steps": 1})
    cfg.save(tmp_path / "busy.yaml")
    run = Path(cfg.checkpoint.output_dir)
    run.mkdir(parents=True)
    with RunLock(run):  # this test process plays the running training
        ranks = fork_ranks(tmp_path / "busy.yaml", tmp_path)
    # Rank 0 tried the lock and told rank 1; both stop with the message instead of rank 1 hanging.
    refusal = f"monkeytune train: {run} is in use by another monkeytune run (PID {os.getpid()})"
    for code, stderr in ranks:
        assert code == 2 and stderr.count(refusal) == 1, (code, stderr[-3000:])
    assert not (run / "metrics.jsonl").exists()
