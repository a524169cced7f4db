"""The feature forest: parent links between adjacent levels and how they are rebuilt.

A forest is a list of ``L - 1`` LongTensors; ``parents[l][j]`` is the index in level ``l`` of
the parent of level-``l+1`` feature ``j``, or ``-1`` when ``j`` is unassigned. Every child has
at most one parent, so child sets are disjoint by construction.

Rebuilding (``hsae-method.md`` section 4), with parameters fixed: each child picks the parent of
highest similarity; children whose best similarity lies in the bottom ``q`` quantile of all
children's best similarities stay unassigned; the binary variant keeps at most two children
per parent (the most similar).

Similarities: encoder or decoder cosine, co-activation frequency (the paper's three), and two
options of ours, both from firing EMAs tracked during training (:class:`ConditionalTracker`):

* "conditional": how much more often the parent fires when the child fires than on average,
  ``P(parent | child) - P(parent)``. A child is the more specific feature, so its true parent
  should fire whenever it does (``P(parent | child)`` near 1) whatever the two decoders look
  like; the ``- P(parent)`` keeps a parent that fires on most tokens from winning every child.
* "hybrid": decoder cosine (clamped at 0) times ``P(parent | child)``: among the parents that
  fire with the child, the one whose direction is closest. Co-firing alone prefers a coarser
  ancestor that fires with the child more reliably than a parent which absorbed part of it;
  the decoder cosine tells the two apart, and co-firing vetoes a parent that merely points the
  same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

UNASSIGNED = -1
ROW_CHUNK = 4096
FIRING_SIMILARITIES = ("coactivation", "conditional", "hybrid")
"""The similarities read from firing statistics tracked during training (not from weights
alone): a model imported without them cannot use these."""


def unit_rows(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-8)


def best_parent_by_cosine(children: Tensor, parents: Tensor) -> tuple[Tensor, Tensor]:
    """For each child vector, the most cosine-similar parent vector and that cosine.

    Computed in row chunks so the [n_children, n_parents] matrix never exists at once.
    """
    child_units, parent_units = unit_rows(children.float()), unit_rows(parents.float())
    return best_parent_from_scores(
        child_units.shape[0], lambda rows: child_units[rows] @ parent_units.t()
    )


def best_parent_from_scores(
    n_children: int, scores_for: Callable[[slice], Tensor]
) -> tuple[Tensor, Tensor]:
    """Row-chunked argmax of a similarity matrix given by ``scores_for(row_slice)``."""
    best_index, best_score = [], []
    for start in range(0, n_children, ROW_CHUNK):
        scores = scores_for(slice(start, start + ROW_CHUNK))
        values, indices = scores.max(dim=1)
        best_index.append(indices)
        best_score.append(values)
    return torch.cat(best_index), torch.cat(best_score)


def leave_bottom_quantile_unassigned(parent_index: Tensor, best_score: Tensor, q: float) -> Tensor:
    """Unassign the round(q * n) children whose best similarity is lowest."""
    n_unassigned = int(round(q * parent_index.numel()))
    if n_unassigned == 0:
        return parent_index.clone()
    weakest = torch.argsort(best_score, stable=True)[:n_unassigned]
    filtered = parent_index.clone()
    filtered[weakest] = UNASSIGNED
    return filtered


def cap_children_per_parent(parent_index: Tensor, best_score: Tensor, max_children: int) -> Tensor:
    """Keep at most ``max_children`` children per parent, the most similar ones."""
    capped = parent_index.clone()
    assigned = (parent_index >= 0).nonzero(as_tuple=True)[0]
    if assigned.numel() == 0:
        return capped
    # Sort by score descending, then stably by parent, so each parent's children are ranked.
    by_score = assigned[torch.argsort(best_score[assigned], descending=True, stable=True)]
    ordered = by_score[torch.argsort(parent_index[by_score], stable=True)]
    groups = parent_index[ordered]
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(ordered.numel(), device=ordered.device) - starts
    capped[ordered[rank >= max_children]] = UNASSIGNED
    return capped


def link_children(
    best_index: Tensor, best_score: Tensor, quantile: float, max_children: int | None
) -> Tensor:
    """Turn each child's best parent into a forest level: quantile filter, then the cap."""
    links = leave_bottom_quantile_unassigned(best_index, best_score, quantile)
    if max_children is not None:
        links = cap_children_per_parent(links, best_score, max_children)
    return links


