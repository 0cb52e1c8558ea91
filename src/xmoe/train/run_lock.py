"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<run>/.lock``.

The lock is the kernel's, so it dies with its process: a lock file left behind by a process
that was killed is taken over at once. The file holds the holder's PID, which the refusal of a
second writer names. Readers (``xmoe eval`` / ``generate``) take no lock: they read a consistent
checkpoint snapshot (:func:`xmoe.train.checkpoint.read_checkpoint`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one writer is on the user
    fcntl = None

LOCK_NAME = ".lock"


class RunLockedError(ValueError):
    """Another live process writes this run folder."""


class RunLock:
    """The exclusive writer lock of run folder ``path`` (created with its parents if needed).

    ``acquire`` refuses at once (no waiting) when another process holds it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = self.path / LOCK_NAME
        self._fd: int | None = None
        self.created_file = False  # acquire made the lock file (it was not there before)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run dir {str(self.path)!r} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        while True:
            self.created_file = not self.file.exists()
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"run dir {str(self.path)!r} is in use by another xmoe process ({holder}; "
                    f"lock file {self.file}); wait for it to finish or stop it"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The file may have been removed (by a writer cleaning up) between open and lock:
            # then this lock guards nothing, so take the new file's.
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Let go of the lock; ``remove`` also deletes the lock file (while still held)."""
        if self._fd is None:
            return
        if remove:
            self.file.unlink(missing_ok=True)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "PID unknown"
