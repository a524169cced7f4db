"""Crash-safe file writing: every file hsae writes goes through a temporary file and a rename.

Also the file-level guarantees shared by every writer (see docs/reliability.md):

* permissions: a written file gets ``0o666 & ~umask`` (like ``open(..., "w")``), not the
  ``0o600`` of a bare ``mkstemp``;
* leftovers: temporary files are named ``.NAME.<host>-<pid>-<random>.tmp`` (staging folders
  ``... .partial``); the first write of a process into a folder removes the ones whose writer
  is provably gone (same host, process no longer alive) and, for those this rule cannot
  decide (another host; an older hsae's ``.NAME.xxxxxxxx.tmp`` beside NAME), the ones
  untouched for :data:`STALE_AFTER_S`. Nothing else is ever removed;
* checksums: :func:`sha256_file` is the one checksum of the package;
* outputs: :func:`check_output_path` refuses to replace an existing file unless asked, and
  never lets anything be written over a run folder's own files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from hsae.errors import HSAEError
from hsae.layout import RUN_FILE, RUN_OWNED

STALE_AFTER_S = 3600.0
"""Temporaries whose writer cannot be identified are removed once untouched this long."""
RUN_MARKER = RUN_FILE

_CHUNK = 1 << 20
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(
    r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|partial)$"
)
_LEGACY_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
"""``mkstemp(prefix=".NAME.", suffix=".tmp")``: what hsae's atomic writes were named before."""
_cleaned: set[Path] = set()
_cleaned_lock = threading.Lock()


class OutputPathError(HSAEError, ValueError):
    """An output path that would replace something without being asked to, or a run's own file."""


# --- checksums and permissions --------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # No /proc (macOS): create a probe file with mode 0o777 and see what the kernel kept.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o777))
        return 0o777 & ~os.stat(probe).st_mode


def _temp_name(target: Path, kind: str) -> Path:
    token = secrets.token_hex(4)
    return target.with_name(f".{target.name}.{_HOST}-{os.getpid()}-{token}.{kind}")


# --- atomic writes ----------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int = 0o666) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file ends with permissions ``mode & ~umask``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target.parent)
    tmp = _temp_name(target, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, mode & 0o777 & ~current_umask())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staging_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``target`` to build a folder in; it is removed after
    the block (move what it holds into place inside the block, e.g. with :func:`swap_in`).
    A kill leaves only the hidden ``.partial`` folder, which a later write removes."""
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final.parent)
    stage = _temp_name(final, "partial")
    stage.mkdir(mode=0o700)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def swap_in(built: Path, target: Path) -> None:
    """Move the folder ``built`` to ``target``, replacing an existing ``target`` folder; the old
    one is moved aside first, so ``target`` is at every moment either the old or the new one
    (or, for an instant after a kill, absent: never a mix)."""
    os.chmod(built, 0o777 & ~current_umask())
    if not target.exists():
        os.replace(built, target)
    else:
        aside = _temp_name(target, "partial")
        os.replace(target, aside)
        os.replace(built, target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(target.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
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


# --- leftovers --------------------------------------------------------------------------------


def clean_stale_temporaries(folder: str | os.PathLike[str], force: bool = False) -> list[Path]:
    """Remove temporaries a killed writer left in ``folder`` (see the module docstring); runs
    once per folder per process unless ``force``. Returns what was removed."""
    root = Path(folder)
    key = root.absolute()
    with _cleaned_lock:
        if key in _cleaned and not force:
            return []
        _cleaned.add(key)
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    now = time.time()
    for entry in entries:
        if not _is_stale(root, entry, now):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _is_stale(root: Path, entry: os.DirEntry[str], now: float) -> bool:
    """Ours and provably abandoned. Anything not named by hsae is never touched; an older
    hsae's name only beside the file it was written for (``.NAME.xxxxxxxx.tmp`` next to NAME)."""
    named = _TEMP_NAME.match(entry.name)
    if named is not None and named["host"] == _HOST:
        pid = int(named["pid"])
        return pid != os.getpid() and not _alive(pid)
    if named is None:
        legacy = _LEGACY_TEMP.match(entry.name)
        if legacy is None or not (root / legacy["target"]).exists():
            return False
        if not entry.is_file(follow_symlinks=False):
            return False
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# --- output paths -----------------------------------------------------------------------------


def check_output_path(
    target: str | os.PathLike[str],
    overwrite: bool = False,
    folder: bool = False,
    runs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse an output path before anything is written.

    Always refused: a path below a regular file, a file where a folder is wanted (or the
    reverse), and a run folder's own entries (``hsae.layout.RUN_OWNED``) of any run in
    ``runs`` or of any folder above ``target`` holding ``run.json``. Refused unless
    ``overwrite``: an existing file, or an existing non-empty folder.
    """
    path = Path(target)
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"cannot write {path}: {parent} is a file, not a folder")
    owner = run_owning(path, runs)
    if owner is not None:
        raise OutputPathError(
            f"{path} is part of the run folder {owner}; hsae never writes over a run's own "
            "files (choose another output path)"
        )
    if path.is_symlink() and not path.exists():
        raise OutputPathError(f"{path} is a dangling symbolic link; remove it or choose another")
    if not path.exists():
        return path
    if folder and not path.is_dir():
        raise OutputPathError(f"{path} is a file; the output must be a folder")
    if not folder and path.is_dir():
        raise OutputPathError(f"{path} is a folder; the output must be a file name")
    if folder and not any(path.iterdir()):
        return path
    if not overwrite:
        raise OutputPathError(
            f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    return path


def run_owning(
    path: str | os.PathLike[str], runs: Iterable[str | os.PathLike[str]] = ()
) -> Path | None:
    """The run folder whose own entry ``path`` is (or lies in, or contains), else None."""
    resolved = Path(path).resolve()
    candidates = [Path(run).resolve() for run in runs]
    candidates += [p for p in resolved.parents if (p / RUN_MARKER).is_file()]
    if (resolved / RUN_MARKER).is_file():
        candidates.append(resolved)
    for run in candidates:
        if resolved == run:
            return run
        try:
            relative = resolved.relative_to(run)
        except ValueError:
            continue
        if relative.parts and relative.parts[0] in RUN_OWNED:
            return run
    return None


# --- writers ----------------------------------------------------------------------------------


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Atomically create ``path`` by calling ``writer(tmp_path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    write_with(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    write_with(path, _save)


def write_bundle(
    folder: str | os.PathLike[str], name: str, tensors: dict[str, torch.Tensor], meta: Any
) -> Path:
    """Write ``NAME.safetensors`` then ``NAME.json`` into ``folder``; the JSON is written last,
    so its presence marks a complete bundle."""
    root = Path(folder)
    write_safetensors(root / f"{name}.safetensors", tensors)
    write_json(root / f"{name}.json", meta)
    return root


def read_bundle(
    folder: str | os.PathLike[str], name: str
) -> tuple[dict[str, torch.Tensor], Any] | None:
    """The tensors and JSON of a bundle written by :func:`write_bundle`; None when incomplete."""
    root = Path(folder)
    if not (root / f"{name}.json").is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(root / f"{name}.safetensors")), read_json(root / f"{name}.json")