def empty_forest(level_sizes: list[int], device: torch.device | None = None) -> list[Tensor]:
    return [
        torch.full((size,), UNASSIGNED, dtype=torch.long, device=device) for size in level_sizes[1:]
    ]


def children_count(parent_index: Tensor, n_parents: int) -> Tensor:
    assigned = parent_index[parent_index >= 0]
    return torch.bincount(assigned, minlength=n_parents)


def validate_forest(parents: list[Tensor], level_sizes: list[int]) -> None:
    """Raise ValueError unless ``parents`` is a well-formed forest over ``level_sizes``."""
    if len(parents) != len(level_sizes) - 1:
        raise ValueError(f"forest has {len(parents)} links for {len(level_sizes)} levels")
    for level, links in enumerate(parents):
        if links.shape != (level_sizes[level + 1],):
            raise ValueError(
                f"forest level {level}: expected {level_sizes[level + 1]} links, got "
                f"{tuple(links.shape)}"
            )
        if links.numel() and (links.min() < UNASSIGNED or links.max() >= level_sizes[level]):
            raise ValueError(
                f"forest level {level}: parent indices must lie in [-1, {level_sizes[level]})"
            )


class CoactivationTracker:
    """EMA over batches of the fraction of tokens on which a child and a parent both fire."""

    def __init__(self, level_sizes: list[int], momentum: float, device: torch.device | None = None):
        self.momentum = momentum
        self.frequencies = [
            torch.zeros(child, parent, device=device)
            for parent, child in zip(level_sizes, level_sizes[1:], strict=False)
        ]
        self.updates = 0

    @torch.no_grad()
    def update(self, active: list[Tensor]) -> None:
        """``active[l]`` is the [batch, n_l] boolean firing pattern of level ``l``."""
        momentum = 0.0 if self.updates == 0 else self.momentum
        for level, frequency in enumerate(self.frequencies):
            parent_fire = active[level].to(frequency.dtype)
            child_fire = active[level + 1].to(frequency.dtype)
            batch_frequency = (child_fire.t() @ parent_fire) / parent_fire.shape[0]
            frequency.mul_(momentum).add_(batch_frequency, alpha=1.0 - momentum)
        self.updates += 1

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"coactivation.{i}": f for i, f in enumerate(self.frequencies)}
        tensors["coactivation.updates"] = torch.tensor(self.updates)
        return tensors

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        for i, frequency in enumerate(self.frequencies):
            frequency.copy_(tensors[f"coactivation.{i}"])
        self.updates = int(tensors["coactivation.updates"])


class ConditionalTracker(CoactivationTracker):
    """Co-firing EMA plus an EMA of every level's firing rate, for ``P(parent | child)``."""

    def __init__(self, level_sizes: list[int], momentum: float, device: torch.device | None = None):
        super().__init__(level_sizes, momentum, device)
        self.rates = [torch.zeros(size, device=device) for size in level_sizes]

    @torch.no_grad()
    def update(self, active: list[Tensor]) -> None:
        momentum = 0.0 if self.updates == 0 else self.momentum
        for rate, level_active in zip(self.rates, active, strict=True):
            rate.mul_(momentum).add_(level_active.to(rate.dtype).mean(0), alpha=1.0 - momentum)
        super().update(active)

    def conditional(self, level: int) -> Tensor:
        """[n_children, n_parents] ``P(parent | child)`` between levels ``level`` and
        ``level + 1`` (0 for a child that never fired)."""
        child_rate = self.rates[level + 1]
        conditional = self.frequencies[level] / child_rate.clamp(min=1e-12)[:, None]
        return torch.where(child_rate[:, None] > 0, conditional, torch.zeros_like(conditional))

    def lift(self, level: int) -> Tensor:
        """[n_children, n_parents] ``P(parent | child) - P(parent)`` between levels ``level``
        and ``level + 1`` (0 for a child that never fired)."""
        lift = self.conditional(level) - self.rates[level][None, :]
        fired = self.rates[level + 1][:, None] > 0
        return torch.where(fired, lift, torch.zeros_like(lift))

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = super().state_tensors()
        tensors |= {f"conditional.rate.{i}": rate for i, rate in enumerate(self.rates)}
        return tensors

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_tensors(tensors)
        for i, rate in enumerate(self.rates):
            rate.copy_(tensors[f"conditional.rate.{i}"])


