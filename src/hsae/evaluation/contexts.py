"""Feature contexts from an activation cache: what the explorer and the LLM judges both read.

One vectorised pass (:func:`scan`) over the first rows of a cache split keeps, per feature, its
firing count, how often it fires with its parent, the tokens it fires on most, its top-k
activations and a weighted sample of its activations (Efraimidis-Spirakis keys ``log(u) / a``,
kept by the same top-k merge chunk by chunk, so the draw is without replacement and in
proportion to activation). :func:`context_windows` and :func:`window_activations` then cut the
token windows around chosen rows and read a feature's activation on each of their tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hsae.model import HSAE


def feature_key(level: int, index: int) -> str:
    """The key of feature ``index`` of ``level`` in the report's and judges' JSON ("L:I")."""
    return f"{level}:{index}"


# --------------------------------------------------------------------------- reading rows


class RowSource:
    """Raw activation rows of one cache split, read shard by shard (memory-mapped)."""

    def __init__(self, cache: Any, split: str) -> None:
        self.cache = cache
        self.shards = cache.shards(split)
        sizes = [int(shard["n_tokens"]) for shard in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, limit: int, size: int) -> Iterator[tuple[int, Tensor]]:
        """(first row, float32 rows) for rows [0, limit) in chunks of at most ``size``."""
        for index, shard in enumerate(self.shards):
            start, stop = int(self.offsets[index]), min(int(self.offsets[index + 1]), limit)
            if start >= stop:
                break
            acts = self.cache.open_shard(shard)[0]
            for lo in range(start, stop, size):
                hi = min(lo + size, stop)
                block = np.array(acts[lo - start : hi - start], dtype=np.float32)
                yield lo, torch.from_numpy(block)

    def gather(self, rows: np.ndarray) -> Tensor:
        """Rows [len(rows), d] in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.cache.d_model), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for index in np.unique(shard_of):
            take = shard_of == index
            acts = self.cache.open_shard(self.shards[int(index)])[0]
            local = rows[take] - self.offsets[index]
            order = np.argsort(local)
            block = np.asarray(acts[local[order]], dtype=np.float32)
            out[np.flatnonzero(take)[order]] = block
        return torch.from_numpy(out)


# --------------------------------------------------------------------------- the pass


