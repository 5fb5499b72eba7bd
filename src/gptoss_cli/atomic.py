"""Never half-written: the only code in gptoss that replaces a file or a directory on disk.

A file is written to a hidden sibling (here, or by a library writing to the path `staged_file` gives it),
fsynced and renamed over the old one; a directory is built as a hidden sibling and renamed into place when
the block that fills it ends cleanly. A kill at any moment leaves the old version or the new one, never a
mix. Hidden siblings carry the writer's process id, so `remove_stale` can clear those of processes that died
mid-write without touching a live writer's.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import GptossError

# .NAME.tmp-PID and .NAME.old-PID: the hidden siblings this module creates.
_SIBLING = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


class AtomicWriteError(GptossError):
    """Writing failed (disk full, permissions); what was there before is untouched."""

    def __init__(self, target: Path, err: OSError, kept: str):
        self.reason = err.strerror or str(err)
        super().__init__(f"could not write {target} ({self.reason}); {kept}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def write_atomic(path: Path, text: str | Iterable[str]) -> None:
    """Replace the file `path` with `text` (a string, or pieces written as they come) in one step."""
    path = Path(path)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines([text] if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise AtomicWriteError(path, err, "the old file is unchanged") from None
    fsync_dir(path.parent)


def umask_mode(path: Path) -> None:
    """Give a file the mode an ordinary open() would (0666 minus the umask): safetensors and mkstemp-style
    writers create 0600 files, which another user or container cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def fsync_tree(path: Path) -> None:
    """fsync every file directly in `path`, then `path` itself; files get the user's umask mode."""
    for child in path.iterdir():
        if child.is_file():
            umask_mode(child)
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


@contextmanager
def staged_directory(target: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty hidden directory next to `target`; when the block ends cleanly, rename it to `target`.

    An error (or Ctrl-C) inside the block removes it, so `target` is never left half-written. A non-empty
    `target` is refused unless `force`; then it is swapped out and deleted only after the rename. An
    OSError while writing becomes AtomicWriteError naming `target`.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise GptossError(f"{flag} {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise GptossError(f"{flag} {target} is not empty" + (" (add --force to replace it)" if flag == "--out" else ""))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.is_dir() and any(target.iterdir()):
            old = _sibling(target, "old")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()
            tmp.rename(target)
        fsync_dir(target.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise AtomicWriteError(target, err, "nothing was written") from None
        raise


@contextmanager
def staged_file(target: Path, force: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a hidden sibling path of `target` for a writer to create; when the block ends cleanly, fsync it
    and rename it over `target`.

    For binary files written by another library (a GGUF model). An error (or Ctrl-C) inside the block
    removes the sibling, so `target` is the old file or the new one, never half-written. An existing
    `target` is refused unless `force`; a directory always. An OSError becomes AtomicWriteError.
    """
    target = Path(target)
    if target.is_dir():
        raise GptossError(f"{flag} {target} is a directory; give the file to write")
    if target.exists() and not force:
        raise GptossError(f"{flag} {target} exists" + (" (add --force to replace it)" if flag == "--out" else ""))
    tmp = _sibling(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        yield tmp
        umask_mode(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(target)
        fsync_dir(target.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise AtomicWriteError(target, err, "nothing was written") from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Delete the hidden siblings in `parent` left by processes that are no longer running. Returns them."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for child in Path(parent).iterdir():
        m = _SIBLING.match(child.name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed
