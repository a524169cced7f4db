"""Harvesting with several processes (``torchrun --nproc-per-node N -m hsae harvest ...``).

The rows of a cache are a function of the settings alone: every process tokenises the same
document stream (cheap next to the model) and places each token in the global row sequence with
the same rule as a single-process harvest (train rows until the train target, then held-out rows
from the next context on). Row i of a split belongs to shard ``i // shard_tokens`` of that split
(held-out shards are numbered after the train shards), exactly the shards a single process
writes, and shard k is harvested by process ``k % world_size``: it runs the model only on the
batches that hold rows of its own shards. So the set of rows, the shards and the train / held-out
split do not depend on the number of processes.

Each process writes its shard files and then, atomically, a small record ``shards/<stem>.json``;
a process killed and restarted (any number of processes) redoes only the shards without a record.
When every process is done, rank 0 writes the complete manifest (the same as a single process
writes, plus ``"parallel": true``) and removes the records. See docs/scale.md."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from hsae import distributed
from hsae.activations.cache import (
    SHARD_DIR,
    SPLITS,
    TOKEN_COLUMNS,
    ActivationCache,
    CacheError,
    ShardWriter,
    _open_shard,
    _sha256,
    read_manifest,
    remove_cache,
    row_norm_sum,
    scale_for,
    storage_dtype,
    storage_finite,
    to_storage,
    training_mean_norm,
)
from hsae.activations.harvest import (
    HarvestConfig,
    _check_same_settings,
    _existing_manifest,
    _new_manifest,
    _place,
    _Placement,
    _progress_bar,
    _rows_left,
    batch_meta,
    batch_rows,
    check_free_disk,
    check_manifest_matches,
    check_writable,
    context_batches,
    first_batch_or_error,
    folder_bytes,
)
from hsae.activations.models import (
    HarvestError,
    LanguageModel,
    load_language_model,
    validate_layer,
)

RECORD_SUFFIX = ".json"


def harvest_parallel(
    config: HarvestConfig,
    root: Path,
    overwrite: bool = False,
    progress: bool = True,
    lm: LanguageModel | None = None,
    on_progress: Callable[[], None] | None = None,
    solo: bool = False,
) -> ActivationCache:
    """This process's part of a multi-process harvest: every process of the torchrun group must
    call it. ``solo`` runs it as the only process even inside a process group (e.g. rank 0
    alone finishing a multi-process harvest, while the other processes wait elsewhere)."""
    if solo:
        return _harvest_parallel(config, root, overwrite, progress, lm, on_progress, True)
    joined = not distributed.is_distributed() and distributed.init()
    try:
        return _harvest_parallel(config, root, overwrite, progress, lm, on_progress, False)
    finally:
        if joined:
            distributed.destroy()


def _harvest_parallel(
    config: HarvestConfig,
    root: Path,
    overwrite: bool,
    progress: bool,
    lm: LanguageModel | None,
    on_progress: Callable[[], None] | None,
    solo: bool,
) -> ActivationCache:
    rank, world = (0, 1) if solo else (distributed.rank(), distributed.world_size())
    model = _agree(lambda: _load(config, root, lm), "loading the model", solo)
    layer = config.layer if config.layer is not None else model.n_layers // 2
    if rank == 0:
        prepare = lambda: _prepare(config, root, overwrite, model, layer)  # noqa: E731
        _agree(prepare, "preparing the cache", solo)
    else:
        _agree(lambda: None, "preparing the cache", solo)
    manifest = read_manifest(root)
    if manifest.get("status") != "complete":
        _agree(
            lambda: _harvest_own_shards(
                config, root, manifest, model, layer, rank, world, progress, on_progress
            ),
            "harvesting",
            solo,
        )
        if rank == 0:
            _agree(lambda: _complete(config, root), "writing the manifest", solo)
        else:
            _agree(lambda: None, "writing the manifest", solo)
    return ActivationCache(root)


def _agree(step: Callable[[], Any], what: str, solo: bool) -> Any:
    """Run `step` on every process; if it fails anywhere, every process raises (the one that
    failed its own error), so no process waits forever on the others."""
    error: BaseException | None = None
    result = None
    try:
        result = step()
    except Exception as exc:  # re-raised below, after the others know
        error = exc
    if not solo and not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise HarvestError(f"another process failed while {what}; see its error message")
    if error is not None:
        raise error
    return result


def _device(config: HarvestConfig) -> str | None:
    """One device per process: cuda means cuda:LOCAL_RANK under torchrun."""
    import torch

    wanted = config.device
    if wanted is None and torch.cuda.is_available():
        wanted = "cuda"
    if wanted == "cuda" and distributed.world_size() > 1:
        return f"cuda:{distributed.local_rank()}"
    return wanted


def _load(config: HarvestConfig, root: Path, lm: LanguageModel | None) -> LanguageModel:
    check_writable(root)
    device = _device(config)
    if device is not None:
        from hsae.devices import device_problem

        problem = device_problem(device)
        if problem is not None:
            raise HarvestError(f"device: {problem}")
    if lm is None:
        lm = load_language_model(config.model, device=device)
    layer = config.layer if config.layer is not None else lm.n_layers // 2
    validate_layer(lm, layer)
    return lm


def _prepare(
    config: HarvestConfig, root: Path, overwrite: bool, lm: LanguageModel, layer: int
) -> None:
    """Rank 0: check (or remove with overwrite) an existing cache and the free disk, and write
    the in-progress manifest the other processes read."""
    existing = None if overwrite else _existing_manifest(root)
    if existing is not None:
        check_manifest_matches(existing, config, root)
        _check_same_settings(existing, config, layer)
        if existing.get("status") == "complete":
            return
        existing["n_tokens"] = {
            split: sum(r["n_tokens"] for r in _records(root, existing) if r["split"] == split)
            for split in SPLITS
        }
    reclaim = folder_bytes(root) if overwrite else 0
    rows = _rows_left(existing, config, overwrite)
    check_free_disk(root, rows, lm.d_model, config.dtype, reclaim)
    if overwrite:
        remove_cache(root)
    if existing is None:
        ShardWriter.create(root, {**_new_manifest(config, lm, layer), "parallel": True})
    elif not existing.get("parallel"):
        # a single-process harvest, killed: its recorded shards are the same shards; go on
        existing["parallel"] = True
        ShardWriter(root, existing)._write_manifest()


# --------------------------------------------------------------------------- records


def _stem(split: str, index: int) -> str:
    return f"{SHARD_DIR}/{split}-{index:05d}"


def _records(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Finished shards: those in the manifest (a single-process start) and those with a record
    file whose shard files are present with the recorded shape."""
    from hsae.io import read_json

    found = {int(s["index"]): s for s in manifest.get("shards", [])}
    for path in sorted((root / SHARD_DIR).glob(f"*{RECORD_SUFFIX}")):
        try:
            entry = read_json(path)
            _open_shard(root, manifest, entry)
        except (OSError, ValueError, KeyError, TypeError, CacheError):
            continue  # files missing or torn: the shard is harvested again
        found[int(entry["index"])] = entry
    return [found[k] for k in sorted(found)]


