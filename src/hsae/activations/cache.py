"""The on-disk activation cache: sharded .npy files + manifest.json, the crash-safe resumable shard
writer, checksum verification, and the seeded shuffling reader (train / held-out splits,
state_dict for exact resumption)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.activations.models import HarvestError
from hsae.io import read_json, write_json, write_npy

FORMAT = "hsae-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SPLITS = ("train", "heldout")
TOKEN_COLUMNS = ("token_id", "doc_id", "context_id", "position")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
"""bfloat16 is stored as its raw 16 bits (numpy has no bfloat16: .npy files of uint16)."""


class CacheError(HarvestError):
    """An activation cache is missing, incompatible, corrupted or truncated."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def training_mean_norm(shards: list[dict[str, Any]]) -> float:
    """Mean L2 norm of the training rows, from the per-shard norm sums of the manifest."""
    train = [s for s in shards if s["split"] == "train"]
    count = sum(s["n_tokens"] for s in train)
    return sum(s["norm_sum"] for s in train) / count if count else 0.0


def scale_for(d_model: int, mean_norm: float) -> float:
    """The constant c with c * mean_norm = sqrt(d_model) (1 when nothing is known yet)."""
    return math.sqrt(d_model) / mean_norm if mean_norm > 0 else 1.0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CacheError(f"split must be one of {SPLITS}, got {split!r}")


# --------------------------------------------------------------------------- storage dtypes


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype of the shard files for a manifest dtype."""
    if name not in STORAGE_DTYPES:
        raise CacheError(f"cache dtype must be one of {STORAGE_DTYPES}, got {name!r}")
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def to_storage(acts: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Float rows in the storage form of `name` (bfloat16: round to nearest even, raw bits)."""
    if name == "bfloat16":
        tensor = torch.as_tensor(acts).to(torch.bfloat16)
        return tensor.view(torch.int16).numpy().view(np.uint16)
    array = acts.numpy() if isinstance(acts, torch.Tensor) else acts
    return array.astype(storage_dtype(name), copy=False)


def as_float32(raw: np.ndarray, name: str) -> np.ndarray:
    """Stored rows as a new float32 array."""
    if name == "bfloat16":
        out = np.empty(np.shape(raw), dtype=np.float32)
        bits = out.view(np.uint32)
        bits[...] = raw
        bits <<= 16
        return out
    return np.array(raw, dtype=np.float32)


def storage_finite(raw: np.ndarray, name: str) -> bool:
    if name == "bfloat16":
        return not bool(((raw & 0x7F80) == 0x7F80).any())
    return bool(np.isfinite(raw).all())


class Bfloat16Rows:
    """A memory-mapped bfloat16 shard seen as float32 rows: indexing converts what it reads."""

    dtype = np.dtype(np.float32)

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw
        self.shape = raw.shape

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, key: Any) -> np.ndarray:
        return as_float32(self.raw[key], "bfloat16")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = as_float32(self.raw, "bfloat16")
        return out if dtype is None else out.astype(dtype, copy=False)


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class ResumePoint:
    """Where harvesting continues: the first `row` kept rows of model batch `batch` are stored."""

    batch: int
    row: int


