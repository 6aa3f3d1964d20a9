"""Two CPU processes (gloo, launched by torchrun) train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from monkeytune.train.loop import train

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(make_config, micro_model, tmp_path):
    # Without dropout: each rank draws its own dropout masks, which a single process cannot repeat.
    model = micro_model
    model["vision"]["lora_dropout"] = 0.0
    sections = dict(
        model={"config": model},
        train={"epochs": 1, "micro_batch_size": 4, "grad_accum": 1},
        checkpoint={"every": 3, "final_save": "full"},
    )
    ddp_cfg = make_config("ddp", **sections)
    ddp_cfg.save(tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), str(tmp_path / "ddp.yaml"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # One process, the two ranks' micro-batches as one accumulation window.
    ref = train(make_config("single", model={"config": model},
                            train={"epochs": 1, "micro_batch_size": 4, "grad_accum": 2}))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == ref.steps == 6
    for name, p in ref.model.named_parameters():
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        torch.testing.assert_close(r0["params"][name], p.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    run = Path(ddp_cfg.checkpoint.output_dir)
    assert (run / "checkpoints" / "step-00000006" / "rng" / "rank-00001.pt").is_file()
    assert (run / "final" / "model.safetensors").is_file()


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
