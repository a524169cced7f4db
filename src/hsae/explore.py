"""Exploring a run from Python: the contexts a feature fires on most, as text.

What the HTML explorer (``hsae report``) shows for one node, without building the page::

    run = Run.open("runs/demo")
    for ctx in run.top_contexts(level=0, index=12, k=5):
        print(f"{ctx['activation']:.2f}", ctx["text"])

The row source and the context windows are those of :mod:`hsae.evaluation.contexts` (the
same rows, windows and per-token activations the report embeds).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hsae.errors import HSAEError
from hsae.evaluation.contexts import RowSource, context_windows, window_activations
from hsae.layout import MODEL_NAMES
from hsae.model.navigation import check_node


class ExploreError(HSAEError, ValueError):
    """A request for contexts that cannot be answered (bad feature, setting or split)."""


def feature_contexts(
    run: Any,
    level: int,
    features: Sequence[int],
    k: int = 10,
    which: str = "hsae",
    split: str = "train",
    max_tokens: int = 100_000,
    before: int = 12,
    after: int = 4,
    chunk_size: int = 4096,
    tokenizer: Any = None,
) -> dict[int, list[dict[str, Any]]]:
    """For each of ``features`` (of ``level``), its ``k`` highest-activating tokens among the
    first ``max_tokens`` rows of the cache split, each with its context window.

    One pass over the rows encodes ``level`` once for all the features. Each context is a dict:
    ``row`` (activation row in the split), ``activation`` (the feature's activation on that
    row's token: the ranking key, highest first), ``text`` (the decoded window), ``tokens``
    (one string per token), ``token_ids``, ``activations`` (the feature's activation on every
    token of the window), ``position`` (index of the row's token in ``tokens``). Only tokens
    the feature fires on count, so a rare feature can have fewer than ``k``.
    """
    limits = {"k": (k, 1), "max_tokens": (max_tokens, 1), "chunk_size": (chunk_size, 1),
              "before": (before, 0), "after": (after, 0)}  # fmt: skip
    for name, (value, low) in limits.items():
        if not isinstance(value, int) or value < low:
            raise ExploreError(f"{name} must be an integer >= {low}, got {value!r}")
    if split not in ("train", "heldout"):
        raise ExploreError(f"split must be train or heldout, got {split!r}")
    if which not in MODEL_NAMES:
        raise ExploreError(f"which must be one of {', '.join(MODEL_NAMES)}, got {which!r}")
    model = run.load(which)
    chosen = [int(f) for f in features]
    if not chosen:
        raise ExploreError("no features asked for")
    for feature in chosen:
        check_node(model.config.level_sizes, level, feature, ExploreError)
    cache = run.cache()
    source = RowSource(cache, split)
    limit = min(max_tokens, source.n_rows)
    if limit == 0:
        raise ExploreError(f"{run.folder}: the activation cache has no {split} tokens")
    columns = torch.tensor(chosen, dtype=torch.long)
    values = torch.full((k, len(chosen)), -torch.inf)
    rows = torch.full((k, len(chosen)), -1, dtype=torch.long)
    for start, block in source.chunks(limit, chunk_size):
        acts = model.encode_level(block, level).cpu()[:, columns]
        merged = torch.cat([values, acts])
        merged_rows = torch.cat(
            [rows, torch.arange(start, start + block.shape[0]).unsqueeze(1).expand_as(acts)]
        )
        best = merged.topk(min(k, merged.shape[0]), dim=0)
        values, rows = best.values, merged_rows.gather(0, best.indices)
    info = cache.token_info(split)
    tok = tokenizer if tokenizer is not None else _tokenizer(_model_name(cache))
    found: dict[int, list[dict[str, Any]]] = {}
    for column, feature in enumerate(chosen):
        firing = values[:, column] > 0
        found[feature] = _windows(
            model, source, info, level, feature, rows[firing, column].numpy(),
            values[firing, column].tolist(), before, after, chunk_size, tok,
        )  # fmt: skip
    return found


def top_contexts(
    run: Any, level: int, feature: int, k: int = 10, which: str = "hsae", **options: Any
) -> list[dict[str, Any]]:
    """The ``k`` highest-activating contexts of one feature (see :func:`feature_contexts` for
    the fields and the ``options``: split, max_tokens, before, after, chunk_size, tokenizer)."""
    return feature_contexts(run, level, [feature], k, which, **options)[int(feature)]


def _windows(
    model: Any,
    source: RowSource,
    info: Any,
    level: int,
    feature: int,
    rows: np.ndarray,
    top: list[float],
    before: int,
    after: int,
    chunk_size: int,
    tokenizer: Any,
) -> list[dict[str, Any]]:
    if rows.size == 0:
        return []
    window, same = context_windows(rows.astype(np.int64), info.context_ids, before, after)
    flat = window.reshape(-1)
    acts = window_activations(
        model, source, level, flat, np.full(flat.size, feature, dtype=np.int64), chunk_size
    ).reshape(window.shape)
    contexts = []
    for n, row in enumerate(rows.tolist()):
        keep = same[n]
        ids = info.token_ids[window[n][keep]].tolist()
        contexts.append(
            {
                "row": int(row),
                "activation": float(top[n]),
                "text": tokenizer.decode(ids),
                "tokens": [tokenizer.decode([token]) for token in ids],
                "token_ids": ids,
                "activations": [float(v) for v in acts[n][keep]],
                "position": int(np.count_nonzero(keep[:before])),
            }
        )
    return contexts


def _model_name(cache: Any) -> Any:
    model = cache.manifest.get("model")
    return model.get("name") if isinstance(model, dict) else model


@functools.lru_cache(maxsize=4)
def _tokenizer(name: Any) -> Any:
    from hsae.activations.models import load_tokenizer

    return load_tokenizer(name)
