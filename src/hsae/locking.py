"""One writer per folder: an exclusive OS lock on ``FOLDER/.lock`` (``fcntl.flock``).

The kernel releases the lock when its process dies, however it dies (SIGKILL included), so a
killed run never leaves a stale lock behind. The lock file holds the holder's pid and what it
is doing, for the refusal message of a second writer. Locks are re-entrant within a process:
a command that holds its run folder can call stages that take the same lock again.
On systems without ``fcntl`` (Windows) folders are not locked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hsae.errors import HSAEError
from hsae.layout import LOCK_FILE

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_held: dict[str, tuple[int, list[str]]] = {}  # resolved folder -> (descriptor, purposes)
_guard = threading.Lock()


class FolderInUseError(HSAEError, RuntimeError):
    """Another process holds the folder's lock."""

    def __init__(self, folder: Path, holder: str):
        self.folder = folder
        self.holder = holder
        who = f"another hsae process ({holder})" if holder else "another hsae process"
        super().__init__(f"{folder} is in use by {who}; wait for it to finish or stop it")


def holder_of(folder: str | os.PathLike[str]) -> str:
    """What the lock file of ``folder`` says about its holder ("pid N: purpose"), or ""."""
    try:
        return (Path(folder) / LOCK_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


@contextmanager
def folder_lock(folder: str | os.PathLike[str], purpose: str) -> Iterator[None]:
    """Hold the exclusive lock of an existing ``folder`` for the block; raise
    :class:`FolderInUseError` at once (no waiting) when another process holds it. The lock
    file names the innermost purpose (a command, then the stage it is in)."""
    root = Path(folder)
    key = str(root.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1].append(purpose)
            _describe(entry[0], purpose)
    if entry is None:
        fd = _acquire(root, purpose)
        with _guard:
            _held[key] = (fd, [purpose])
    try:
        yield
    finally:
        with _guard:
            fd, purposes = _held[key]
            purposes.pop()
            if purposes:
                _describe(fd, purposes[-1])
            else:
                del _held[key]
                _release(fd)


def _describe(fd: int, purpose: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}: {purpose}\n".encode(), 0)


def _acquire(root: Path, purpose: str) -> int:
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is None:  # pragma: no cover - Windows
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUseError(root, holder_of(root)) from None
    except OSError:
        os.close(fd)
        raise
    _describe(fd, purpose)
    return fd


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
