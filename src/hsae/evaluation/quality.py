"""Per-level reconstruction quality on held-out activations, and the one-pass evaluation.

Per level: L0 (mean active features per token), variance explained (SAEBench legacy:
mean over tokens of 1 - ||x - x_hat||^2 / ||x - batch_mean(x)||^2), the dead fraction (never
fires on the held-out set) and the dense fraction (fires on more than ``dense_rate`` of tokens).
:func:`evaluate` computes these and the hierarchy metrics in a single pass over the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from hsae.evaluation.hierarchy import HierarchyMetrics, PairCounts, summarise
from hsae.model import HSAE
from hsae.model.hsae import centred_energy, per_token_variance_explained

DENSE_RATE = 0.1


@dataclass
class LevelQuality:
    level: int
    n_features: int
    l0: float
    variance_explained: float
    mse: float
    dead_fraction: float
    dense_fraction: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass
class Evaluation:
    """Everything :func:`evaluate` measures for one model."""

    levels: list[LevelQuality]
    hierarchy: HierarchyMetrics
    tokens: int
    firing_rate: list[Tensor] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, object]:
        return {
            "tokens": self.tokens,
            "levels": [level.to_dict() for level in self.levels],
            "hierarchy": self.hierarchy.to_dict(),
        }


class _LevelAccumulator:
    def __init__(self, n_features: int):
        self.fires = torch.zeros(n_features, dtype=torch.long)
        self.active_total = 0
        self.explained_total = 0.0
        self.sq_error_total = 0.0
        self.tokens = 0

    def add(self, x: Tensor, x_hat: Tensor, active: Tensor) -> None:
        sq_error = (x - x_hat).pow(2).sum(-1)
        self.explained_total += float(
            per_token_variance_explained(sq_error, centred_energy(x)).sum()
        )
        self.sq_error_total += float(sq_error.sum())
        self.active_total += int(active.sum())
        self.fires += active.sum(0).cpu()
        self.tokens += x.shape[0]

    def result(self, level: int, dense_rate: float) -> LevelQuality:
        tokens = max(self.tokens, 1)
        rate = self.fires.double() / tokens
        return LevelQuality(
            level=level,
            n_features=self.fires.numel(),
            l0=self.active_total / tokens,
            variance_explained=self.explained_total / tokens,
            mse=self.sq_error_total / tokens,
            dead_fraction=float((self.fires == 0).double().mean()),
            dense_fraction=float((rate > dense_rate).double().mean()),
        )


def _chunks(activations: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    if isinstance(activations, Tensor):
        yield from activations.split(batch_size)
    else:
        yield from activations


@torch.no_grad()
def evaluate(
    model: HSAE,
    activations: Tensor | Iterable[Tensor],
    batch_size: int = 4096,
    dense_rate: float = DENSE_RATE,
) -> Evaluation:
    """Quality per level and hierarchy metrics of ``model``'s forest on raw ``activations``.

    Variance explained is computed per evaluation batch (the batch mean is the baseline), so
    use batches of at least a few hundred tokens.
    """
    model.eval()
    device = model.activation_scale.device
    sizes = model.config.level_sizes
    accumulators = [_LevelAccumulator(size) for size in sizes]
    pairs = [PairCounts(links.cpu(), sizes[level]) for level, links in enumerate(model.forest())]
    tokens = 0
    for chunk in _chunks(activations, batch_size):
        x = chunk.to(device, torch.float32) * model.activation_scale
        active = []
        for level, accumulator in zip(model.levels, accumulators, strict=True):
            codes = level.encode(x)
            accumulator.add(x, level.decode(codes), codes > 0)
            active.append(codes > 0)
        for index, counts in enumerate(pairs):
            counts.add(active[index], active[index + 1])
        tokens += x.shape[0]
    if tokens == 0:
        raise ValueError("no held-out activations to evaluate on")
    return Evaluation(
        levels=[acc.result(level, dense_rate) for level, acc in enumerate(accumulators)],
        hierarchy=summarise(pairs),
        tokens=tokens,
        firing_rate=[acc.fires.double() / tokens for acc in accumulators],
    )
