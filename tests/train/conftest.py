"""Shared pieces for the training tests: a synthetic dataset, a very small model config and forked DDP ranks."""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from monkeytune.train.config_load import load_config
from monkeytune.train.synthetic import write_synthetic_dataset

# Two 28-pixel windows' worth of patches per view, 4 queries: 5 views x 4 = 20 tokens per image.
MICRO_MODEL = {
    "name": "micro",
    "vision": {"patch_size": 14, "width": 32, "layers": 1, "heads": 2, "mlp_ratio": 2.0, "output_dim": 64,
               "n_queries": 4, "resampler_heads": 2, "lora_slots": 4, "lora_rank_attn": 4, "lora_rank_mlp": 4},
    "image": {"grid": [2, 2], "window_size": 28, "global_view": True},
    "llm": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 128,
            "vocab_size": 512, "max_position_embeddings": 512},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny models on one thread: on a shared 2-core machine, two threads of
    sub-millisecond kernels spend most of their time waiting for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """``(train_file, tokenizer_dir)`` of 48 synthetic samples (written once per session)."""
    folder = tmp_path_factory.mktemp("synthetic")
    tok = write_synthetic_dataset(folder / "train.jsonl", 48, seed=0, image_size=32)
    return folder / "train.jsonl", tok


@pytest.fixture
def micro_model():
    """A fresh copy of the micro model config dict."""
    return copy.deepcopy(MICRO_MODEL)


def config_maker(synthetic, folder):
    """``make(run, **sections)``: a validated TrainConfig for the micro model, its run under ``folder``;
    nested dict overrides per section."""

    def make(run="run", **sections):
        train_file, tok = synthetic
        data = {
            "model": {"config": copy.deepcopy(MICRO_MODEL), "tokenizer": str(tok)},
            "data": {"train": str(train_file), "max_length": 128},
            "policy": {"preset": "full"},
            "optim": {"lr": 3e-3, "warmup_ratio": 0.1},
            "train": {"epochs": 1, "micro_batch_size": 4, "grad_accum": 1, "precision": "fp32"},
            "checkpoint": {"output_dir": str(folder / run), "final_save": "none"},
            "log": {"progress": False, "plot": False},
        }
        for sec, body in sections.items():
            data.setdefault(sec, {}).update(body)
        return load_config(data=data)

    return make


@pytest.fixture
def make_config(synthetic, tmp_path):
    """:func:`config_maker` under the test's own folder."""
    return config_maker(synthetic, tmp_path)


LONG_ANSWER = " " + " ".join(["a red square on a blue background"] * 9)  # about 110 tokens


@pytest.fixture(scope="session")
def uneven(synthetic):
    """48 records as data comes: ranks see different kinds and lengths at the same step.

    With ``data.shuffle: false`` and micro-batches of 4 dealt round-robin to 2 ranks, step 1
    gives rank 0 four images with long answers (four LM-head chunks) while rank 1 draws four
    text-only records with one-word answers; step 2 the other way round. The other steps are
    the synthetic records as written (a fifth text-only, mixed within micro-batches).
    """
    train_file, _ = synthetic
    records = [json.loads(line) for line in train_file.read_text().splitlines()]
    with_image = [r for r in records if "<img>" in r["conversations"][0]["value"]]

    def long(i: int) -> dict:
        image = with_image[i % len(with_image)]["conversations"][0]["value"].split("</img>")[0] + "</img>"
        return {"id": f"long-{i}", "conversations": [
            {"from": "user", "value": f"{image} Describe the image."},
            {"from": "assistant", "value": LONG_ANSWER}]}

    def text(i: int) -> dict:
        return {"id": f"text-{i}", "conversations": [
            {"from": "user", "value": f"What is {i % 9 + 1} plus 1? Answer:"},
            {"from": "assistant", "value": f" {i % 9 + 2}"}]}

    head = [long(i) for i in range(4)] + [text(i) for i in range(8)] + [long(i) for i in range(4, 8)]
    path = train_file.with_name("uneven.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in head + records[16:]))
    return path


class Interrupt(Exception):
    """Raised by :func:`stop_at`: a run stopped as a crash would stop it."""


def stop_at(step):
    """An ``on_step`` hook that interrupts the run after optimizer step ``step``."""

    def hook(row):
        if row["step"] == step:
            raise Interrupt

    return hook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, run_yaml: str, port: int, stderr: str) -> None:
    """A rank's process: ``monkeytune train run_yaml`` as torchrun's rank ``rank`` of 2, exiting with its code."""
    from monkeytune.cli import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    with open(stderr, "w") as err:
        os.dup2(err.fileno(), 2)
        sys.stderr = os.fdopen(2, "w", closefd=False)
        code = main(["train", run_yaml])
        sys.stderr.flush()
    sys.exit(code)


def fork_ranks(run_yaml: Path, folder: Path) -> list:
    """Start two DDP ranks (gloo) of ``monkeytune train run_yaml``; their processes (see :func:`wait_ranks`).

    Each rank gets the environment torchrun gives a rank and writes its stderr to
    ``folder/rank{N}.err``. The ranks are forked from multiprocessing's fork server, which has
    imported torch, transformers, accelerate and monkeytune once for the session: a launcher and
    two fresh interpreters import them three times per launch (about 15 s of a 2-core machine).
    They are not forked from this process, whose accelerate state earlier tests have set. The
    engine tests launch ranks with ``accelerate launch``, as a user does.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "monkeytune.cli", "monkeytune.train.loop"])
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(rank, str(run_yaml), port, str(folder / f"rank{rank}.err")))
             for rank in (0, 1)]
    for proc in procs:
        proc.start()
    return procs


def wait_ranks(procs: list, folder: Path, timeout: float = 180) -> list[tuple[int, str]]:
    """Each rank's ``(exit code, stderr)``; a rank still running after ``timeout`` s is killed."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.exitcode is None:  # hung, e.g. waiting for a peer that stopped
            proc.kill()
            proc.join()
    errs = [folder / f"rank{rank}.err" for rank in range(len(procs))]
    return [(proc.exitcode, err.read_text() if err.exists() else "(the rank ended before its stderr opened)")
            for proc, err in zip(procs, errs)]
