"""Self-describing run archives: one ``.tar.gz`` that carries a trained run to another machine.

This module owns the archive format. An archive holds one top folder (the run's name) with the
trained models (``hsae/``, ``baseline/``: weights, forest, config), ``run.json``, the metrics,
summary, timings, training logs, report and plots when present, and ``archive.json``: format
version, hsae version, the run's provenance (model, layer, context size, dataset, activation
scale) and the sha256 of every file. The activation cache and the training checkpoints stay
behind. After :func:`extract_archive`, ``hsae.load(folder)`` and
``hsae.load(folder, which="baseline")`` load the models and ``hsae export`` works on the folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

from hsae.interop.saelens import InteropError, run_provenance, trained_models
from hsae.io import atomic_path, read_json, write_with
from hsae.model.hsae import CONFIG_FILE

ARCHIVE_FORMAT = "hsae-run-archive"
ARCHIVE_FORMAT_VERSION = 1
ARCHIVE_FILE = "archive.json"
CARRIED_FILES = ("run.json", "metrics.json", "summary.md", "timings.json", "report.html")
CARRIED_FOLDERS = ("hsae", "baseline", "logs", "plots", "report")


def export_archive(run_dir: str | Path, out: str | Path) -> Path:
    """Write the run folder's models, settings and results to the ``.tar.gz`` file ``out``."""
    folder = Path(run_dir)
    if "hsae" not in trained_models(folder):
        raise InteropError(f"{folder} holds no trained model (no hsae/{CONFIG_FILE})")
    files = _carried_files(folder)
    manifest = _archive_manifest(folder, files)
    top = folder.resolve().name
    target = Path(out)
    with atomic_path(target) as tmp, tarfile.open(tmp, "w:gz") as tar:
        _add_bytes(tar, f"{top}/{ARCHIVE_FILE}", _json_bytes(manifest))
        for relative in files:
            _add_bytes(tar, f"{top}/{relative}", (folder / relative).read_bytes())
    return target


def _carried_files(folder: Path) -> list[str]:
    files = [name for name in CARRIED_FILES if (folder / name).is_file()]
    for sub in CARRIED_FOLDERS:
        if (folder / sub).is_dir():
            files += sorted(
                path.relative_to(folder).as_posix()
                for path in (folder / sub).rglob("*")
                if path.is_file() and not path.name.startswith(".")
            )
    return files


def _archive_manifest(folder: Path, files: list[str]) -> dict[str, Any]:
    from hsae import __version__

    provenance = run_provenance(folder).as_dict()
    model_config = read_json(folder / "hsae" / CONFIG_FILE).get("config", {})
    provenance["activation_scale"] = model_config.get("activation_scale")
    return {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_FORMAT_VERSION,
        "hsae_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": folder.resolve().name,
        "provenance": provenance,
        "files": {name: _sha256((folder / name).read_bytes()) for name in files},
    }


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack ``archive`` under ``dest`` after checking every member; return the run folder.

    Refuses links, absolute or parent-relative paths, files not listed in ``archive.json``,
    checksum mismatches and a destination that already holds the run.
    """
    path = Path(archive)
    if not path.is_file():
        raise InteropError(f"{path} does not exist")
    try:
        with tarfile.open(path, "r:gz") as tar:
            contents = _read_members(tar, path)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise InteropError(f"{path} is not a readable .tar.gz archive: {error}") from None
    top, files = _check_contents(path, contents)
    root = Path(dest) / top
    if root.exists() and any(root.iterdir()):
        raise InteropError(f"{root} already exists and is not empty; choose another destination")
    for name, data in files.items():
        write_with(root / name, lambda tmp, data=data: tmp.write_bytes(data))
    return root


def _read_members(tar: tarfile.TarFile, path: Path) -> dict[PurePosixPath, bytes]:
    contents = {}
    for member in tar.getmembers():
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or len(name.parts) < 2:
            raise InteropError(f"{path}: unsafe member path {member.name!r}")
        if member.isdir():
            continue
        if not member.isfile():
            raise InteropError(f"{path}: member {member.name!r} is not a regular file")
        handle = tar.extractfile(member)
        if handle is None:
            raise InteropError(f"{path}: member {member.name!r} cannot be read")
        contents[name] = handle.read()
    return contents


def _check_contents(
    path: Path, contents: dict[PurePosixPath, bytes]
) -> tuple[str, dict[str, bytes]]:
    """The top folder and the files to write below it, once the archive checks out."""
    tops = {name.parts[0] for name in contents}
    if len(tops) != 1:
        raise InteropError(f"{path}: expected one top folder, found {sorted(tops)}")
    top = tops.pop()
    found = {PurePosixPath(*name.parts[1:]).as_posix(): data for name, data in contents.items()}
    raw = found.pop(ARCHIVE_FILE, None)
    if raw is None:
        raise InteropError(f"{path} is not an hsae run archive (no {ARCHIVE_FILE})")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InteropError(f"{path}: {ARCHIVE_FILE} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise InteropError(f"{path}: {ARCHIVE_FILE} does not describe an hsae run archive")
    if int(manifest.get("format_version", 0)) > ARCHIVE_FORMAT_VERSION:
        raise InteropError(
            f"{path}: archive format {manifest['format_version']} is newer than this hsae "
            f"reads ({ARCHIVE_FORMAT_VERSION}); upgrade hsae"
        )
    listed = dict(manifest.get("files") or {})
    if set(found) != set(listed):
        odd = sorted(set(found) ^ set(listed))
        raise InteropError(f"{path}: members and {ARCHIVE_FILE} disagree on {odd[:3]}")
    for name, data in found.items():
        if _sha256(data) != listed[name]:
            raise InteropError(f"{path}: {name} is corrupt (sha256 mismatch)")
    return top, found | {ARCHIVE_FILE: raw}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
