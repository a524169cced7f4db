"""Harvesting: the validated HarvestConfig, the resumable harvest loop that fills an activation
cache, and the cache-free streaming source that yields activation batches from the model."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hsae.activations.cache import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TOKEN_COLUMNS,
    ActivationCache,
    CacheError,
    ResumePoint,
    ShardWriter,
    read_manifest,
    remove_cache,
    storage_dtype,
    to_storage,
)
from hsae.activations.corpora import (
    BUILTIN_NAMES,
    DEFAULT_TEXT_FIELD,
    ContextBatch,
    ContextBuilder,
    CorpusError,
    open_corpus,
)
from hsae.activations.models import (
    EMBEDDED_ALIASES,
    EMBEDDED_MODEL,
    HarvestError,
    LanguageModel,
    capture_residual,
    check_capture,
    load_language_model,
    model_description,
)

# Settings that must match for a harvest to resume into an existing cache.
_RESUME_KEYS = (
    "model",
    "layer",
    "dataset",
    "tokens",
    "context_length",
    "batch_size",
    "shard_tokens",
    "dtype",
    "heldout_fraction",
    "seed",
    "text_field",
)
# Keys added to _RESUME_KEYS after caches were written without them: their value in such caches.
_ADDED_KEY_DEFAULTS = {"text_field": DEFAULT_TEXT_FIELD}


class HarvestConfig(BaseModel):
    """What to harvest. `model`/`dataset` None mean the embedded Gemma 3 270M and the built-in
    WordNet corpus; `layer` None means the middle block (n_layers // 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    layer: int | None = Field(None, ge=0, le=1023)
    dataset: str | None = None
    tokens: int = Field(1_000_000, ge=1, le=10**12)
    context_length: int = Field(128, ge=2, le=1_048_576)
    batch_size: int = Field(32, ge=1, le=65_536)
    shard_tokens: int = Field(65_536, ge=1, le=16_777_216)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    device: str | None = None
    text_field: str = Field(DEFAULT_TEXT_FIELD, min_length=1)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise HarvestError(_one_line(exc)) from None

    @property
    def heldout_tokens(self) -> int:
        return int(round(self.tokens * self.heldout_fraction))

    @property
    def train_tokens(self) -> int:
        return self.tokens - self.heldout_tokens


def _one_line(exc: ValidationError) -> str:
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "config"
    return f"HarvestConfig.{field}: {error['msg']} (got {error.get('input')!r})"


# --------------------------------------------------------------------------- shared core


def document_stream(source: Iterable[str], seed: int, buffer: int = 4096) -> Iterator[str]:
    """Documents in a seeded order: consecutive runs of `buffer` documents are permuted."""
    iterator = iter(source)
    for index in range(2**62):
        chunk = list(islice(iterator, buffer))
        if not chunk:
            return
        order = np.random.default_rng([seed, index]).permutation(len(chunk))
        yield from (chunk[i] for i in order)


def context_batches(
    lm: LanguageModel,
    dataset: str | None,
    context_length: int,
    batch_size: int,
    seed: int,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> Iterator[ContextBatch]:
    """Deterministic stream of tokenised context batches for a dataset."""
    builder = ContextBuilder(lm.tokenizer, context_length, lm.bos_token_id, lm.pad_token_id)
    return builder.batches(document_stream(open_corpus(dataset, text_field), seed), batch_size)


def first_batch_or_error(batches: Iterator[ContextBatch], dataset: str | None) -> ContextBatch:
    first = next(batches, None)
    if first is None:
        raise CorpusError(f"dataset {dataset or 'builtin'!r} is empty: it yielded no text")
    return first


def batch_meta(batch: ContextBatch, has_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which positions of a batch are kept (real tokens: BOS and padding dropped) and the token
    metadata [n, 4] of the kept rows (see TOKEN_COLUMNS); needs no model."""
    keep = batch.attention_mask.astype(bool)
    if has_bos:
        keep[:, 0] = False
    n, length = keep.shape
    context_ids = np.broadcast_to(np.arange(n)[:, None] + batch.first_context, keep.shape)
    positions = np.broadcast_to(np.arange(length)[None, :], keep.shape)
    meta = np.stack(
        [batch.input_ids[keep], batch.doc_ids[keep], context_ids[keep], positions[keep]], axis=1
    )
    return keep, meta.astype(np.int64, copy=False)


def batch_rows(
    lm: LanguageModel, layer: int, batch: ContextBatch, has_bos: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """Activations after block `layer` for the real tokens of a batch (BOS and padding dropped),
    as float32 [n, d] on the CPU, and their token metadata [n, 4] (see TOKEN_COLUMNS)."""
    ids = torch.from_numpy(batch.input_ids)
    mask = torch.from_numpy(batch.attention_mask)
    hidden = capture_residual(lm, ids, mask, layer)
    keep, meta = batch_meta(batch, has_bos)
    acts = hidden[torch.from_numpy(keep).to(hidden.device)].float().cpu()
    return acts, meta


# --------------------------------------------------------------------------- harvest


def harvest(
    config: HarvestConfig,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    lm: LanguageModel | None = None,
    on_progress: Callable[[], None] | None = None,
    parallel: bool | None = None,
) -> ActivationCache:
    """Fill (or resume filling) the activation cache at `out_dir`; returns it once complete.

    Everything is validated (output folder, device, an existing cache's settings, model, layer,
    corpus) before anything is written. Re-running on the same folder resumes after the last
    complete shard; `overwrite` starts over. `on_progress` is called after each model batch.
    The free disk is checked against the cache's size first.

    `parallel`: every process of the torchrun group calls harvest() and harvests its own shards
    into the same cache (see hsae.activations.parallel and docs/scale.md); the rows, shards and
    split are the same as a single process's. None (the default) means: when launched by
    torchrun (WORLD_SIZE > 1). ``parallel=False`` harvests in this process alone, even under
    torchrun (what a caller that runs the harvest on rank 0 only must pass)."""
    from hsae import distributed

    root = Path(out_dir).expanduser()
    if parallel is None:
        parallel = distributed.launched()
    if parallel or _parallel_in_progress(root, overwrite):
        from hsae.activations.parallel import harvest_parallel

        return harvest_parallel(
            config, root, overwrite, progress, lm, on_progress, solo=not parallel
        )
    check_writable(root)
    if config.device is not None:
        from hsae.devices import device_problem

        problem = device_problem(config.device)
        if problem is not None:
            raise HarvestError(f"device: {problem}")
    existing = None if overwrite else _existing_manifest(root)
    if existing is not None:
        check_manifest_matches(existing, config, root)
        if existing.get("status") == "complete":
            return ActivationCache(root)
    lm = lm if lm is not None else load_language_model(config.model, device=config.device)
    layer = config.layer if config.layer is not None else lm.n_layers // 2
    check_capture(lm, layer)
    if existing is not None:
        _check_same_settings(existing, config, layer)
    check_free_disk(
        root,
        _rows_left(existing, config, overwrite),
        lm.d_model,
        config.dtype,
        folder_bytes(root) if overwrite else 0,
    )
    batches = context_batches(
        lm, config.dataset, config.context_length, config.batch_size, config.seed, config.text_field
    )
    batches = chain([first_batch_or_error(batches, config.dataset)], batches)
    if overwrite:
        remove_cache(root)
    if existing is None:
        writer = ShardWriter.create(root, _new_manifest(config, lm, layer))
    else:
        writer = ShardWriter.resume(root)
    _run_harvest(lm, layer, config, batches, writer, progress, on_progress)
    return ActivationCache(root)


def check_manifest_matches(
    manifest: dict[str, Any],
    config: HarvestConfig,
    root: Path,
    advice: str = "use --overwrite to start over or choose another --out",
) -> None:
    """Refuse a cache (complete or not) harvested with settings other than ``config``'s,
    naming the differing fields; needs no model (a default layer is the manifest's middle)."""
    try:
        middle = int(manifest["model"]["n_layers"]) // 2
        stored = manifest["config"]
        if not isinstance(stored, dict):
            raise TypeError("config is not a mapping")
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{root / MANIFEST} is malformed ({exc!r}); re-harvest it") from None
    layer = config.layer if config.layer is not None else middle
    _check_same_settings(manifest, config, layer, f"{root} holds a cache", advice)


def check_reusable(
    root: str | Path, model: str | None, layer: int | None, context_length: int
) -> dict[str, Any]:
    """The manifest of the complete cache at ``root``, once checked to hold the activations a run
    of ``model`` (None: the embedded one) at ``layer`` (None: the middle block) with contexts of
    ``context_length`` tokens wants; the other harvest settings (dataset, tokens, seed, ...) may
    differ. Raises CacheError in one line naming every mismatch."""
    root = Path(root).expanduser()
    manifest = read_manifest(root)
    if manifest.get("status") != "complete":
        raise CacheError(
            f"activation cache {root} is incomplete; finish it with hsae harvest --out {root} "
            "before training on it"
        )
    try:
        stored = manifest["config"]
        middle = int(manifest["model"]["n_layers"]) // 2
        have = {
            "model": stored["model"],
            "layer": int(manifest["layer"]),
            "context_length": int(manifest["context_length"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{root / MANIFEST} is malformed ({exc!r}); re-harvest it") from None
    want = {
        "model": EMBEDDED_MODEL if model is None or model in EMBEDDED_ALIASES else model,
        "layer": layer if layer is not None else middle,
        "context_length": context_length,
    }
    same = {k: have[k] == want[k] for k in have}
    same["model"] = _model_key(have["model"]) == _model_key(want["model"])
    differ = [f"{k} {have[k]!r} (cache) vs {want[k]!r} (run)" for k in have if not same[k]]
    if differ:
        raise CacheError(
            f"activation cache {root} does not match this run: {'; '.join(differ)}; "
            "train on a cache harvested with the run's model, layer and context length"
        )
    return manifest


def _model_key(name: Any) -> str:
    """A model name to compare: a local path resolved (``./m`` and ``m`` are one model)."""
    path = Path(str(name)).expanduser()
    return str(path.resolve()) if path.exists() else str(name)


def check_writable(root: Path) -> None:
    """Fail early (before loading anything) when `root` cannot become a cache folder."""
    if root.exists() and not root.is_dir():
        raise HarvestError(f"output path {root} exists and is not a folder")
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HarvestError(f"output path {root}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HarvestError(f"output path {root} is not writable ({probe} denies write access)")


def _parallel_in_progress(root: Path, overwrite: bool) -> bool:
    """An unfinished cache started by a multi-process harvest (resumed the same way)."""
    if overwrite or not (root / MANIFEST).is_file():
        return False
    manifest = read_manifest(root)
    return bool(manifest.get("parallel")) and manifest.get("status") != "complete"


def _rows_left(manifest: dict[str, Any] | None, config: HarvestConfig, overwrite: bool) -> int:
    if manifest is None or overwrite:
        return config.tokens
    return max(0, config.tokens - sum(int(n) for n in manifest["n_tokens"].values()))


def check_free_disk(root: Path, rows: int, d_model: int, dtype: str, reclaimable: int = 0) -> None:
    """Refuse (before anything is written) a harvest whose remaining rows would not fit on the
    disk: rows x (d_model x bytes per value + the token metadata) against the free space (plus
    `reclaimable`: the bytes of an old cache that --overwrite deletes first)."""
    per_row = d_model * storage_dtype(dtype).itemsize + 8 * len(TOKEN_COLUMNS)
    needed = rows * per_row
    probe = root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + reclaimable
    if needed > free:
        raise HarvestError(
            f"not enough free disk for the activation cache at {root}: it needs "
            f"{_size(needed)} more ({rows:,} rows x {d_model} x {dtype} + token metadata), "
            f"{_size(free)} is free; free some disk, lower --tokens or use --dtype bfloat16"
        )


def folder_bytes(root: Path) -> int:
    """Bytes of the files under `root` (0 when it does not exist)."""
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _existing_manifest(root: Path) -> dict[str, Any] | None:
    if not root.is_dir():
        return None
    if (root / MANIFEST).is_file():
        return read_manifest(root)
    if any(root.iterdir()):
        raise HarvestError(f"output folder {root} is not empty and holds no activation cache")
    return None


def _settings(config: HarvestConfig, layer: int) -> dict[str, Any]:
    values = config.model_dump()
    values["layer"] = layer
    if config.model is None or config.model in EMBEDDED_ALIASES:
        values["model"] = EMBEDDED_MODEL
    if config.dataset is None or config.dataset in BUILTIN_NAMES:
        values["dataset"] = "builtin"
    return {key: values[key] for key in _RESUME_KEYS}


def _check_same_settings(
    manifest: dict[str, Any],
    config: HarvestConfig,
    layer: int,
    what: str = "the output folder holds a cache",
    advice: str = "use --overwrite to start over or choose another --out",
) -> None:
    stored, wanted = manifest["config"], _settings(config, layer)
    stored = {k: stored.get(k, _ADDED_KEY_DEFAULTS.get(k)) for k in _RESUME_KEYS}
    differ = [
        f"{k}: {stored[k]!r} -> {wanted[k]!r}" for k in _RESUME_KEYS if stored[k] != wanted[k]
    ]
    if differ:
        raise CacheError(f"{what} harvested with other settings ({'; '.join(differ)}); {advice}")


def _new_manifest(config: HarvestConfig, lm: LanguageModel, layer: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model_description(lm),
        "layer": layer,
        "hook": f"residual stream after block {layer} (0-based) = hidden_states[{layer + 1}]",
        "dataset": open_corpus(config.dataset, config.text_field).describe(),
        "d_model": lm.d_model,
        "dtype": config.dtype,
        "context_length": config.context_length,
        "bos_prepended": lm.bos_token_id is not None,
        "bos_excluded": True,
        "shard_tokens": config.shard_tokens,
        "target_tokens": {"train": config.train_tokens, "heldout": config.heldout_tokens},
        "token_columns": list(TOKEN_COLUMNS),
        "scale": None,
        "scale_definition": "multiply raw activations by scale to get mean L2 norm sqrt(d_model)",
        "mean_norm": None,
        "config": _settings(config, layer),
    }


def _run_harvest(
    lm: LanguageModel,
    layer: int,
    config: HarvestConfig,
    batches: Iterator[ContextBatch],
    writer: ShardWriter,
    progress: bool,
    on_progress: Callable[[], None] | None = None,
) -> None:
    start = writer.resume_point
    state = _Placement(
        done=writer.stored("train") + writer.stored("heldout"),
        last_train_context=writer.last_context("train"),
    )
    has_bos = lm.bos_token_id is not None
    bar = _progress_bar(config.tokens, state.done, progress)
    point = start
    try:
        for index, batch in enumerate(batches):
            if state.done >= config.tokens:
                break
            if index < start.batch:
                continue  # already stored: only tokenised, never run through the model
            skip = start.row if index == start.batch else 0
            acts, meta = batch_rows(lm, layer, batch, has_bos)
            before = state.done
            consumed = _store_batch(
                writer, config, to_storage(acts, config.dtype), meta, index, skip, state
            )
            point = ResumePoint(index, consumed)
            bar.update(state.done - before)
            if on_progress is not None:
                on_progress()
        if state.done < config.tokens:
            writer.manifest["corpus_exhausted"] = True
            warnings.warn(
                f"the dataset ran out after {state.done} of {config.tokens} tokens", stacklevel=3
            )
        writer.finish(point)
    finally:
        bar.close()


@dataclass
class _Placement:
    """Rows stored so far (both splits) and the context of the last train row."""

    done: int
    last_train_context: int | None


def _store_batch(
    writer: ShardWriter,
    config: HarvestConfig,
    acts: np.ndarray,
    meta: np.ndarray,
    batch: int,
    first_row: int,
    state: _Placement,
) -> int:
    """Store rows `first_row ..` of one model batch (see _place). Returns the number of the
    batch's rows consumed."""
    train, heldout, row = _place(config, meta, first_row, state)
    for split, (lo, hi) in (("train", train), ("heldout", heldout)):
        if hi > lo:
            writer.append(split, acts[lo:hi], meta[lo:hi], batch, lo)
    return row


def _place(
    config: HarvestConfig, meta: np.ndarray, first_row: int, state: _Placement
) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Which rows `first_row ..` of one model batch go to the train split and which to the
    held-out split ((lo, hi) ranges of the batch's rows), from the token metadata alone: train
    rows until the train target is met, then held-out rows. The held-out split starts at a
    context boundary: the rest of the context that straddles the boundary is skipped. Updates
    `state`; the third value is the number of the batch's rows consumed."""
    row = first_row
    train = heldout = (row, row)
    train_left = config.train_tokens - state.done
    if train_left > 0 and row < len(meta):
        take = min(train_left, len(meta) - row)
        train = (row, row + take)
        state.last_train_context = int(meta[row + take - 1, _CONTEXT])
        state.done, row = state.done + take, row + take
    if state.done == config.train_tokens and state.last_train_context is not None:
        straddling = meta[row:, _CONTEXT] == state.last_train_context
        row += len(straddling) if straddling.all() else int(np.argmin(straddling))
    heldout_left = config.tokens - state.done
    if heldout_left > 0 and row < len(meta):
        take = min(heldout_left, len(meta) - row)
        heldout = (row, row + take)
        state.done, row = state.done + take, row + take
    return train, heldout, row


_CONTEXT = TOKEN_COLUMNS.index("context_id")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc="harvest",
        disable=not enabled,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------- streaming


class ActivationStream:
    """Activation batches [batch, d] (float32, CPU) harvested on the fly, no cache involved.

    Contexts are processed in blocks of whole model batches holding about `shuffle_buffer` tokens;
    each block's rows are permuted (seeded) and cut into batches, the remainder (< batch_size rows)
    is dropped. With `loop` the corpus restarts when it runs out. `state_dict()` records (epoch,
    block, batches emitted), and `load_state_dict()` resumes the exact sequence (skipped blocks
    are only tokenised, not run through the model). `scale` is estimated on the first block."""

    def __init__(
        self,
        lm: LanguageModel,
        layer: int,
        dataset: str | None,
        batch_size: int,
        context_length: int = 128,
        model_batch_size: int = 32,
        shuffle_buffer: int = 32768,
        seed: int = 0,
        loop: bool = True,
        scaled: bool = False,
        text_field: str = DEFAULT_TEXT_FIELD,
    ) -> None:
        check_capture(lm, layer)
        for name, value in (("batch_size", batch_size), ("model_batch_size", model_batch_size)):
            if value < 1:
                raise HarvestError(f"{name} must be >= 1, got {value}")
        self.lm, self.layer, self.dataset = lm, layer, dataset
        self.batch_size, self.context_length, self.seed = batch_size, context_length, seed
        self.model_batch_size, self.loop, self.scaled = model_batch_size, loop, scaled
        self.text_field = text_field
        self.has_bos = lm.bos_token_id is not None
        tokens_per_batch = model_batch_size * (context_length - (1 if self.has_bos else 0))
        self.batches_per_block = max(
            1, math.ceil(max(shuffle_buffer, batch_size) / tokens_per_batch)
        )
        self.shuffle = shuffle_buffer > 0
        self.scale: float | None = None
        self.epoch, self.block, self.emitted = 0, 0, 0
        self._source: Iterator[ContextBatch] | None = None
        self._rows: torch.Tensor | None = None
        first_batch_or_error(self._context_batches(), dataset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        while self._rows is None or (self.emitted + 1) * self.batch_size > len(self._rows):
            self._next_block()
        lo = self.emitted * self.batch_size
        self.emitted += 1
        batch = self._rows[lo : lo + self.batch_size]
        return batch * self.scale if self.scaled and self.scale is not None else batch

    def _context_batches(self) -> Iterator[ContextBatch]:
        return context_batches(
            self.lm,
            self.dataset,
            self.context_length,
            self.model_batch_size,
            self.seed,
            self.text_field,
        )

    def _next_block(self) -> None:
        if self._rows is not None:
            self.block, self.emitted = self.block + 1, 0
        self._rows = self._compute_block()

    def _compute_block(self) -> torch.Tensor:
        if self._source is None:
            self._source = islice(
                self._context_batches(), self.block * self.batches_per_block, None
            )
        chunk = list(islice(self._source, self.batches_per_block))
        if not chunk:
            if not self.loop:
                raise StopIteration
            self.epoch, self.block, self._source = self.epoch + 1, 0, None
            self._source = self._context_batches()
            chunk = list(islice(self._source, self.batches_per_block))
        rows = torch.cat([batch_rows(self.lm, self.layer, b, self.has_bos)[0] for b in chunk])
        if self.scale is None:
            self.scale = math.sqrt(rows.shape[1]) / float(rows.norm(dim=1).mean())
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch, self.block]).permutation(len(rows))
            rows = rows[torch.from_numpy(perm)]
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "block": self.block,
            "emitted": self.emitted if self._rows is not None else 0,
            "scale": self.scale,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size:
            raise HarvestError("stream state was saved with another seed or batch_size")
        self.epoch, self.block, self.scale = (
            int(state["epoch"]),
            int(state["block"]),
            state["scale"],
        )
        self._source = None
        self._rows = self._compute_block()
        self.emitted = int(state["emitted"])


def stream_activations(
    model_name: str | None = None,
    layer: int | None = None,
    dataset: str | None = None,
    batch_size: int = 4096,
    context_length: int = 128,
    model_batch_size: int = 32,
    shuffle_buffer: int = 32768,
    seed: int = 0,
    loop: bool = True,
    scaled: bool = False,
    device: str | None = None,
    lm: LanguageModel | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> ActivationStream:
    """Iterator of float32 [batch_size, d] activation tensors straight from the model (no cache).
    Pass an already loaded `lm` to skip loading `model_name`."""
    lm = lm if lm is not None else load_language_model(model_name, device=device)
    layer = layer if layer is not None else lm.n_layers // 2
    return ActivationStream(
        lm,
        layer,
        dataset,
        batch_size,
        context_length,
        model_batch_size,
        shuffle_buffer,
        seed,
        loop,
        scaled,
        text_field,
    )
