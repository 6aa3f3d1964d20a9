"""Failed and interrupted saves: a full disk, a kill during the final save, file modes."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import SafetensorError

from monkeytune.cli import main
from monkeytune.model import weights
from monkeytune.model.io import load_model
from monkeytune.train import checkpoint
from monkeytune.train.checkpoint import CheckpointError, CheckpointManager
from monkeytune.train.loop import train

SRC = str(Path(__file__).resolve().parents[2] / "src")


def fill_disk_on(monkeypatch, call: int):
    """Make the ``call``-th safetensors write fail the way a full disk makes safetensors fail."""
    real = weights.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == call:
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device (os error 28) "
                                  f"at path \"{Path(filename).parent}/.tmpX\"")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", save_file)


def test_disk_full_during_a_checkpoint_keeps_the_last_one_usable(make_config, monkeypatch, tmp_path, capsys):
    cfg = make_config("full", train={"max_steps": 3}, checkpoint={"every": 1})
    path = tmp_path / "full.yaml"
    cfg.save(path)
    fill_disk_on(monkeypatch, 2)  # the checkpoint of step 2
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monkeytune train: no space left on device while writing checkpoint step-00000002 (")
    assert err.rstrip().endswith("the last good checkpoint " + str(Path(cfg.checkpoint.output_dir) / "checkpoints"
                                                                   / "step-00000001") + " is unchanged")
    assert err.count("\n") == 1
    ckpts = CheckpointManager(Path(cfg.checkpoint.output_dir) / "checkpoints")
    assert [p.name for p in ckpts.checkpoints()] == ["step-00000001"]
    assert not list(ckpts.root.glob(".tmp-*"))
    monkeypatch.undo()
    assert train(cfg, resume="latest").steps == 3  # space is back: the run continues from step 1


class FillingFile:
    """A file opened for writing on a disk with ``room`` bytes left: a write past that fails
    with ``ENOSPC`` the way the operating system's does (raised from ``write``)."""

    def __init__(self, path, room: int):
        self.file = open(path, "wb")
        self.room = room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def fill_disk_in_optimizer_state(monkeypatch, call: int, room: int = 4096):
    """Make the ``call``-th ``optimizer.pt`` run out of space after ``room`` bytes.

    The failure goes through torch's own zip writer, which swallows the ``OSError`` of
    ``write`` and raises ``RuntimeError: ... unexpected pos`` instead.
    """
    calls = {"n": 0}

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "optimizer.pt" and "w" in mode:
            calls["n"] += 1
            if calls["n"] == call:
                return FillingFile(path, room)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


def assert_one_line_full_disk(err: str, cfg, failed: str, kept: str) -> None:
    ckpts = Path(cfg.checkpoint.output_dir) / "checkpoints"
    assert err.startswith(f"monkeytune train: no space left on device while writing checkpoint {failed} ("), err
    assert f"optimizer.pt); the last good checkpoint {ckpts / kept} is unchanged" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert [p.name for p in CheckpointManager(ckpts).checkpoints()] == [kept]
    assert not list(ckpts.glob(".tmp-*"))


def test_disk_full_while_writing_the_optimizer_state_reads_as_a_full_disk(make_config, monkeypatch, tmp_path,
                                                                          capsys):
    cfg = make_config("full-optim", train={"max_steps": 3}, checkpoint={"every": 1})
    path = tmp_path / "full-optim.yaml"
    cfg.save(path)
    fill_disk_in_optimizer_state(monkeypatch, 2)  # the checkpoint of step 2
    assert main(["train", str(path)]) == 2
    assert_one_line_full_disk(capsys.readouterr().err, cfg, "step-00000002", "step-00000001")
    monkeypatch.undo()
    assert train(cfg, resume="latest").steps == 3  # space is back: the run continues from step 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(size) -> folder``: a small tmpfs mounted there, or None where this process may
    not mount one (only root on Linux may)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path | None:
        folder = tmp_path / f"tmpfs-{len(mounted)}"
        folder.mkdir()
        if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
            return None
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return None
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_real_full_disk_in_the_optimizer_state_keeps_the_last_checkpoint(make_config, small_tmpfs, monkeypatch,
                                                                          tmp_path, capsys):
    # A checkpoint of the micro model takes ~2.4 MB (weights 0.8 MB, optimizer state 1.6 MB):
    # 3.5 MiB hold the first one, then the second one's weights, not its optimizer state.
    # Where this process may not mount a tmpfs, the disk fills at the same place through the
    # operating system's error on write instead, so the test still runs and asserts the same.
    disk = small_tmpfs("3584k")
    if disk is None:
        disk = tmp_path
        fill_disk_in_optimizer_state(monkeypatch, 2)
    cfg = make_config("full-tmpfs", train={"max_steps": 3},
                      checkpoint={"every": 1, "keep_last": 3, "output_dir": str(disk / "run")})
    path = tmp_path / "full-tmpfs.yaml"
    cfg.save(path)
    assert main(["train", str(path)]) == 2
    assert_one_line_full_disk(capsys.readouterr().err, cfg, "step-00000002", "step-00000001")


