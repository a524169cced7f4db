"""Hierarchy metrics of a forest on held-out activations (``hsae-method.md`` section 6).

For every parent p with children, over N tokens:

* Hamming: the number of tokens where "p active" differs from "any child of p active", averaged
  over parents and expressed per 1,000 tokens; also divided by the union count (normalised).
  Both average over the same parents: those whose family (the parent or one of its children)
  fires at least once. A silent family agrees trivially and would reward dead features; how
  many were left out is reported (``n_silent_parents``).
* P(parent | child) and P(child | parent) for every assigned (child, parent) pair, averaged over
  pairs whose conditioning feature fires at least once.

Counts are accumulated chunk by chunk, so held-out sets of any size fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor


@dataclass
class PairCounts:
    """Running counts for one (parent level, child level) pair of a forest."""

    parent_index: Tensor
    n_parents: int
    tokens: int = 0
    parent_fires: Tensor = field(init=False)
    any_child_fires: Tensor = field(init=False)
    disagreements: Tensor = field(init=False)
    union: Tensor = field(init=False)
    child_fires: Tensor = field(init=False)
    both_fire: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.children = (self.parent_index >= 0).nonzero(as_tuple=True)[0]
        self.their_parents = self.parent_index[self.children]
        zeros = torch.zeros(self.n_parents, dtype=torch.long)
        self.parent_fires, self.any_child_fires = zeros.clone(), zeros.clone()
        self.disagreements, self.union = zeros.clone(), zeros.clone()
        self.child_fires = torch.zeros(self.children.numel(), dtype=torch.long)
        self.both_fire = torch.zeros(self.children.numel(), dtype=torch.long)

    def add(self, parent_active: Tensor, child_active: Tensor) -> None:
        """Accumulate one chunk: [n, n_parents] and [n, n_children] boolean firing patterns."""
        parent_active, child_active = parent_active.cpu(), child_active.cpu()
        assigned_children = child_active[:, self.children]
        child_hits = torch.zeros(parent_active.shape, dtype=torch.int32)
        child_hits.index_add_(1, self.their_parents, assigned_children.to(torch.int32))
        any_child = child_hits > 0
        self.parent_fires += parent_active.sum(0)
        self.any_child_fires += any_child.sum(0)
        self.disagreements += (parent_active ^ any_child).sum(0)
        self.union += (parent_active | any_child).sum(0)
        self.child_fires += assigned_children.sum(0)
        self.both_fire += (assigned_children & parent_active[:, self.their_parents]).sum(0)
        self.tokens += parent_active.shape[0]

    @property
    def parents_with_children(self) -> Tensor:
        return torch.bincount(self.their_parents, minlength=self.n_parents) > 0

    @property
    def silent_parents(self) -> int:
        """Parents with children whose family (parent or any child) never fired."""
        return int((self.parents_with_children & (self.union == 0)).sum())


@dataclass
class HierarchyMetrics:
    """Forest consistency; lower Hamming and higher conditional probabilities are better."""

    hamming_per_1k: float
    hamming_normalised: float
    p_parent_given_child: float
    p_child_given_parent: float
    n_parents: int
    n_pairs: int
    per_level: list[dict[str, float]] = field(default_factory=list)
    n_silent_parents: int = 0
    """Parents with children left out of both Hamming averages: their family never fired."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pair_summary(counts: PairCounts) -> dict[str, Tensor]:
    scored = counts.parents_with_children & (counts.union > 0)
    hamming = counts.disagreements[scored].double()
    union = counts.union[scored].double()
    child_fired = counts.child_fires > 0
    parent_fired = counts.parent_fires[counts.their_parents] > 0
    return {
        "hamming_per_1k": hamming * 1000.0 / max(counts.tokens, 1),
        "hamming_normalised": hamming / union,
        "p_parent_given_child": counts.both_fire[child_fired].double()
        / counts.child_fires[child_fired].double(),
        "p_child_given_parent": counts.both_fire[parent_fired].double()
        / counts.parent_fires[counts.their_parents][parent_fired].double(),
    }


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


def summarise(all_counts: list[PairCounts]) -> HierarchyMetrics:
    """Pool every parent (and every pair) of every level pair, then average."""
    summaries = [_pair_summary(counts) for counts in all_counts]
    pooled = {
        key: torch.cat([s[key] for s in summaries]) if summaries else torch.zeros(0)
        for key in ("hamming_per_1k", "hamming_normalised", "p_parent_given_child")
    }
    pooled["p_child_given_parent"] = (
        torch.cat([s["p_child_given_parent"] for s in summaries]) if summaries else torch.zeros(0)
    )
    per_level = [
        {key: _mean(value) for key, value in summary.items()}
        | {
            "n_parents": int(counts.parents_with_children.sum()),
            "n_pairs": counts.children.numel(),
            "n_silent_parents": counts.silent_parents,
        }
        for summary, counts in zip(summaries, all_counts, strict=True)
    ]
    return HierarchyMetrics(
        hamming_per_1k=_mean(pooled["hamming_per_1k"]),
        hamming_normalised=_mean(pooled["hamming_normalised"]),
        p_parent_given_child=_mean(pooled["p_parent_given_child"]),
        p_child_given_parent=_mean(pooled["p_child_given_parent"]),
        n_parents=sum(int(c.parents_with_children.sum()) for c in all_counts),
        n_pairs=sum(c.children.numel() for c in all_counts),
        per_level=per_level,
        n_silent_parents=sum(c.silent_parents for c in all_counts),
    )


def hierarchy_metrics(
    firing_chunks: Iterable[list[Tensor]], forest: list[Tensor], level_sizes: list[int]
) -> HierarchyMetrics:
    """Metrics of ``forest`` from chunks of per-level boolean firing patterns [n, n_l]."""
    all_counts = [PairCounts(links.cpu(), level_sizes[level]) for level, links in enumerate(forest)]
    for chunk in firing_chunks:
        for level, counts in enumerate(all_counts):
            counts.add(chunk[level], chunk[level + 1])
    return summarise(all_counts)