@dataclass
class _Buffer:
    split: str
    acts: np.ndarray
    meta: np.ndarray
    filled: int = 0
    resume: dict[str, int] = field(default_factory=dict)


def _harvest_own_shards(
    config: HarvestConfig,
    root: Path,
    manifest: dict[str, Any],
    lm: LanguageModel,
    layer: int,
    rank: int,
    world: int,
    progress: bool,
    on_progress: Callable[[], None] | None,
) -> None:
    size = config.shard_tokens
    n_train_shards = math.ceil(config.train_tokens / size)
    planned = n_train_shards + math.ceil(config.heldout_tokens / size)
    done = {int(r["index"]) for r in _records(root, manifest)}
    todo = {k for k in range(rank, planned, world) if k not in done}
    storage = storage_dtype(config.dtype)
    has_bos = lm.bos_token_id is not None
    totals = {"train": config.train_tokens, "heldout": config.heldout_tokens}

    def shard_at(split: str, row: int) -> tuple[int, int]:
        first = 0 if split == "train" else n_train_shards
        return first + row // size, row % size

    def new_buffer(split: str, index: int) -> _Buffer:
        first = index if split == "train" else index - n_train_shards
        rows = min(size, totals[split] - first * size)
        return _Buffer(
            split,
            np.empty((rows, lm.d_model), storage),
            np.empty((rows, len(TOKEN_COLUMNS)), np.int64),
        )

    buffers: dict[int, _Buffer] = {}
    state = _Placement(done=0, last_train_context=None)
    seen = dict.fromkeys(SPLITS, 0)
    batches = context_batches(
        lm, config.dataset, config.context_length, config.batch_size, config.seed
    )
    batches = chain([first_batch_or_error(batches, config.dataset)], batches)
    bar = _progress_bar(config.tokens, 0, progress and rank == 0)
    try:
        for index, batch in enumerate(batches):
            if state.done >= config.tokens or not todo:
                break
            _, meta = batch_meta(batch, has_bos)
            before = state.done
            placed = _place(config, meta, 0, state)[:2]
            pieces = []
            for split, (lo, hi) in zip(SPLITS, placed, strict=True):
                row, seen[split] = seen[split], seen[split] + hi - lo
                while lo < hi:
                    shard, offset = shard_at(split, row)
                    take = min(hi - lo, size - offset)
                    if shard in todo:
                        pieces.append((shard, split, lo, lo + take, offset))
                    lo, row = lo + take, row + take
            bar.update(state.done - before)
            if not pieces:
                continue
            acts = to_storage(batch_rows(lm, layer, batch, has_bos)[0], config.dtype)
            for shard, split, lo, hi, offset in pieces:
                if shard not in buffers:
                    buffers[shard] = new_buffer(split, shard)
                buffer = buffers[shard]
                buffer.acts[offset : offset + hi - lo] = acts[lo:hi]
                buffer.meta[offset : offset + hi - lo] = meta[lo:hi]
                buffer.filled += hi - lo
                buffer.resume = {"batch": index, "row": hi}
                if buffer.filled == len(buffer.acts):
                    _write_shard(root, config, shard, buffers.pop(shard), rank, world)
                    todo.discard(shard)
            if on_progress is not None:
                on_progress()
        # the corpus ran out: the shard holding the last rows is shorter than planned
        for shard, buffer in buffers.items():
            if buffer.filled:
                _write_shard(root, config, shard, buffer, rank, world)
    finally:
        bar.close()