def make_tracker(
    similarity: str, level_sizes: list[int], momentum: float, device: torch.device | None = None
) -> CoactivationTracker | None:
    """The firing statistics a similarity needs during training (None for the cosines)."""
    if similarity == "coactivation":
        return CoactivationTracker(level_sizes, momentum, device)
    if similarity in ("conditional", "hybrid"):
        return ConditionalTracker(level_sizes, momentum, device)
    return None


def tracker_scores(
    similarity: str, tracker: CoactivationTracker | None, level: int
) -> Tensor | None:
    """The firing statistics between levels ``level`` and ``level + 1`` that ``similarity``
    reads (:func:`best_parents`' ``coactivation``); None for the cosines."""
    if tracker is None:
        return None
    if isinstance(tracker, ConditionalTracker):
        if similarity == "conditional":
            return tracker.lift(level)
        if similarity == "hybrid":
            return tracker.conditional(level)
    return tracker.frequencies[level]


def best_parents(
    similarity: str,
    parent_level: torch.nn.Module,
    child_level: torch.nn.Module,
    coactivation: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Best parent and its similarity for each child, by one of the measures.

    ``coactivation``: the [n_children, n_parents] co-firing EMA for "coactivation", the lift
    ``P(parent | child) - P(parent)`` (:meth:`ConditionalTracker.lift`) for "conditional",
    ``P(parent | child)`` for "hybrid" (:func:`tracker_scores` picks it). A child without
    positive evidence (score <= 0) for any of these stays unassigned.
    """
    with torch.no_grad():
        if similarity == "encoder":
            return best_parent_by_cosine(child_level.W_enc.t(), parent_level.W_enc.t())
        if similarity == "decoder":
            return best_parent_by_cosine(child_level.W_dec, parent_level.W_dec)
        if similarity in FIRING_SIMILARITIES:
            if coactivation is None:
                raise ValueError(f"similarity={similarity!r} needs co-firing statistics")
            if similarity == "hybrid":
                children = unit_rows(child_level.W_dec.float())
                parents = unit_rows(parent_level.W_dec.float())

                def scores_for(rows: slice) -> Tensor:
                    cosine = (children[rows] @ parents.t()).clamp(min=0)
                    return cosine * coactivation[rows]
            else:

                def scores_for(rows: slice) -> Tensor:
                    return coactivation[rows]

            index, score = best_parent_from_scores(coactivation.shape[0], scores_for)
            # A child that never fired with any parent has no evidence for a link: the argmax
            # of an all-zero row (parent 0) would be arbitrary.
            return index.masked_fill(score <= 0, UNASSIGNED), score
    raise ValueError(
        "similarity must be 'encoder', 'decoder', 'coactivation', 'conditional' or 'hybrid', "
        f"not {similarity!r}"
    )


def rebuild_forest(
    levels: list[torch.nn.Module],
    similarity: str,
    quantile: float,
    max_children: int | None,
    coactivation: CoactivationTracker | None = None,
) -> list[Tensor]:
    """A new forest over ``levels`` (parameters untouched): best parent, filter, cap."""
    links = []
    for index in range(len(levels) - 1):
        best_index, best_score = best_parents(
            similarity,
            levels[index],
            levels[index + 1],
            tracker_scores(similarity, coactivation, index),
        )
        links.append(link_children(best_index, best_score, quantile, max_children))
    return links