class LevelStats:
    """Streaming statistics of one level: top-k, weighted samples, firing and token counts."""

    def __init__(self, n_features: int, top_k: int, n_samples: int) -> None:
        self.top_values = torch.full((top_k, n_features), -torch.inf)
        self.top_rows = torch.full((top_k, n_features), -1, dtype=torch.long)
        self.sample_keys = torch.full((n_samples, n_features), -torch.inf)
        self.sample_rows = torch.full((n_samples, n_features), -1, dtype=torch.long)
        self.fires = torch.zeros(n_features, dtype=torch.long)
        self.with_parent = torch.zeros(n_features, dtype=torch.long)
        self.token_keys = torch.zeros(0, dtype=torch.long)  # feature * vocab + token, unique
        self.token_counts = torch.zeros(0, dtype=torch.long)
        self.pending_keys: list[Tensor] = []  # not yet counted (one sort for many chunks)

    def add(
        self,
        acts: Tensor,
        rows: Tensor,
        tokens: Tensor,
        vocab: int,
        generator: torch.Generator,
        parent_active: Tensor | None,
        parents: Tensor | None,
    ) -> None:
        active = acts > 0
        self.fires += torch.count_nonzero(active, dim=0)
        self.top_values, self.top_rows = _merge_topk(self.top_values, self.top_rows, acts, rows)
        uniform = torch.rand(acts.shape, generator=generator).clamp_(1e-12, 1 - 1e-7)
        keys = torch.where(active, uniform.log_() / acts.clamp(min=1e-12), -torch.inf)
        self.sample_keys, self.sample_rows = _merge_topk(
            self.sample_keys, self.sample_rows, keys, rows
        )
        if parent_active is not None and parents is not None:
            has_parent = parents >= 0
            both = active & parent_active[:, parents.clamp(min=0)] & has_parent
            self.with_parent += torch.count_nonzero(both, dim=0)
        row, feature = active.nonzero(as_tuple=True)
        self.pending_keys.append(feature * vocab + tokens[row])
        if sum(k.numel() for k in self.pending_keys) > 8_000_000:
            self._count_tokens()

    def _count_tokens(self) -> None:
        pending = torch.cat(self.pending_keys) if self.pending_keys else self.token_keys[:0]
        merged = torch.cat([self.token_keys, pending])
        keys, inverse = torch.unique(merged, return_inverse=True)
        counts = torch.zeros(keys.numel(), dtype=torch.long)
        weights = torch.cat([self.token_counts, torch.ones_like(pending)])
        counts.index_add_(0, inverse, weights)
        self.token_keys, self.token_counts, self.pending_keys = keys, counts, []

    def top_tokens(self, vocab: int, n: int) -> dict[int, list[tuple[int, int]]]:
        """Feature -> its ``n`` most frequent (token id, count), most frequent first."""
        self._count_tokens()
        keys, counts = self.token_keys, self.token_counts
        order = torch.argsort(counts, descending=True, stable=True)
        keys, counts = keys[order], counts[order]
        features = keys // vocab
        regroup = torch.argsort(features, stable=True)
        keys, counts, features = keys[regroup], counts[regroup], features[regroup]
        starts = torch.searchsorted(features, features, side="left")
        keep = (torch.arange(features.numel()) - starts) < n
        result: dict[int, list[tuple[int, int]]] = {}
        for key, count in zip(keys[keep].tolist(), counts[keep].tolist(), strict=True):
            result.setdefault(key // vocab, []).append((key % vocab, count))
        return result


def _merge_topk(
    values: Tensor, rows: Tensor, new_values: Tensor, new_rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Keep the ``values.shape[0]`` largest per column of the old and the new entries."""
    k = values.shape[0]
    chunk = new_values.topk(min(k, new_values.shape[0]), dim=0)
    merged = torch.cat([values, chunk.values])
    merged_rows = torch.cat([rows, new_rows[chunk.indices]])
    best = merged.topk(k, dim=0)
    return best.values, merged_rows.gather(0, best.indices)


@dataclass(frozen=True)
class ScanSettings:
    """How much of a cache split :func:`scan` reads and what it keeps per feature."""

    max_tokens: int = 100_000
    """Activation rows scanned (the first rows of the split)."""
    top_k: int = 10
    """Highest-activating rows kept per feature."""
    n_samples: int = 5
    """Rows sampled in proportion to activation, per feature."""
    chunk_size: int = 4096
    """Rows encoded at once."""
    seed: int = 0
    """Seed of the weighted sampling."""


def scan(
    model: HSAE, source: RowSource, token_ids: np.ndarray, settings: ScanSettings
) -> tuple[list[LevelStats], int, int]:
    """Encode the first ``max_tokens`` rows chunk by chunk; return per-level stats, rows, vocab."""
    limit = min(settings.max_tokens, source.n_rows)
    vocab = int(token_ids[:limit].max()) + 1 if limit else 1
    sizes = model.config.level_sizes
    stats = [LevelStats(size, settings.top_k, settings.n_samples) for size in sizes]
    generator = torch.Generator().manual_seed(settings.seed)
    forest = [links.cpu() for links in model.forest()]
    all_tokens = torch.from_numpy(np.asarray(token_ids, dtype=np.int64))
    for start, block in source.chunks(limit, settings.chunk_size):
        rows = torch.arange(start, start + block.shape[0])
        tokens = all_tokens[start : start + block.shape[0]]
        codes = [level_acts.cpu() for level_acts in model.encode(block)]
        for level, acts in enumerate(codes):
            parent_active = codes[level - 1] > 0 if level > 0 else None
            parents = forest[level - 1] if level > 0 else None
            stats[level].add(acts, rows, tokens, vocab, generator, parent_active, parents)
    return stats, limit, vocab


# --------------------------------------------------------------------------- contexts


def context_windows(
    rows: np.ndarray, context_ids: np.ndarray, before: int, after: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, before+1+after] around each row and the mask of those in the same context."""
    offsets = np.arange(-before, after + 1)
    window = rows[:, None] + offsets[None, :]
    inside = (window >= 0) & (window < context_ids.size)
    window = np.clip(window, 0, context_ids.size - 1)
    same = inside & (context_ids[window] == context_ids[rows][:, None])
    return window, same


def window_activations(
    model: HSAE,
    source: RowSource,
    level: int,
    rows: np.ndarray,
    features: np.ndarray,
    chunk: int,
) -> np.ndarray:
    """Activation of ``features[i]`` (of ``level``) on ``rows[i]``, encoding each row once."""
    unique, inverse = np.unique(rows, return_inverse=True)
    values = np.zeros(rows.size, dtype=np.float32)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(0, unique.size + chunk, chunk))
    for part, lo in enumerate(range(0, unique.size, chunk)):
        pairs = order[bounds[part] : bounds[part + 1]]
        acts = model.encode_level(source.gather(unique[lo : lo + chunk]), level).cpu()
        picked = acts[torch.from_numpy(inverse[pairs] - lo), torch.from_numpy(features[pairs])]
        values[pairs] = picked.numpy()
    return values
