"""One trainer per run directory: an OS-level lock on RUN/train.lock, held by `gptoss train` for its whole life.

The lock is fcntl.flock on the file, so the kernel releases it when the process dies however it dies
(kill -9 included): a lock left by a dead trainer is simply taken over. The file's content (pid, host,
start time) only says who holds it, for the error a second trainer prints. Readers (infer, chat, serve,
eval, report, export) never take it: a trainer replaces files by whole-file renames (atomic.py) or
appends lines to the logs, so reading a run while it trains is safe. Under torchrun rank 0 alone holds it.
The lock is advisory, and as good as the file system's flock (a network file system may not honour it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import GptossError
from .layout import RunDir


class RunLocked(GptossError):
    """Another live process trains this run directory."""


class RunLock:
    def __init__(self, run: RunDir):
        self.path = Path(run.lock)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating RUN/ and the lock file when needed) or raise RunLocked naming the holder."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is being trained by another process ({holder}); wait for it to "
                f"finish or stop it, or pick another --run"
            ) from None
        except OSError:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file (nobody holds it now) and unlock. The file stays: unlinking a flock-ed file lets
        two processes each lock a different inode of the same name."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a TrainingSetup dropped without running (tests, errors) lets go of its lock
        try:
            self.release()
        except Exception:  # at interpreter exit os may already be torn down; the kernel releases it anyway
            pass


def being_trained(run: RunDir) -> bool:
    """Whether a live trainer holds RUN/train.lock now. Asked with a shared, non-blocking flock that is let go
    at once, so it never stands in a trainer's way for longer than the call."""
    try:
        fd = os.open(run.lock, os.O_RDONLY)
    except OSError:  # no lock file: never trained here, or not readable (then nobody can tell)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the shared lock if it was taken
    return False


def _describe(raw: bytes) -> str:
    try:
        rec = json.loads(raw.decode("utf-8"))
        return f"pid {rec['pid']} on {rec['host']}, since {rec['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: the lock file is still being written"
