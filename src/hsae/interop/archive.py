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
import os
import shutil
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import IO, Any

from hsae.interop.saelens import InteropError, run_provenance, trained_models
from hsae.io import (
    atomic_path,
    check_output_path,
    current_umask,
    sha256_file,
    staging_folder,
)
from hsae.layout import (
    ARCHIVE_RECORD,
    LOGS_DIR,
    METRICS_FILE,
    MODEL_NAMES,
    PLOTS_DIR,
    REPORT_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
)
from hsae.model.hsae import CONFIG_FILE, saved_activation_scale

ARCHIVE_FORMAT = "hsae-run-archive"
ARCHIVE_FORMAT_VERSION = 1
ARCHIVE_FILE = ARCHIVE_RECORD
CARRIED_FILES = (RUN_FILE, METRICS_FILE, SUMMARY_FILE, TIMINGS_FILE, REPORT_FILE)
CARRIED_FOLDERS = (*MODEL_NAMES, LOGS_DIR, PLOTS_DIR, "report")
MAX_MANIFEST_BYTES = 16 << 20
"""archive.json lists a few hundred files; a larger one is refused unread."""
MAX_MEMBERS = 100_000
_CHUNK = 1 << 20


def export_archive(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the run folder's models, settings and results to the ``.tar.gz`` file ``out``.

    An existing ``out`` is refused unless ``overwrite``; a run folder's own files never are
    written over. The archive appears only once complete (temporary file + rename).
    """
    folder = Path(run_dir)
    if "hsae" not in trained_models(folder):
        raise InteropError(f"{folder} holds no trained model (no hsae/{CONFIG_FILE})")
    target = check_output_path(out, overwrite=overwrite, runs=[folder])
    files = _carried_files(folder)
    manifest = _archive_manifest(folder, files)
    top = folder.resolve().name
    with atomic_path(target) as tmp, tarfile.open(tmp, "w:gz") as tar:
        _add_bytes(tar, f"{top}/{ARCHIVE_FILE}", _json_bytes(manifest))
        for relative in files:
            path = folder / relative
            with open(path, "rb") as handle:
                info = tarfile.TarInfo(f"{top}/{relative}")
                info.size = manifest["sizes"][relative]
                info.mtime = int(path.stat().st_mtime)
                info.mode = 0o644
                tar.addfile(info, handle)
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
    provenance["activation_scale"] = saved_activation_scale(folder / "hsae")
    return {
        "format": ARCHIVE_FORMAT,
        "format_version": ARCHIVE_FORMAT_VERSION,
        "hsae_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": folder.resolve().name,
        "provenance": provenance,
        "files": {name: sha256_file(folder / name) for name in files},
        "sizes": {name: (folder / name).stat().st_size for name in files},
    }


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Unpack ``archive`` under ``dest`` after checking every member; return the run folder.

    Refuses links and other special members, absolute or parent-relative paths, files not
    listed in ``archive.json``, sizes that disagree with it or exceed the free disk space,
    checksum mismatches, a destination that already holds the run, and a destination that is
    (or lies below) a symbolic link. Members are streamed to a hidden staging folder beside
    the run folder (never held in memory) and the folder is renamed into place once every
    checksum matched; files keep their declared permissions within the umask.
    """
    path = Path(archive)
    if not path.is_file():
        raise InteropError(f"{path} does not exist")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members, top = _check_headers(tar, path)
            manifest = _read_manifest(tar, members[ARCHIVE_FILE], path)
            listed = _check_listing(path, manifest, members)
            root = _check_destination(Path(dest), top, members)
            with staging_folder(root) as stage:
                for name, member in members.items():
                    _extract_member(tar, member, stage, name, listed.get(name), path)
                _finish(stage, members)
                if root.exists():
                    root.rmdir()  # empty (checked); the rename needs the name free
                os.replace(stage, root)
    except (tarfile.TarError, EOFError, ValueError) as error:
        if isinstance(error, InteropError):
            raise
        raise InteropError(f"{path} is not a readable .tar.gz archive: {error}") from None
    except OSError as error:
        raise InteropError(f"cannot extract {path}: {error}") from None
    return root


def _check_headers(tar: tarfile.TarFile, path: Path) -> tuple[dict[str, tarfile.TarInfo], str]:
    """Every member's header (read without its data): the regular files by name below the top
    folder, and the top folder's name."""
    files: dict[str, tarfile.TarInfo] = {}
    tops = set()
    for count, member in enumerate(iter(tar.next, None)):
        if count >= MAX_MEMBERS:
            raise InteropError(f"{path}: more than {MAX_MEMBERS} members; not an hsae archive")
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise InteropError(f"{path}: unsafe member path {member.name!r}")
        tops.add(name.parts[0])
        if len(tops) > 1:
            raise InteropError(f"{path}: expected one top folder, found {sorted(tops)}")
        if member.isdir():
            continue
        if not member.isfile():
            raise InteropError(f"{path}: member {member.name!r} is not a regular file")
        if len(name.parts) < 2:
            raise InteropError(f"{path}: unsafe member path {member.name!r}")
        relative = PurePosixPath(*name.parts[1:]).as_posix()
        if relative in files:
            raise InteropError(f"{path}: member {member.name!r} appears twice")
        files[relative] = member
    if not tops:
        raise InteropError(f"{path} is empty")
    if ARCHIVE_FILE not in files:
        raise InteropError(f"{path} is not an hsae run archive (no {ARCHIVE_FILE})")
    return files, tops.pop()


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> dict[str, Any]:
    if member.size > MAX_MANIFEST_BYTES:
        raise InteropError(f"{path}: {ARCHIVE_FILE} is {member.size} bytes; not an hsae archive")
    handle = tar.extractfile(member)
    if handle is None:
        raise InteropError(f"{path}: {ARCHIVE_FILE} cannot be read")
    try:
        manifest = json.loads(handle.read(member.size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InteropError(f"{path}: {ARCHIVE_FILE} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise InteropError(f"{path}: {ARCHIVE_FILE} does not describe an hsae run archive")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or version > ARCHIVE_FORMAT_VERSION:
        raise InteropError(
            f"{path}: archive format {version!r} is not one this hsae reads "
            f"(<= {ARCHIVE_FORMAT_VERSION}); upgrade hsae"
        )
    return manifest


def _check_listing(
    path: Path, manifest: dict[str, Any], members: dict[str, tarfile.TarInfo]
) -> dict[str, str]:
    """The listed sha256 per file, once names and sizes agree with the headers."""
    listed = manifest.get("files") or {}
    sizes = manifest.get("sizes") or {}
    if not isinstance(listed, dict) or not isinstance(sizes, dict):
        raise InteropError(f"{path}: {ARCHIVE_FILE} 'files' and 'sizes' must be objects")
    found = set(members) - {ARCHIVE_FILE}
    if found != set(listed):
        odd = sorted(found ^ set(listed))
        raise InteropError(f"{path}: members and {ARCHIVE_FILE} disagree on {odd[:3]}")
    for name, size in sizes.items():
        if name in members and members[name].size != size:
            raise InteropError(
                f"{path}: {name} is corrupt ({members[name].size} bytes in the archive, {size} "
                f"in {ARCHIVE_FILE})"
            )
    return {str(name): str(digest) for name, digest in listed.items()}


def _check_destination(dest: Path, top: str, members: dict[str, tarfile.TarInfo]) -> Path:
    root = dest / top
    for place in (dest, root):
        if place.is_symlink():
            raise InteropError(
                f"{place} is a symbolic link; extract into a real folder (links could send the "
                "files elsewhere)"
            )
    if dest.exists() and not dest.is_dir():
        raise InteropError(f"{dest} is a file, not a folder")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InteropError(f"{root} already exists and is not empty; choose another destination")
    dest.mkdir(parents=True, exist_ok=True)
    needed = sum(member.size for member in members.values())
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise InteropError(
            f"the archive unpacks to {needed / 1e9:.2f} GB but {dest} has {free / 1e9:.2f} GB free"
        )
    return root


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    stage: Path,
    name: str,
    expected: str | None,
    path: Path,
) -> None:
    """Stream one member to ``stage/name``, hashing as it goes; ``expected``: its sha256."""
    target = stage / name
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tar.extractfile(member)
    if handle is None:
        raise InteropError(f"{path}: member {member.name!r} cannot be read")
    digest, written = _copy(handle, target)
    if written != member.size:
        raise InteropError(f"{path}: member {member.name!r} is truncated")
    if expected is not None and digest != expected:
        raise InteropError(f"{path}: {name} is corrupt (sha256 mismatch)")
    # The declared mode within the umask; the owner can always read what was extracted.
    os.chmod(target, (member.mode & 0o777 & ~current_umask()) | 0o400)


def _copy(source: IO[bytes], target: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    written = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(target, flags, 0o600), "wb") as out:
        for block in iter(lambda: source.read(_CHUNK), b""):
            digest.update(block)
            out.write(block)
            written += len(block)
    return digest.hexdigest(), written


def _finish(stage: Path, members: dict[str, tarfile.TarInfo]) -> None:
    """Give the staged folders the permissions ``mkdir`` would have given them."""
    mode = 0o777 & ~current_umask()
    for folder in {p for name in members for p in (stage / name).parents if p != stage.parent}:
        if folder.is_relative_to(stage):
            os.chmod(folder, mode)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode("utf-8")