def test_disk_full_during_the_final_save_leaves_no_half_model(make_config, monkeypatch):
    cfg = make_config("final-full", train={"max_steps": 1}, checkpoint={"every": 1, "final_save": "full"})
    fill_disk_on(monkeypatch, 2)  # 1: the checkpoint, 2: the final model
    with pytest.raises(CheckpointError, match=r"^no space left on device while writing the final model .*final "
                                              r"\(.*\); the checkpoints are unchanged$"):
        train(cfg)
    run = Path(cfg.checkpoint.output_dir)
    assert not (run / "final").exists() and not (run / ".tmp-final").exists()
    monkeypatch.undo()
    train(cfg, resume="latest")  # nothing left to train: the final save is redone
    assert load_model(run / "final")[0].config.name == "micro"


def test_final_weights_have_the_same_mode_as_the_other_files(make_config):
    result = train(make_config("modes", train={"max_steps": 1}, checkpoint={"every": 1, "final_save": "full"}))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in result.final_dir.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    ckpt = result.last_checkpoint
    assert stat.S_IMODE((ckpt / "weights.safetensors").stat().st_mode) == modes["config.json"]


def test_a_kill_during_the_final_save_leaves_the_old_final_or_none_and_resume_finishes(make_config, tmp_path):
    cfg = make_config("killed", train={"max_steps": 2}, checkpoint={"every": 1, "final_save": "full"})
    path = tmp_path / "killed.yaml"
    cfg.save(path)
    # The run dies by SIGKILL right after the final weights are written, before config.json.
    code = textwrap.dedent(f"""
        import os, signal, sys
        from monkeytune.model import native
        real = native.write_tensors
        def write_then_die(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        native.write_tensors = write_then_die
        from monkeytune.cli import main
        sys.exit(main(["train", {str(path)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = Path(cfg.checkpoint.output_dir)
    assert not (run / "final").exists()  # never a final/ without config.json
    assert (run / ".tmp-final" / "model.safetensors").is_file()
    # Resuming finds nothing left to train, redoes the final save and removes the leftover.
    result = train(cfg, resume="latest")
    assert result.steps == 2 and not (run / ".tmp-final").exists()
    model, tokenizer = load_model(run / "final")
    assert tokenizer is not None and model.config.name == "micro"


@pytest.mark.parametrize("name", ["weights.safetensors", "optimizer.pt", "rng/rank-00000.pt"])
def test_a_corrupt_checkpoint_file_is_named_on_resume(make_config, tmp_path, capsys, name):
    cfg = make_config("corrupt", train={"max_steps": 1}, checkpoint={"every": 1})
    train(cfg)
    path = Path(cfg.checkpoint.output_dir) / "checkpoints" / "step-00000001" / name
    path.write_bytes(path.read_bytes()[:100])  # cut short, as a full disk or a bad copy leaves it
    config = tmp_path / "corrupt.yaml"
    make_config("corrupt", train={"max_steps": 2}).save(config)
    assert main(["train", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"monkeytune train: {path}: ") and "truncated or corrupt" in err, err
    assert err.count("\n") == 1