def _write_shard(
    root: Path, config: HarvestConfig, index: int, buffer: _Buffer, rank: int, world: int
) -> None:
    from hsae.io import write_json, write_npy

    acts, meta = buffer.acts[: buffer.filled], buffer.meta[: buffer.filled]
    if not storage_finite(acts, config.dtype):
        raise HarvestError(
            f"non-finite activations (overflow in {config.dtype} storage?); use dtype float32"
        )
    stem = _stem(buffer.split, index)
    write_npy(root / f"{stem}.acts.npy", acts)
    write_npy(root / f"{stem}.tokens.npy", meta)
    entry = {
        "index": index,
        "split": buffer.split,
        "acts": f"{stem}.acts.npy",
        "tokens": f"{stem}.tokens.npy",
        "n_tokens": int(buffer.filled),
        "sha256": _sha256(root / f"{stem}.acts.npy"),
        "tokens_sha256": _sha256(root / f"{stem}.tokens.npy"),
        "norm_sum": row_norm_sum(acts, config.dtype),
        "resume": buffer.resume,
        "written_by": {"rank": rank, "world_size": world},
    }
    write_json(root / f"{stem}{RECORD_SUFFIX}", entry)


def _complete(config: HarvestConfig, root: Path) -> None:
    """Rank 0, after every process is done: the complete manifest from the shard records."""
    manifest = read_manifest(root)
    shards = _records(root, manifest)
    indices = [int(s["index"]) for s in shards]
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise HarvestError(
            f"{root}: shards {missing[:5]} were not harvested; run the harvest again to resume"
        )
    stored = {split: sum(s["n_tokens"] for s in shards if s["split"] == split) for split in SPLITS}
    manifest["shards"] = shards
    manifest["n_tokens"] = stored
    manifest["mean_norm"] = training_mean_norm(shards)
    manifest["scale"] = scale_for(int(manifest["d_model"]), manifest["mean_norm"])
    if sum(stored.values()) < config.tokens:
        manifest["corpus_exhausted"] = True
        warnings.warn(
            f"the dataset ran out after {sum(stored.values())} of {config.tokens} tokens",
            stacklevel=3,
        )
    manifest["status"] = "complete"
    writer = ShardWriter(root, manifest)
    writer._write_manifest()
    writer._drop_unrecorded_files()  # the records, and files of a killed process
