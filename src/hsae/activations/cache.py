"""The on-disk activation cache: sharded .npy files + manifest.json, the crash-safe resumable shard
writer, checksum verification, and the seeded shuffling reader (train / held-out splits,
state_dict for exact resumption)."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Iterator
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
STORAGE_DTYPES = ("float32", "float16")


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
        self.dtype = np.dtype(manifest["dtype"])
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
        """Add rows `first_row ..` of model batch `batch`; shards are flushed as they fill up."""
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
        if not np.isfinite(acts).all():
            raise HarvestError(
                f"non-finite activations (overflow in {self.dtype.name} storage?); "
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
            "norm_sum": float(np.linalg.norm(acts.astype(np.float64), axis=1).sum()),
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
        "acts": ((shard["n_tokens"], manifest["d_model"]), np.dtype(manifest["dtype"])),
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
        self, shard: dict[str, Any], verify: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (activations, token metadata) of one shard, checksummed on first use."""
        if verify and shard["index"] not in self._verified:
            _verify_shard(self.root, self.manifest, shard)
            self._verified.add(shard["index"])
        return _open_shard(self.root, self.manifest, shard)

    def reader(
        self,
        batch_size: int,
        split: str = "train",
        seed: int = 0,
        shuffle_buffer: int = 32768,
        loop: bool = True,
        scaled: bool = False,
        drop_last: bool = False,
    ) -> ActivationReader:
        return ActivationReader(
            self, batch_size, split, seed, shuffle_buffer, loop, scaled, drop_last
        )

    def all_activations(self, split: str = "heldout", scaled: bool = False) -> torch.Tensor:
        """Every activation of a split as one float32 tensor [n, d] (meant for small splits)."""
        parts = [np.asarray(self.open_shard(s)[0], dtype=np.float32) for s in self.shards(split)]
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

    Order: per epoch, a seeded permutation of the split's shards; their rows, concatenated, are cut
    into blocks of `shuffle_buffer` rows and each block is permuted (seeded by seed, epoch, block).
    Only one block is in memory at a time. The stream is a pure function of (seed, position), so
    `state_dict()` is tiny and `load_state_dict()` resumes the exact batch sequence.
    `loop=True` runs epoch after epoch forever (batches may straddle epochs); `loop=False` makes a
    single pass whose last batch may be smaller (or is dropped with `drop_last`).
    `shuffle_buffer=0` reads in storage order."""

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
    ) -> None:
        _check_split(split)
        if batch_size < 1:
            raise CacheError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise CacheError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.cache, self.batch_size, self.split, self.seed = cache, batch_size, split, seed
        self.shuffle_buffer, self.loop, self.scaled, self.drop_last = (
            shuffle_buffer,
            loop,
            scaled,
            drop_last,
        )
        self.shards = cache.shards(split)
        self.sizes = np.array([s["n_tokens"] for s in self.shards], dtype=np.int64)
        self.n_rows = int(self.sizes.sum())
        if self.n_rows == 0:
            raise CacheError(f"split {split!r} of {cache.root} has no activations")
        self.block_size = shuffle_buffer if shuffle_buffer > 0 else max(batch_size, 65536)
        self.position = 0
        self._block_key: tuple[int, int] | None = None
        self._block: np.ndarray = np.zeros((0, cache.d_model), np.float32)

    # -- iteration
    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("a looping reader has no length")
        full, rest = divmod(self.n_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __next__(self) -> torch.Tensor:
        want = self.batch_size
        if not self.loop:
            left = self.n_rows - self.position
            if left <= 0 or (self.drop_last and left < want):
                raise StopIteration
            want = min(want, left)
        parts = []
        while want:
            part = self._take(want)
            parts.append(part)
            want -= len(part)
        batch = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
        return batch * self.cache.scale if self.scaled else batch

    def _take(self, want: int) -> np.ndarray:
        epoch, offset = divmod(self.position, self.n_rows)
        block, start = divmod(offset, self.block_size)
        data = self._load_block(epoch, block)
        count = min(want, len(data) - start)
        self.position += count
        return data[start : start + count]

    # -- blocks
    def _shard_order(self, epoch: int) -> np.ndarray:
        if self.shuffle_buffer == 0:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _load_block(self, epoch: int, block: int) -> np.ndarray:
        if self._block_key == (epoch, block):
            return self._block
        order = self._shard_order(epoch)
        ends = np.cumsum(self.sizes[order])
        starts = ends - self.sizes[order]
        lo, hi = block * self.block_size, min((block + 1) * self.block_size, self.n_rows)
        pieces = []
        for k in np.flatnonzero((starts < hi) & (ends > lo)):
            acts, _ = self.cache.open_shard(self.shards[order[k]])
            a, b = max(lo, starts[k]) - starts[k], min(hi, ends[k]) - starts[k]
            pieces.append(np.asarray(acts[a:b], dtype=np.float32))
        data = np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0], copy=True)
        if self.shuffle_buffer:
            data = data[np.random.default_rng([self.seed, epoch, block]).permutation(len(data))]
        self._block_key, self._block = (epoch, block), data
        return data

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split", "shuffle_buffer", "n_rows"):
            if state.get(key) != getattr(self, key):
                raise CacheError(
                    f"reader state has {key}={state.get(key)!r} but this reader has "
                    f"{key}={getattr(self, key)!r}"
                )
        self.position = int(state["position"])
