"""One run per output folder: an OS-level lock held for the run's lifetime.

The lock is ``fcntl.flock`` on ``<output_dir>/.lock``. The kernel releases it when the holding
process exits, however it exits (``kill -9`` included), so a stale lock file never blocks a
resume: only a live process holds the lock. The file records the holder's PID so a refused run
can name it. Under DDP only the main process takes the lock; the other ranks learn the outcome
from it (see :func:`monkeytune.train.loop.train`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from monkeytune.train.setup import SetupError

LOCK_FILE = ".lock"


class RunLockedError(SetupError):
    """Another live process is running in the same output folder."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder.

    Args:
        run_dir: The run's ``checkpoint.output_dir`` (must exist).
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and record this PID.

        Raises:
            RunLockedError: another process holds it (its PID is named).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise RunLockedError(
                f"{self.path.parent} is in use by another monkeytune run (PID {self.holder() or 'unknown'}): "
                "wait for it to finish, stop it, or choose another checkpoint.output_dir"
            ) from None
        # Only the holder writes, so the PID read by a refused run is the live holder's.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        """The PID recorded in the lock file (None when unreadable)."""
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Release the lock (the file stays; its PID is meaningless once unlocked)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(run_dir: Path, accelerator) -> RunLock | None:
    """Create the run folder and take its lock on the main process; every rank learns the outcome.

    Returns:
        The held lock on the main process, None on the others.

    Raises:
        RunLockedError: another live run holds the folder.
        SetupError: the folder cannot be created or written (e.g. a read-only file system).
    """
    from accelerate.utils import broadcast_object_list

    lock, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            lock.acquire()  # creating the lock file also proves the folder is writable
        except RunLockedError as e:
            lock, refusal = None, [("locked", str(e))]
        except OSError as e:
            lock, refusal = None, [("setup", f"cannot write to checkpoint.output_dir {run_dir}: {e.strerror or e}")]
    # The other ranks would otherwise wait at the first barrier for a main process that left.
    refusal = broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        kind, message = refusal[0]
        raise RunLockedError(message) if kind == "locked" else SetupError(message)
    return lock
