"""Crash-safe file writing: every file hsae writes goes through a temporary file and a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
