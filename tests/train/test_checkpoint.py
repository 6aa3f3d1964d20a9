"""Checkpoint folders: atomic writes, the latest marker, pruning, RNG state."""

from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch

from monkeytune.train.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state, write_state


def writer(tag):
    def write(folder):
        (folder / "payload.txt").write_text(tag)
        write_state(folder, {"step": tag})

    return write


def test_save_marks_latest_and_keeps_last_k(tmp_path):
    m = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert m.latest() is None and m.resolve("latest") is None
    for step in (1, 2, 3):
        m.save(step, writer(str(step)))
    assert [p.name for p in m.checkpoints()] == ["step-00000002", "step-00000003"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step-00000003"
    assert m.resolve("latest").name == "step-00000003"
    assert m.resolve(str(tmp_path / "ckpt")).name == "step-00000003"  # a checkpoints folder
    assert m.resolve(str(tmp_path / "ckpt" / "step-00000002")).name == "step-00000002"
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_a_failed_write_leaves_the_previous_checkpoint_current(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=0)
    m.save(1, writer("1"))

    def broken(folder):
        (folder / "payload.txt").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "payload.txt"))

    with pytest.raises(CheckpointError, match=r"no space left on device while writing checkpoint step-00000002 "
                       r"\(.*payload.txt\); the last good checkpoint .*step-00000001 is unchanged"):
        m.save(2, broken)
    assert not (tmp_path / ".tmp-step-00000002").exists()  # the partial folder is gone
    assert m.latest().name == "step-00000001"
    assert [p.name for p in m.checkpoints()] == ["step-00000001"]
    m.save(2, writer("2"))  # the stale temporary folder is replaced
    assert m.latest().name == "step-00000002" and (m.latest() / "payload.txt").read_text() == "2"


def test_resolve_rejects_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        CheckpointManager(tmp_path).resolve(str(tmp_path / "nowhere"))


def test_rng_state_round_trips_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
