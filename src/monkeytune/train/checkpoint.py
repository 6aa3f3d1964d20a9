"""Resumable checkpoints: atomic folders, a ``latest`` marker, keep-last-K, exact state.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000100/``::

    trainer_state.json     step, data position (epoch, micro-batch index), unfreezing stage,
                           consecutive bad steps, world size, batch sizes
    config.yaml            the resolved run configuration
    weights.safetensors    every parameter trainable in any stage so far (frozen ones are
                           rebuilt from the model source and never change)
    optimizer.pt           AdamW state (moments, step counts, group hyperparameters)
    scheduler.pt           learning-rate scheduler state
    scaler.pt              fp16 loss-scaler state (fp16 only)
    rng/rank-00000.pt      python, numpy, torch and CUDA generator states of each rank
    engine/                accelerate ``save_state`` output, only under FSDP / DeepSpeed, whose
                           sharded model and optimizer states only they can write

Writing is atomic: every rank writes into ``.tmp-step-00000100``; rank 0 then fsyncs every file
and the folder, renames it into place, fsyncs the parent, and only then replaces the ``latest``
marker (itself written to a temporary file and renamed). A crash at any moment leaves either the
previous checkpoint or the new one, never a half-written folder that ``latest`` names.

The engine's own ``save_state`` is not used for plain and DDP runs: it saves the whole model
(frozen weights included, ~19 GB for a 7B model) and knows nothing of this data position; here
the sampler order is a pure function of seed and epoch, so ``(epoch, batch)`` is all resume needs.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
PREFIX = "step-"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from."""


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(e: OSError, what: str) -> str:
    """One line for a failed write: a full disk says so and names the path."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {what}{where}"
    return f"cannot write {what}{where}: {e.strerror or e}"


class _WriteRecorder:
    """A file's ``write`` that remembers the first ``OSError`` it raised.

    torch's zip writer swallows an exception of ``write`` and then fails on its own
    bookkeeping (``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``), so
    the original error is kept here to be raised in its place.
    """

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` whose write failures raise ``OSError`` naming ``path`` (errno kept).

    A full disk thus reads "no space left" through :func:`write_error`, as for the weights,
    instead of torch's unspecific ``RuntimeError`` (given a path) or ``unexpected pos`` (given
    a file object whose writes fail).
    """
    with open(path, "wb") as f:
        recorder = _WriteRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            e = recorder.error
            raise OSError(e.errno, e.strerror, str(path)) from None


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``; a truncated or corrupt file is a :class:`CheckpointError`."""
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({first})") from None


def publish_folder(tmp: Path, final: Path) -> None:
    """Make the fully written ``tmp`` appear as ``final`` in one rename (replacing an old one).

    Everything is synced first, so after a crash ``final`` is either the old folder or the
    complete new one; a leftover ``.old-*`` or ``.tmp-*`` folder is removed at the next start.
    """
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete ``.tmp-*`` and ``.old-*`` folders an interrupted save left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


class CheckpointManager:
    """Folders under ``root`` named by step, written atomically, pruned to the last ``keep_last``.

    Args:
        root: ``<output_dir>/checkpoints``.
        keep_last: Checkpoints to keep (0 keeps all).
        is_main: Whether this process is rank 0 (it alone renames, marks and prunes).
        barrier: Called where all ranks must meet (``accelerator.wait_for_everyone``).
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The folder the ``latest`` marker names, else the highest complete one, else None."""
        marker = self.root / LATEST_FILE
        if marker.is_file():
            target = self.root / marker.read_text(encoding="utf-8").strip()
            if (target / STATE_FILE).is_file():
                return target
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, which: str) -> Path | None:
        """``latest`` (None when there is none yet) or a checkpoint folder path (must exist)."""
        if which == "latest":
            return self.latest()
        path = Path(which)
        if (path / LATEST_FILE).is_file() or (path / "checkpoints").is_dir():
            # A run folder or a checkpoints folder: take its latest.
            root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            found = CheckpointManager(root).latest()
            if found is None:
                raise CheckpointError(f"no complete checkpoint under {root}")
            return found
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"{path} is not a checkpoint folder (no {STATE_FILE})")
        return path

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step`` with ``write(tmp_folder)`` (called on every rank).

        Returns:
            The final folder.

        Raises:
            CheckpointError: the write failed (a full disk says "no space left"); the partial
                folder is removed and the previous checkpoint stays current.
        """
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{step_name(step)}"
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a crash during an earlier attempt
                tmp.mkdir()
            self.barrier()
            write(tmp)
            self.barrier()
            if self.is_main:
                publish_folder(tmp, final)
                write_text_atomic(self.root / LATEST_FILE, final.name + "\n")
                self.prune(keep=final)
        except OSError as e:
            # The partial folder goes (it also frees the space a full disk needs back).
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            kept = f"the last good checkpoint {last} is unchanged" if last else "no earlier checkpoint exists"
            raise CheckpointError(f"{write_error(e, f'checkpoint {final.name}')}; {kept}") from None
        self.barrier()
        return final

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete all but the ``keep_last`` newest checkpoints (never ``keep``)."""
        if self.keep_last <= 0:
            return []
        found = self.checkpoints()
        doomed = [p for p in found[: max(0, len(found) - self.keep_last)] if p != keep]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return doomed


# ---------------------------------------------------------------------------------- state files


def rng_state() -> dict[str, Any]:
    """Every generator's state in a form ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, rank: int) -> Path:
    return folder / "rng" / f"rank-{rank:05d}.pt"


def save_rng(folder: Path, rank: int) -> None:
    path = rng_file(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(rng_state(), path)


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's generators; False when the checkpoint has no file for this rank."""
    path = rng_file(folder, rank)
    if not path.is_file():
        return False
    set_rng_state(load_torch(path))
    return True


def read_state(folder: Path) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` (checked for its format version)."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer monkeytune (format {state['format_version']})")
    return state


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (Path(folder) / STATE_FILE).write_text(
        json.dumps({"format_version": FORMAT_VERSION, **state}, indent=2) + "\n", encoding="utf-8"
    )