class ShardWriter:
    """Buffers activation rows and their token metadata, writes fixed-size shards atomically and
    records each one (with sha256 checksums and its resume point) in the manifest after the shard
    files are durable. A crash loses at most the rows of the unfinished shard, which are
    re-harvested from the last recorded resume point."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.shard_tokens = int(manifest["shard_tokens"])
        self.d_model = int(manifest["d_model"])
        self.dtype_name = str(manifest["dtype"])
        self.dtype = storage_dtype(self.dtype_name)
        self._acts = np.empty((self.shard_tokens, self.d_model), dtype=self.dtype)
        self._meta = np.empty((self.shard_tokens, len(TOKEN_COLUMNS)), dtype=np.int64)
        self._filled = 0
        self._split = "train"

    @classmethod
    def create(cls, root: Path, manifest: dict[str, Any]) -> ShardWriter:
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        manifest = {**manifest, "status": "in_progress", "shards": [], "created": _now()}
        manifest["n_tokens"] = dict.fromkeys(SPLITS, 0)
        writer = cls(root, manifest)
        writer._write_manifest()
        return writer

    @classmethod
    def resume(cls, root: Path) -> ShardWriter:
        manifest = read_manifest(root)
        writer = cls(root, manifest)
        writer._drop_unrecorded_files()
        if manifest["shards"]:
            _verify_shard(root, manifest, manifest["shards"][-1])
        return writer

    @property
    def resume_point(self) -> ResumePoint:
        shards = self.manifest["shards"]
        if not shards:
            return ResumePoint(0, 0)
        return ResumePoint(**shards[-1]["resume"])

    def stored(self, split: str) -> int:
        return int(self.manifest["n_tokens"][split])

    def last_context(self, split: str) -> int | None:
        """Context id of the last stored row of `split` (None when nothing is stored yet)."""
        shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not shards:
            return None
        _, meta = _open_shard(self.root, self.manifest, shards[-1])
        return int(meta[-1, TOKEN_COLUMNS.index("context_id")])

    def append(
        self, split: str, acts: np.ndarray, meta: np.ndarray, batch: int, first_row: int
    ) -> None:
        """Add rows `first_row ..` of model batch `batch` (float rows, or rows already in the
        storage form of `to_storage`); shards are flushed as they fill up."""
        if acts.dtype != self.dtype:
            acts = to_storage(acts, self.dtype_name)
        if split != self._split and self._filled:
            self.flush(ResumePoint(batch, first_row))
        self._split = split
        offset = 0
        while offset < len(acts):
            take = min(self.shard_tokens - self._filled, len(acts) - offset)
            self._acts[self._filled : self._filled + take] = acts[offset : offset + take]
            self._meta[self._filled : self._filled + take] = meta[offset : offset + take]
            self._filled += take
            offset += take
            if self._filled == self.shard_tokens:
                self.flush(ResumePoint(batch, first_row + offset))

    def flush(self, resume: ResumePoint) -> None:
        if not self._filled:
            return
        acts, meta = self._acts[: self._filled], self._meta[: self._filled]
        if not storage_finite(acts, self.dtype_name):
            raise HarvestError(
                f"non-finite activations (overflow in {self.dtype_name} storage?); "
                "use dtype float32"
            )
        index = len(self.manifest["shards"])
        stem = f"{SHARD_DIR}/{self._split}-{index:05d}"
        write_npy(self.root / f"{stem}.acts.npy", acts)
        write_npy(self.root / f"{stem}.tokens.npy", meta)
        entry = {
            "index": index,
            "split": self._split,
            "acts": f"{stem}.acts.npy",
            "tokens": f"{stem}.tokens.npy",
            "n_tokens": int(self._filled),
            "sha256": _sha256(self.root / f"{stem}.acts.npy"),
            "tokens_sha256": _sha256(self.root / f"{stem}.tokens.npy"),
            "norm_sum": row_norm_sum(acts, self.dtype_name),
            "resume": {"batch": resume.batch, "row": resume.row},
        }
        self.manifest["shards"].append(entry)
        self.manifest["n_tokens"][self._split] += int(self._filled)
        self._filled = 0
        self._update_scale()
        self._write_manifest()

    def finish(self, resume: ResumePoint) -> None:
        self.flush(resume)
        self.manifest["status"] = "complete"
        self._write_manifest()

    def _update_scale(self) -> None:
        self.manifest["mean_norm"] = training_mean_norm(self.manifest["shards"])
        self.manifest["scale"] = scale_for(self.d_model, self.manifest["mean_norm"])

    def _write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        write_json(self.root / MANIFEST, self.manifest)

    def _drop_unrecorded_files(self) -> None:
        """Remove shard files a crash left behind before their manifest entry was written."""
        recorded = {s[key] for s in self.manifest["shards"] for key in ("acts", "tokens")}
        for path in (self.root / SHARD_DIR).glob("*"):
            if path.is_file() and f"{SHARD_DIR}/{path.name}" not in recorded:
                path.unlink()
        for path in self.root.glob(f".{MANIFEST}.*.tmp"):
            path.unlink()


def row_norm_sum(raw: np.ndarray, name: str) -> float:
    """Sum of the L2 norms of stored rows (float64 accumulation)."""
    return float(np.linalg.norm(as_float32(raw, name).astype(np.float64), axis=1).sum())


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root} is not an activation cache: {MANIFEST} is missing")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not an hsae activation-cache manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheError(f"{path}: unsupported cache version {manifest.get('version')!r}")
    return manifest


def remove_cache(root: Path) -> None:
    """Delete an existing cache folder (only if it is one, or empty) for --overwrite."""
    if not root.exists():
        return
    if not root.is_dir():
        raise CacheError(f"output path {root} exists and is not a folder")
    if any(root.iterdir()) and not (root / MANIFEST).is_file():
        raise CacheError(
            f"refusing to overwrite {root}: it is not empty and not an activation cache"
        )
    shutil.rmtree(root)


# --------------------------------------------------------------------------- verification


def _verify_shard(root: Path, manifest: dict[str, Any], shard: dict[str, Any]) -> None:
    for key, sum_key in (("acts", "sha256"), ("tokens", "tokens_sha256")):
        path = root / shard[key]
        if not path.is_file():
            raise CacheError(f"shard file {path} is missing")
        if _sha256(path) != shard[sum_key]:
            raise CacheError(
                f"shard file {path} is corrupted (sha256 mismatch with the manifest); "
                "re-harvest with --overwrite"
            )
    _open_shard(root, manifest, shard)


def _open_shard(
    root: Path, manifest: dict[str, Any], shard: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    expected = {
        "acts": ((shard["n_tokens"], manifest["d_model"]), storage_dtype(manifest["dtype"])),
        "tokens": ((shard["n_tokens"], len(TOKEN_COLUMNS)), np.dtype(np.int64)),
    }
    arrays = []
    for key, (shape, dtype) in expected.items():
        path = root / shard[key]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CacheError(f"shard file {path} is truncated or unreadable ({exc})") from exc
        if array.shape != shape or array.dtype != dtype:
            raise CacheError(
                f"shard file {path} holds {array.dtype}{list(array.shape)}, "
                f"the manifest says {dtype}{list(shape)}"
            )
        arrays.append(array)
    return arrays[0], arrays[1]


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TokenInfo:
    """Per activation row: token id, document index, context index and position in the context."""

    token_ids: np.ndarray
    doc_ids: np.ndarray
    context_ids: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


class ActivationCache:
    """A harvested activation cache (see docs/activations.md for the layout)."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self._verified: set[int] = set()
        self._tokenizer: Any = None
        self._token_info: dict[str, TokenInfo] = {}

    @property
    def scale(self) -> float:
        """Multiply raw activations by this to bring the mean L2 norm of the training rows to
        sqrt(d_model). Held-out rows never enter it (caches written before that rule stored a
        scale over both splits; it is recomputed here from the shards' recorded norms)."""
        shards = self.manifest["shards"]
        if shards and all("norm_sum" in s for s in shards):
            return scale_for(self.d_model, training_mean_norm(shards))
        return float(self.manifest["scale"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> str:
        """Storage dtype: float32, float16 or bfloat16 (rows are always read as float32)."""
        return str(self.manifest["dtype"])

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    def n_tokens(self, split: str = "train") -> int:
        _check_split(split)
        return int(self.manifest["n_tokens"][split])

    def shards(self, split: str = "train") -> list[dict[str, Any]]:
        _check_split(split)
        return [s for s in self.manifest["shards"] if s["split"] == split]

    def verify(self) -> None:
        """Check every shard (presence, sha256, shape, dtype); raise CacheError if one is bad."""
        for shard in self.manifest["shards"]:
            _verify_shard(self.root, self.manifest, shard)
            self._verified.add(shard["index"])

    def open_shard(
        self, shard: dict[str, Any], verify: bool = True, raw: bool = False
    ) -> tuple[Any, np.ndarray]:
        """Memory-mapped (activations, token metadata) of one shard, checksummed on first use.
        A bfloat16 shard's activations come as a Bfloat16Rows view (indexing it gives float32)
        unless `raw` asks for the stored uint16 bits."""
        if verify and shard["index"] not in self._verified:
            _verify_shard(self.root, self.manifest, shard)
            self._verified.add(shard["index"])
        acts, meta = _open_shard(self.root, self.manifest, shard)
        if self.dtype == "bfloat16" and not raw:
            return Bfloat16Rows(acts), meta
        return acts, meta

    def reader(
        self,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        shuffle_buffer: int = 32768,
        loop: bool = True,
        scaled: bool = False,
        drop_last: bool = False,
        mix_shards: int = 16,
        prefetch: int = 2,
        rank: int = 0,
        world_size: int = 1,
    ) -> ActivationReader:
        """The shuffling, prefetching reader of one split (see ActivationReader); `rank` and
        `world_size` give each data-parallel process its own disjoint stream."""
        return ActivationReader(
            self,
            batch_size,
            split,
            seed,
            shuffle_buffer,
            loop,
            scaled,
            drop_last,
            mix_shards=mix_shards,
            prefetch=prefetch,
            rank=rank,
            world_size=world_size,
        )

    def all_activations(self, split: str = "heldout", scaled: bool = False) -> torch.Tensor:
        """Every activation of a split as one float32 tensor [n, d] (meant for small splits)."""
        shards = self.shards(split)
        parts = [as_float32(self.open_shard(s, raw=True)[0], self.dtype) for s in shards]
        acts = np.concatenate(parts) if parts else np.zeros((0, self.d_model), np.float32)
        tensor = torch.from_numpy(acts)
        return tensor * self.scale if scaled else tensor

    def token_info(self, split: str = "train") -> TokenInfo:
        """Token metadata aligned with the rows of `all_activations(split)` / the shard order
        (loaded once per split and kept: 32 bytes per row)."""
        if split not in self._token_info:
            parts = [np.asarray(self.open_shard(s)[1]) for s in self.shards(split)]
            meta = np.concatenate(parts) if parts else np.zeros((0, len(TOKEN_COLUMNS)), np.int64)
            columns = (np.ascontiguousarray(meta[:, i]) for i in range(len(TOKEN_COLUMNS)))
            self._token_info[split] = TokenInfo(*columns)
        return self._token_info[split]

    def context_tokens(
        self, row: int, split: str = "train", before: int = 16, after: int = 4
    ) -> tuple[np.ndarray, int]:
        """Token ids of the context window around activation `row` (same context only) and the
        index of the row's own token inside that window."""
        info = self.token_info(split)
        if not 0 <= row < len(info):
            raise CacheError(f"row {row} is out of range for split {split!r} ({len(info)} rows)")
        lo, hi = max(0, row - before), min(len(info), row + after + 1)
        same = info.context_ids[lo:hi] == info.context_ids[row]
        ids = info.token_ids[lo:hi][same]
        return ids, int(same[: row - lo].sum())

    def context_text(
        self,
        row: int,
        split: str = "train",
        before: int = 16,
        after: int = 4,
        tokenizer: Any = None,
    ) -> tuple[str, str, str]:
        """(text before, the row's token, text after) around activation `row`, decoded with the
        harvest model's tokenizer (loaded on first use unless one is passed)."""
        ids, at = self.context_tokens(row, split, before, after)
        tok = tokenizer if tokenizer is not None else self._load_tokenizer()
        return (
            tok.decode(ids[:at].tolist()),
            tok.decode(ids[at : at + 1].tolist()),
            tok.decode(ids[at + 1 :].tolist()),
        )

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from hsae.activations.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.manifest["model"]["name"])
        return self._tokenizer


class ActivationReader:
    """Iterator of float32 [batch, d] tensors over one split of a cache.

    Order: the split's shards are cut into chunks of ``ceil(shuffle_buffer / mix_shards)``
    contiguous rows. Per epoch the chunks are permuted (seeded by seed, epoch) and grouped
    ``mix_shards`` at a time into blocks of about ``shuffle_buffer`` rows, so one block mixes rows
    of up to ``mix_shards`` shards from anywhere in the cache; each block's rows are permuted
    (seeded by seed, epoch, block). ``shuffle_buffer=0`` reads in storage order.

    Reading: chunks are contiguous reads of memory-mapped shard files. With ``prefetch > 0`` two
    background threads work ahead of the consumer: one reads up to ``prefetch`` blocks (in their
    storage dtype), the other cuts them into float32 batches (up to ``ready_batches`` of them),
    so ``next()`` only hands over a finished batch and training does not wait on the disk while
    it computes. Memory: about ``(prefetch + 2) x shuffle_buffer x d x bytes per stored value``
    plus ``ready_batches x batch_size x d x 4``. An error in a thread (a corrupted shard, ...) is
    raised by ``next()``. ``prefetch=0`` does everything in the calling thread.

    The stream is a pure function of (seed, rank, world_size, position), so ``state_dict()`` is
    tiny (the rows handed over so far, not those prefetched) and ``load_state_dict()`` resumes
    the exact batch sequence.

    Several processes (data-parallel training): ``rank=r, world_size=w`` gives process r the
    blocks g = r, r + w, r + 2w, ... of the global block sequence (epoch after epoch), so the w
    streams are disjoint within each pass over the data and together cover every row once per
    pass; each process reads only its own blocks. ``world_size=1`` is the plain stream. A state
    saved by one rank resumes only on the same rank and world size.

    ``loop=True`` runs epoch after epoch forever (batches may straddle epochs); ``loop=False``
    makes a single pass (the blocks of epoch 0 that belong to this rank; ranks may then get
    different numbers of batches) whose last batch may be smaller (or is dropped with
    ``drop_last``). ``close()`` (or a ``with`` block) stops the threads early; they are daemon
    threads and also stop when the reader is garbage-collected."""

    def __init__(
        self,
        cache: ActivationCache,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        shuffle_buffer: int = 32768,
        loop: bool = True,
        scaled: bool = False,
        drop_last: bool = False,
        mix_shards: int = 16,
        prefetch: int = 2,
        rank: int = 0,
        world_size: int = 1,
        ready_batches: int = 4,
    ) -> None:
        _check_split(split)
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("mix_shards", mix_shards, 1),
            ("prefetch", prefetch, 0),
            ("world_size", world_size, 1),
            ("ready_batches", ready_batches, 1),
        ):
            if value < low:
                raise CacheError(f"{name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise CacheError(f"rank must be in [0, {world_size - 1}] (world_size), got {rank}")
        self.cache, self.batch_size, self.split, self.seed = cache, batch_size, split, seed
        self.shuffle_buffer, self.loop, self.scaled, self.drop_last = (
            shuffle_buffer,
            loop,
            scaled,
            drop_last,
        )
        self.mix_shards = mix_shards if shuffle_buffer > 0 else 1
        self.prefetch, self.rank, self.world_size = prefetch, rank, world_size
        self.ready_batches = ready_batches
        self.shards = cache.shards(split)
        self.sizes = np.array([s["n_tokens"] for s in self.shards], dtype=np.int64)
        self.n_rows = int(self.sizes.sum())
        if self.n_rows == 0:
            raise CacheError(f"split {split!r} of {cache.root} has no activations")
        if shuffle_buffer > 0:
            self.chunk_rows = max(1, math.ceil(shuffle_buffer / self.mix_shards))
        else:
            self.chunk_rows = max(batch_size, 65536)
        shard_of, lo, hi = [], [], []
        for index, size in enumerate(self.sizes.tolist()):
            starts = np.arange(0, size, self.chunk_rows, dtype=np.int64)
            shard_of.append(np.full(len(starts), index, dtype=np.int64))
            lo.append(starts)
            hi.append(np.minimum(starts + self.chunk_rows, size))
        self._chunk_shard = np.concatenate(shard_of)
        self._chunk_lo, self._chunk_hi = np.concatenate(lo), np.concatenate(hi)
        self.n_blocks = math.ceil(len(self._chunk_lo) / self.mix_shards)
        self.position = 0
        self._epochs: dict[int, np.ndarray] = {}
        self._source: Iterator[torch.Tensor] | _Pipe | None = None
        self._finite_rows = (
            None if loop else sum(self._block_size(m) for m in range(self._finite_blocks()))
        )

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __len__(self) -> int:
        if self._finite_rows is None:
            raise TypeError("a looping reader has no length")
        full, rest = divmod(self._finite_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __next__(self) -> torch.Tensor:
        if self._source is None:
            if self.prefetch == 0:
                self._source = self._batches(self.position)
            else:
                # The threads work on a copy, so they keep no reference to this reader: a reader
                # dropped without close() is garbage-collected and its __del__ stops them.
                worker, start = copy.copy(self), self.position
                self._source = _Pipe(
                    lambda: worker._batches(start), self.ready_batches, "hsae-cache-batches"
                )
        batch = next(self._source)
        self.position += len(batch)
        return batch * self.cache.scale if self.scaled else batch

    def __enter__(self) -> ActivationReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the background threads (iterating again restarts them where it stopped)."""
        source, self._source = getattr(self, "_source", None), None
        if isinstance(source, _Pipe):
            source.close()

    # -- the stream: rank block m is global block g = rank + m * world_size
    def _global(self, m: int) -> tuple[int, int]:
        return divmod(self.rank + m * self.world_size, self.n_blocks)

    def _finite_blocks(self) -> int:
        return max(0, math.ceil((self.n_blocks - self.rank) / self.world_size))

    def _chunk_order(self, epoch: int) -> np.ndarray:
        n_chunks = len(self._chunk_lo)
        if self.shuffle_buffer == 0:
            return np.arange(n_chunks)
        return np.random.default_rng([self.seed, epoch]).permutation(n_chunks)

    def _block_size(self, m: int) -> int:
        epoch, block = self._global(m)
        if epoch not in self._epochs:
            sizes = (self._chunk_hi - self._chunk_lo)[self._chunk_order(epoch)]
            block_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), self.mix_shards))
            self._epochs = {k: v for k, v in self._epochs.items() if k >= epoch - 1}
            self._epochs[epoch] = block_sizes
        return int(self._epochs[epoch][block])

    def _batches(self, position: int) -> Iterator[torch.Tensor]:
        """float32 batches from `position` on (in the batch thread when prefetching)."""
        m, start = 0, 0
        while start + self._block_size(m) <= position:
            start += self._block_size(m)
            m += 1
        last = None if self._finite_rows is None else self._finite_blocks()
        ms = itertools.count(m) if last is None else iter(range(m, last))
        loads = (self._load_block(k) for k in ms)
        blocks: Iterator[tuple[np.ndarray, np.ndarray | None]] = (
            _Pipe(lambda: loads, self.prefetch, "hsae-cache-blocks") if self.prefetch else loads
        )
        try:
            raw, order = next(blocks)
            offset = position - start
            while True:
                want = self.batch_size
                if self._finite_rows is not None:
                    left = self._finite_rows - position
                    if left <= 0 or (self.drop_last and left < want):
                        return
                    want = min(want, left)
                parts = []
                while want:
                    if offset == len(raw):
                        raw, order = next(blocks)
                        offset = 0
                    take = min(want, len(raw) - offset)
                    rows = (
                        raw[offset : offset + take]
                        if order is None
                        else raw[order[offset : offset + take]]
                    )
                    parts.append(as_float32(rows, self.cache.dtype))
                    offset, want = offset + take, want - take
                batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
                position += len(batch)
                yield torch.from_numpy(batch)
        finally:
            if isinstance(blocks, _Pipe):
                blocks.close()

    def _load_block(self, m: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored rows of rank block m (in the block thread when prefetching) and their order."""
        epoch, block = self._global(m)
        chunks = self._chunk_order(epoch)[block * self.mix_shards : (block + 1) * self.mix_shards]
        sizes = self._chunk_hi[chunks] - self._chunk_lo[chunks]
        raw = np.empty(
            (int(sizes.sum()), self.cache.d_model), dtype=storage_dtype(self.cache.dtype)
        )
        at = 0
        for chunk, size in zip(chunks.tolist(), sizes.tolist(), strict=True):
            acts, _ = self.cache.open_shard(self.shards[self._chunk_shard[chunk]], raw=True)
            lo = int(self._chunk_lo[chunk])
            raw[at : at + size] = acts[lo : lo + size]
            at += size
        if not self.shuffle_buffer:
            return raw, None
        return raw, np.random.default_rng([self.seed, epoch, block]).permutation(len(raw))

    # -- resumption
    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "split": self.split,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "n_rows": self.n_rows,
            "loop": self.loop,
            "mix_shards": self.mix_shards,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        defaults = {"rank": 0, "world_size": 1}
        for key in ("seed", "split", "shuffle_buffer", "n_rows", "mix_shards", *defaults):
            saved = state.get(key, defaults.get(key, getattr(self, key)))
            if saved != getattr(self, key):
                raise CacheError(
                    f"reader state has {key}={saved!r} but this reader has "
                    f"{key}={getattr(self, key)!r}"
                )
        self.close()
        self.position = int(state["position"])


_END = object()


class _Pipe:
    """Runs an iterator on a daemon thread, `depth` items ahead, behind a bounded queue; it is
    itself an iterator of the same items, and re-raises the thread's error in the consumer."""

    def __init__(self, source: Callable[[], Iterator[Any]], depth: int, name: str) -> None:
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _run(self, source: Callable[[], Iterator[Any]]) -> None:
        iterator = None
        try:
            iterator = source()
            for item in iterator:
                if not self._put((item, None)):
                    return
            self._put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((None, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's finally blocks (its own pipes) run here

    def _put(self, item: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            try:
                item, error = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise CacheError("a reader thread stopped without a word") from None
        if error is not None:
            self._done = True
            raise error
        if item is _END:
            self._done = True
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
