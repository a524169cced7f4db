"""Sparse probing (SAEBench style) of each level's latents on labelled contexts.

This module owns the probing tasks, the top-k latent selection and the probes:

* Tasks: one balanced binary task per class ("this class" vs "any other class"), as SAEBench
  does per chosen class. Every class is split into train and test with ``test_fraction``;
  negatives are drawn, with the seed, from the other classes' train (test) contexts, as many as
  the positives.
* Selection: the k latents with the largest absolute difference between the mean activation on
  positive and on negative train contexts.
* Probe: L2 logistic regression (scikit-learn, ``C``) on those k latents, standardised with the
  train mean and deviation (raw LM dimensions differ in scale by orders of magnitude); the
  score is test accuracy, averaged over tasks.

:func:`sparse_probing` reports, for every model and level, top-k accuracy for each k (and
optionally the probe on all latents), with the raw activations as reference: all dimensions,
and the top-k dimensions chosen by the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import Tensor
from tqdm.auto import tqdm

from hsae.errors import HSAEError
from hsae.evaluation.lexicon import LexiconData
from hsae.model import HSAE


class ProbingError(HSAEError, ValueError):
    """Bad settings or data for sparse probing."""


@dataclass(frozen=True)
class ProbeSettings:
    ks: tuple[int, ...] = (1, 2, 5)
    test_fraction: float = 0.2
    seed: int = 0
    all_features: bool = True
    """Also probe on every latent of a level (SAEBench's ``sae_test_accuracy``)."""
    c: float = 1.0
    """Inverse L2 strength of the logistic regression."""
    max_iter: int = 1000


@dataclass(frozen=True)
class BinaryTask:
    """Indices into the data and 0/1 targets of one class-vs-rest task."""

    name: str
    train: Tensor
    train_targets: Tensor
    test: Tensor
    test_targets: Tensor


def split_by_class(labels: Tensor, test_fraction: float, generator: torch.Generator) -> Tensor:
    """A boolean test mask [n] holding ``test_fraction`` of every class (at least one each)."""
    if not 0 < test_fraction < 1:
        raise ProbingError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = torch.randperm(labels.numel(), generator=generator)
    ranked = order[torch.argsort(labels[order], stable=True)]  # shuffled within each class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(labels.numel()) - starts[labels[ranked]]
    n_test = torch.clamp((counts.float() * test_fraction).round().long(), min=1)
    test = torch.zeros(labels.numel(), dtype=torch.bool)
    test[ranked] = rank_in_class < n_test[labels[ranked]]
    return test


def binary_tasks(
    labels: Tensor, class_names: Sequence[str], test_fraction: float = 0.2, seed: int = 0
) -> list[BinaryTask]:
    """One balanced class-vs-rest task per class with at least two train and test contexts."""
    generator = torch.Generator().manual_seed(seed)
    test = split_by_class(labels, test_fraction, generator)
    tasks = []
    for c, name in enumerate(class_names):
        train_part = _balanced(labels, ~test, c, generator)
        test_part = _balanced(labels, test, c, generator)
        if train_part is not None and test_part is not None:
            tasks.append(BinaryTask(name, *train_part, *test_part))
    if not tasks:
        raise ProbingError("no class has enough contexts for a train and a test split")
    return tasks


def _balanced(
    labels: Tensor, within: Tensor, c: int, generator: torch.Generator
) -> tuple[Tensor, Tensor] | None:
    positives = (within & (labels == c)).nonzero(as_tuple=True)[0]
    pool = (within & (labels != c)).nonzero(as_tuple=True)[0]
    n = min(positives.numel(), pool.numel())
    if n < 1:
        return None
    negatives = pool[torch.randperm(pool.numel(), generator=generator)[:n]]
    positives = positives[:n]
    targets = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
    return torch.cat([positives, negatives]), targets


def top_k_by_mean_difference(features: Tensor, targets: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` columns with the largest |mean on positives - mean on negatives|."""
    positive = targets.bool()
    difference = features[positive].mean(0) - features[~positive].mean(0)
    return torch.topk(difference.abs(), min(k, features.shape[1])).indices


def probe_accuracy(
    train: Tensor,
    train_targets: Tensor,
    test: Tensor,
    test_targets: Tensor,
    c: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of an L2 logistic regression fitted on standardised train features."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x_train = ((train - mean) / std).double().numpy()
    x_test = ((test - mean) / std).double().numpy()
    y_train = train_targets.numpy()
    if np.unique(y_train).size < 2:
        raise ProbingError("a probe needs both classes in its train set")
    probe = LogisticRegression(C=c, max_iter=max_iter).fit(x_train, y_train)
    return float((probe.predict(x_test) == test_targets.numpy()).mean())


def probe_features(
    features: Tensor, tasks: Sequence[BinaryTask], settings: ProbeSettings | None = None
) -> dict[str, object]:
    """Mean test accuracy over ``tasks`` of top-k probes on ``features`` [n, F] (and, with
    ``all_features``, of the probe on every column), with the per-task values."""
    settings = settings or ProbeSettings()
    per_task: dict[str, dict[str, float]] = {}
    for task in tasks:
        train, test = features[task.train], features[task.test]
        scores = {}
        for k in settings.ks:
            chosen = top_k_by_mean_difference(train, task.train_targets, k)
            scores[f"top_{k}"] = probe_accuracy(
                train[:, chosen],
                task.train_targets,
                test[:, chosen],
                task.test_targets,
                settings.c,
                settings.max_iter,
            )
        if settings.all_features:
            scores["all"] = probe_accuracy(
                train, task.train_targets, test, task.test_targets, settings.c, settings.max_iter
            )
        per_task[task.name] = scores
    keys = next(iter(per_task.values())).keys()
    summary: dict[str, object] = {
        f"{key}_accuracy": float(np.mean([s[key] for s in per_task.values()])) for key in keys
    }
    summary["per_task"] = per_task
    return summary


def sparse_probing(
    models: dict[str, HSAE],
    data: LexiconData,
    *,
    settings: ProbeSettings | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Sparse probing of every level of every model on ``data``, with the raw activations as
    reference. JSON-able: ``{"tasks", "settings", "raw": {...}, name: {"levels": [...]}}``, each
    entry holding ``top_{k}_accuracy`` (and ``all_accuracy``) plus ``per_task``."""
    settings = settings or ProbeSettings()
    if any(k < 1 for k in settings.ks):
        raise ProbingError(f"every k must be at least 1, got {settings.ks}")
    tasks = binary_tasks(data.labels, data.class_names, settings.test_fraction, settings.seed)
    n_levels = sum(model.n_levels for model in models.values())
    bar = tqdm(total=1 + n_levels, desc="sparse probing", unit="level", disable=not progress)
    results: dict[str, object] = {
        "tasks": [task.name for task in tasks],
        "sizes": {task.name: [task.train.numel(), task.test.numel()] for task in tasks},
        "settings": asdict(settings),
        "raw": probe_features(data.activations.float(), tasks, settings),
    }
    bar.update(1)
    for name, model in models.items():
        levels = []
        for codes in model.encode_in_batches(data.activations):
            levels.append(probe_features(codes.float().cpu(), tasks, settings))
            bar.update(1)
        results[name] = {"levels": levels}
    bar.close()
    return results
