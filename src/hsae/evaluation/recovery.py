"""Recovery of a known ground-truth forest (see :mod:`hsae.synthetic`) by a trained model.

This module owns the matching of learned latents to truth nodes and the scores built on it.
Inputs are plain tensors, so any model (HSAE, independent SAEs, a baseline) can be scored:

* :func:`match_latents`: Hungarian matching of learned decoder rows to truth directions,
  maximising the total cosine similarity (one-to-one; ``min(n, m)`` pairs).
* :func:`match_by_firing`: the same on firing patterns, maximising Jaccard similarity between
  a latent's and a truth node's sets of firing tokens (no decoder needed).
* :func:`forest_recovery`: per level, the share of truth nodes matched with cosine at least
  ``min_cosine`` ("recovered"); and parent-link precision / recall between recovered nodes.
  Edge precision: among learned links whose two endpoints are recovered, the share whose truth
  images form a true link. Edge recall: among true links whose two endpoints are recovered, the
  share present in the learned forest. Links of features that do not split (a truth node that
  is its own parent in the next cut) count as true links too.
* :func:`firing_forest_recovery`: the same scores with latents matched to truth nodes by firing
  F1 on held-out tokens (Hungarian, one-to-one, pairs with F1 >= ``min_f1`` count), so a
  latent is judged by *when it fires*, not by where its decoder points. Links are scored
  strictly (the learned parent is matched to the true parent) and leniently (to the true parent
  or any coarser ancestor of the child's truth node, :meth:`SyntheticForest.ancestor_or_self`).
  Links of split nodes (not of features that persist unchanged into the wider level, which
  link to themselves) are also scored on their own: the non-trivial part of the forest.

Undefined ratios (no pair to judge) are ``nan`` in the dataclasses and ``None`` in
``to_dict()``, so the dictionaries are valid JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from hsae.synthetic import SyntheticForest

UNMATCHED = -1
TOKEN_CHUNK = 65536


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of learned latents to truth nodes, best total cosine first."""

    learned_idx: Tensor
    """LongTensor [k]: matched learned rows, ordered by ``truth_idx``."""
    truth_idx: Tensor
    """LongTensor [k]: the truth row matched to each entry of ``learned_idx``."""
    cosine: Tensor
    """Tensor [k]: cosine similarity of each matched pair."""

    @property
    def mean_cosine(self) -> float:
        return float(self.cosine.mean()) if self.cosine.numel() else float("nan")

    def truth_to_learned(self, n_truth: int, min_score: float = -math.inf) -> Tensor:
        """LongTensor [n_truth]: learned row matched to each truth row with cosine >= min_score,
        else -1."""
        return _lookup(self.truth_idx, self.learned_idx, self.cosine >= min_score, n_truth)

    def learned_to_truth(self, n_learned: int, min_score: float = -math.inf) -> Tensor:
        """LongTensor [n_learned]: truth row matched to each learned row with cosine >=
        min_score, else -1."""
        return _lookup(self.learned_idx, self.truth_idx, self.cosine >= min_score, n_learned)


@dataclass(frozen=True)
class FiringMatching:
    """A one-to-one matching of learned latents to truth nodes by firing-pattern Jaccard."""

    learned_idx: Tensor
    truth_idx: Tensor
    jaccard: Tensor
    """Tensor [k]: |both fire| / |either fires| of each matched pair (0 if neither fires)."""
    f1: Tensor
    """Tensor [k]: 2 |both| / (|learned fires| + |truth fires|) of each matched pair."""

    @property
    def mean_jaccard(self) -> float:
        return float(self.jaccard.mean()) if self.jaccard.numel() else float("nan")

    @property
    def mean_f1(self) -> float:
        return float(self.f1.mean()) if self.f1.numel() else float("nan")


def _lookup(keys: Tensor, values: Tensor, keep: Tensor, size: int) -> Tensor:
    table = torch.full((size,), UNMATCHED, dtype=torch.long)
    table[keys[keep]] = values[keep]
    return table


def _hungarian(score: Tensor) -> tuple[Tensor, Tensor]:
    """Rows and columns of the assignment maximising the total score, ordered by column."""
    rows, cols = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    order = np.argsort(cols, kind="stable")
    return torch.from_numpy(rows[order]).long(), torch.from_numpy(cols[order]).long()


def _check_matrix(name: str, value: Tensor) -> None:
    if value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got shape {tuple(value.shape)}")


def cosine_matrix(learned: Tensor, truth: Tensor) -> Tensor:
    """[n, m] cosine similarity between rows of ``learned`` [n, d] and ``truth`` [m, d]."""
    _check_matrix("learned", learned)
    _check_matrix("truth", truth)
    if learned.shape[1] != truth.shape[1]:
        raise ValueError(
            f"learned and truth must share the dimension, got {learned.shape[1]} and "
            f"{truth.shape[1]}"
        )
    a = learned.detach().double().cpu()
    b = truth.detach().double().cpu()
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return a @ b.T


def match_latents(learned: Tensor, truth: Tensor) -> Matching:
    """Hungarian matching of learned rows [n, d] to truth rows [m, d] maximising total cosine.

    Rows need not be unit norm (they are normalised here). ``min(n, m)`` pairs are returned.
    """
    similarity = cosine_matrix(learned, truth)
    rows, cols = _hungarian(similarity)
    return Matching(learned_idx=rows, truth_idx=cols, cosine=similarity[rows, cols].float())


def firing_overlap(codes: Tensor, truth_fire: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Co-firing counts [n, m] and per-column firing counts [n], [m], over token chunks.

    ``codes`` [tokens, n] fires where it is > 0 (or True); ``truth_fire`` [tokens, m] is bool.
    """
    _check_matrix("codes", codes)
    _check_matrix("truth_fire", truth_fire)
    if codes.shape[0] != truth_fire.shape[0]:
        raise ValueError(
            f"codes and truth_fire must cover the same tokens, got {codes.shape[0]} and "
            f"{truth_fire.shape[0]}"
        )
    both = torch.zeros(codes.shape[1], truth_fire.shape[1], dtype=torch.float64)
    learned_count = torch.zeros(codes.shape[1], dtype=torch.float64)
    truth_count = torch.zeros(truth_fire.shape[1], dtype=torch.float64)
    for start in range(0, codes.shape[0], TOKEN_CHUNK):
        a = (codes[start : start + TOKEN_CHUNK].detach().cpu() > 0).float()
        b = truth_fire[start : start + TOKEN_CHUNK].detach().cpu().float()
        both += (a.T @ b).double()  # float32 sums of 0/1 are exact below 2**24 per chunk
        learned_count += a.sum(0).double()
        truth_count += b.sum(0).double()
    return both, learned_count, truth_count


def match_by_firing(codes_l: Tensor, truth_fire: Tensor) -> FiringMatching:
    """Hungarian matching of learned latents to truth nodes maximising firing-set Jaccard.

    ``codes_l``: [n_tokens, n_l] codes of one level (fires where > 0); ``truth_fire``:
    [n_tokens, m] BoolTensor, e.g. one level of :meth:`SyntheticForest.sample_with_truth`.
    """
    both, learned_count, truth_count = firing_overlap(codes_l, truth_fire)
    union = learned_count[:, None] + truth_count[None, :] - both
    jaccard = torch.where(union > 0, both / union.clamp(min=1.0), torch.zeros_like(both))
    rows, cols = _hungarian(jaccard)
    total = learned_count[rows] + truth_count[cols]
    pair_both = both[rows, cols]
    f1 = torch.where(total > 0, 2.0 * pair_both / total.clamp(min=1.0), torch.zeros_like(total))
    return FiringMatching(
        learned_idx=rows, truth_idx=cols, jaccard=jaccard[rows, cols].float(), f1=f1.float()
    )


def f1_matrix(both: Tensor, learned_count: Tensor, truth_count: Tensor) -> Tensor:
    """[n, m] firing F1 = 2 |both| / (|learned fires| + |truth fires|) (0 where neither fires)."""
    total = learned_count[:, None] + truth_count[None, :]
    return torch.where(total > 0, 2.0 * both / total.clamp(min=1.0), torch.zeros_like(both))


def match_by_f1(codes_l: Tensor, truth_fire: Tensor) -> FiringMatching:
    """Hungarian matching of learned latents to truth nodes maximising total firing F1.

    ``codes_l``: [n_tokens, n_l] codes of one level (fires where > 0, or bool); ``truth_fire``:
    [n_tokens, m] BoolTensor. ``min(n_l, m)`` pairs; threshold them on ``f1`` as needed.
    """
    both, learned_count, truth_count = firing_overlap(codes_l, truth_fire)
    f1 = f1_matrix(both, learned_count, truth_count)
    rows, cols = _hungarian(f1)
    union = learned_count[rows] + truth_count[cols] - both[rows, cols]
    pair_both = both[rows, cols]
    jaccard = torch.where(union > 0, pair_both / union.clamp(min=1.0), torch.zeros_like(union))
    return FiringMatching(
        learned_idx=rows, truth_idx=cols, jaccard=jaccard.float(), f1=f1[rows, cols].float()
    )


@dataclass
class LevelRecovery:
    """How well one level's latents recover the truth nodes of the matching cut."""

    level: int
    n_learned: int
    n_truth: int
    n_recovered: int
    """Truth nodes matched with cosine >= min_cosine."""
    recovery: float
    """n_recovered / n_truth."""
    mean_cosine: float
    """Mean cosine over all Hungarian pairs (recovered or not)."""
    mean_recovered_cosine: float
    """Mean cosine over recovered pairs (nan if none)."""


@dataclass
class EdgeRecovery:
    """Parent links between level ``level`` and ``level + 1`` against the true links."""

    level: int
    n_learned_judged: int
    """Learned links whose two endpoints are recovered."""
    n_learned_correct: int
    n_true_judged: int
    """True links whose two endpoints are recovered."""
    n_true_found: int
    precision: float
    recall: float


@dataclass
class RecoveryReport:
    """Node and edge recovery of a learned forest against a :class:`SyntheticForest`."""

    min_cosine: float
    levels: list[LevelRecovery] = field(default_factory=list)
    edges: list[EdgeRecovery] = field(default_factory=list)

    @property
    def edge_precision(self) -> float:
        """Pooled over level pairs: correct / judged learned links."""
        return _ratio(
            sum(e.n_learned_correct for e in self.edges),
            sum(e.n_learned_judged for e in self.edges),
        )

    @property
    def edge_recall(self) -> float:
        """Pooled over level pairs: found / judged true links."""
        return _ratio(
            sum(e.n_true_found for e in self.edges), sum(e.n_true_judged for e in self.edges)
        )

    @property
    def edge_f1(self) -> float:
        p, r = self.edge_precision, self.edge_recall
        if math.isnan(p) or math.isnan(r) or p + r == 0:
            return float("nan") if math.isnan(p) or math.isnan(r) else 0.0
        return 2.0 * p * r / (p + r)

    @property
    def node_recovery(self) -> float:
        """Pooled over levels: recovered / truth nodes."""
        return _ratio(
            sum(level.n_recovered for level in self.levels),
            sum(level.n_truth for level in self.levels),
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary: nan ratios become None."""
        summary = asdict(self) | {
            "node_recovery": self.node_recovery,
            "edge_precision": self.edge_precision,
            "edge_recall": self.edge_recall,
            "edge_f1": self.edge_f1,
        }
        return _nan_to_none(summary)  # type: ignore[return-value]


@dataclass
class FiringLevelRecovery:
    """How many truth nodes of one cut have a latent that fires like them (F1 >= min_f1)."""

    level: int
    n_learned: int
    n_truth: int
    n_matched: int
    recovery: float
    """n_matched / n_truth."""
    mean_matched_f1: float
    """Mean F1 over matched pairs (nan if none)."""


@dataclass
class FiringEdgeRecovery:
    """Links from level ``level + 1`` to ``level`` against the truth, endpoints matched by F1."""

    level: int
    n_true_links: int
    """Every truth node of cut ``level + 1`` has one true link."""
    n_learned_judged: int
    """Learned links whose two endpoints are matched."""
    n_strict_correct: int
    """... whose parent is matched to the child's true parent."""
    n_lenient_correct: int
    """... whose parent is matched to the child's true parent or a coarser ancestor."""
    n_true_judged: int
    """True links whose two endpoints are matched."""
    n_true_found: int
    """... that the learned forest has (strict)."""
    n_true_found_lenient: int
    """... where the child's learned parent is matched to the true parent or an ancestor."""
    precision_strict: float
    precision_lenient: float
    recall: float
    recall_lenient: float
    n_split_learned_judged: int = 0
    """Judged learned links whose child's truth node is a split (not its own true parent):
    the non-trivial links; a feature that persists into the wider level links to itself."""
    n_split_strict_correct: int = 0
    n_split_true_judged: int = 0
    """Judged true links of split nodes."""
    n_split_true_found: int = 0


@dataclass
class FiringRecoveryReport:
    """Node and edge recovery of a learned forest, latents matched to truth by firing F1."""

    min_f1: float
    levels: list[FiringLevelRecovery] = field(default_factory=list)
    edges: list[FiringEdgeRecovery] = field(default_factory=list)

    def _pooled(self, numerator: str, denominator: str) -> float:
        return _ratio(
            sum(getattr(e, numerator) for e in self.edges),
            sum(getattr(e, denominator) for e in self.edges),
        )

    @property
    def edge_precision_strict(self) -> float:
        """Pooled over level pairs: strictly correct / judged learned links."""
        return self._pooled("n_strict_correct", "n_learned_judged")

    @property
    def edge_precision_lenient(self) -> float:
        """Pooled: correct up to an ancestor / judged learned links."""
        return self._pooled("n_lenient_correct", "n_learned_judged")

    @property
    def edge_recall(self) -> float:
        """Pooled: found / judged true links (both endpoints matched)."""
        return self._pooled("n_true_found", "n_true_judged")

    @property
    def edge_recall_lenient(self) -> float:
        """Pooled: found up to an ancestor / judged true links."""
        return self._pooled("n_true_found_lenient", "n_true_judged")

    @property
    def split_edge_precision(self) -> float:
        """Strict precision over the learned links whose child is a split truth node."""
        return self._pooled("n_split_strict_correct", "n_split_learned_judged")

    @property
    def split_edge_recall(self) -> float:
        """Recall over the true links of split truth nodes (both endpoints matched)."""
        return self._pooled("n_split_true_found", "n_split_true_judged")

    @property
    def edge_recall_overall(self) -> float:
        """Pooled: found / all true links (an unmatched endpoint counts as not found)."""
        return self._pooled("n_true_found", "n_true_links")

    @property
    def node_recovery(self) -> float:
        """Pooled over levels: matched / truth nodes."""
        return _ratio(
            sum(level.n_matched for level in self.levels),
            sum(level.n_truth for level in self.levels),
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary: nan ratios become None."""
        summary = asdict(self) | {
            "node_recovery": self.node_recovery,
            "edge_precision_strict": self.edge_precision_strict,
            "edge_precision_lenient": self.edge_precision_lenient,
            "edge_recall": self.edge_recall,
            "edge_recall_lenient": self.edge_recall_lenient,
            "edge_recall_overall": self.edge_recall_overall,
            "split_edge_precision": self.split_edge_precision,
            "split_edge_recall": self.split_edge_recall,
        }
        return _nan_to_none(summary)  # type: ignore[return-value]


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _nan_to_none(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(item) for item in value]
    return value


def _level_recovery(
    level: int, matching: Matching, n_learned: int, n_truth: int, min_cosine: float
) -> LevelRecovery:
    recovered = matching.cosine >= min_cosine
    n_recovered = int(recovered.sum())
    return LevelRecovery(
        level=level,
        n_learned=n_learned,
        n_truth=n_truth,
        n_recovered=n_recovered,
        recovery=_ratio(n_recovered, n_truth),
        mean_cosine=matching.mean_cosine,
        mean_recovered_cosine=float(matching.cosine[recovered].mean())
        if n_recovered
        else float("nan"),
    )


def _edge_recovery(
    level: int,
    learned_parents: Tensor,
    true_parents: Tensor,
    upper: Matching,
    lower: Matching,
    sizes: tuple[int, int, int, int],
    min_cosine: float,
) -> EdgeRecovery:
    """Links from level ``level + 1`` (lower) to ``level`` (upper); sizes = learned and truth
    sizes of upper then lower."""
    n_up, n_up_truth, n_low, n_low_truth = sizes
    up_l2t = upper.learned_to_truth(n_up, min_cosine)
    low_l2t = lower.learned_to_truth(n_low, min_cosine)
    up_t2l = upper.truth_to_learned(n_up_truth, min_cosine)
    low_t2l = lower.truth_to_learned(n_low_truth, min_cosine)

    child = (learned_parents >= 0).nonzero(as_tuple=True)[0]
    parent = learned_parents[child]
    child_truth, parent_truth = low_l2t[child], up_l2t[parent]
    judged = (child_truth >= 0) & (parent_truth >= 0)
    correct = true_parents[child_truth[judged]] == parent_truth[judged]

    true_child = (low_t2l >= 0).nonzero(as_tuple=True)[0]
    true_parent_learned = up_t2l[true_parents[true_child]]
    true_judged = true_parent_learned >= 0
    child_learned = low_t2l[true_child[true_judged]]
    found = learned_parents[child_learned] == true_parent_learned[true_judged]
    return EdgeRecovery(
        level=level,
        n_learned_judged=int(judged.sum()),
        n_learned_correct=int(correct.sum()),
        n_true_judged=int(true_judged.sum()),
        n_true_found=int(found.sum()),
        precision=_ratio(int(correct.sum()), int(judged.sum())),
        recall=_ratio(int(found.sum()), int(true_judged.sum())),
    )


def _check_forest(decoders: list[Tensor], parents: list[Tensor], forest: SyntheticForest) -> None:
    if len(decoders) != forest.n_levels:
        raise ValueError(
            f"decoders must have one entry per truth level ({forest.n_levels}), got {len(decoders)}"
        )
    if len(parents) != len(decoders) - 1:
        raise ValueError(f"parents must have {len(decoders) - 1} entries, got {len(parents)}")
    for level, links in enumerate(parents):
        n_children, n_parents = decoders[level + 1].shape[0], decoders[level].shape[0]
        if links.shape != (n_children,):
            raise ValueError(
                f"parents[{level}] must have shape ({n_children},), got {tuple(links.shape)}"
            )
        if links.numel() and (int(links.min()) < UNMATCHED or int(links.max()) >= n_parents):
            raise ValueError(f"parents[{level}] must hold -1 or indices in [0, {n_parents - 1}]")


def forest_recovery(
    decoders: list[Tensor],
    parents: list[Tensor],
    forest: SyntheticForest,
    min_cosine: float = 0.7,
) -> RecoveryReport:
    """Node and parent-link recovery of a learned forest against ``forest``'s truth.

    ``decoders[l]``: [n_l, d] decoder rows of level ``l`` (normalised here); ``parents[l][j]``:
    index in level ``l`` of the parent of level-``l + 1`` latent ``j``, or -1. Level ``l`` is
    matched to the truth cut ``l`` by :func:`match_latents`; only pairs with cosine >=
    ``min_cosine`` count as recovered.
    """
    _check_forest(decoders, parents, forest)
    truths = [forest.level_directions(level) for level in range(forest.n_levels)]
    matchings = [
        match_latents(learned, truth) for learned, truth in zip(decoders, truths, strict=True)
    ]
    report = RecoveryReport(min_cosine=min_cosine)
    for level, matching in enumerate(matchings):
        report.levels.append(
            _level_recovery(
                level, matching, decoders[level].shape[0], truths[level].shape[0], min_cosine
            )
        )
    for level, links in enumerate(parents):
        sizes = (
            decoders[level].shape[0],
            truths[level].shape[0],
            decoders[level + 1].shape[0],
            truths[level + 1].shape[0],
        )
        report.edges.append(
            _edge_recovery(
                level,
                links.detach().cpu().long(),
                forest.true_parents(level),
                matchings[level],
                matchings[level + 1],
                sizes,
                min_cosine,
            )
        )
    return report


def _matched_lookups(
    matching: FiringMatching, n_learned: int, n_truth: int, min_f1: float
) -> tuple[Tensor, Tensor]:
    """learned -> truth and truth -> learned tables of the pairs with F1 >= min_f1 (else -1)."""
    keep = matching.f1 >= min_f1
    return (
        _lookup(matching.learned_idx, matching.truth_idx, keep, n_learned),
        _lookup(matching.truth_idx, matching.learned_idx, keep, n_truth),
    )


def _firing_edge_recovery(
    level: int,
    learned_parents: Tensor,
    true_parents: Tensor,
    lenient: Tensor,
    split: Tensor,
    upper: tuple[Tensor, Tensor],
    lower: tuple[Tensor, Tensor],
) -> FiringEdgeRecovery:
    """Links from level ``level + 1`` (lower) to ``level`` (upper); ``upper`` / ``lower`` are
    the (learned -> truth, truth -> learned) tables; ``lenient`` the ancestor-or-self mask;
    ``split`` flags the lower truth nodes that are not their own true parent."""
    up_l2t, up_t2l = upper
    low_l2t, low_t2l = lower

    child = (learned_parents >= 0).nonzero(as_tuple=True)[0]
    child_truth, parent_truth = low_l2t[child], up_l2t[learned_parents[child]]
    judged = (child_truth >= 0) & (parent_truth >= 0)
    child_truth, parent_truth = child_truth[judged], parent_truth[judged]
    strict = true_parents[child_truth] == parent_truth
    loose = lenient[child_truth, parent_truth]

    true_child = (low_t2l >= 0).nonzero(as_tuple=True)[0]
    true_parent_learned = up_t2l[true_parents[true_child]]
    true_judged = true_parent_learned >= 0
    true_child = true_child[true_judged]
    child_learned = low_t2l[true_child]
    their_parent = learned_parents[child_learned]
    found = their_parent == true_parent_learned[true_judged]
    their_parent_truth = torch.where(
        their_parent >= 0, up_l2t[their_parent.clamp(min=0)], torch.full_like(their_parent, -1)
    )
    found_lenient = (their_parent_truth >= 0) & lenient[true_child, their_parent_truth.clamp(min=0)]
    n_judged, n_true_judged = int(judged.sum()), int(true_judged.sum())
    return FiringEdgeRecovery(
        level=level,
        n_true_links=true_parents.numel(),
        n_learned_judged=n_judged,
        n_strict_correct=int(strict.sum()),
        n_lenient_correct=int(loose.sum()),
        n_true_judged=n_true_judged,
        n_true_found=int(found.sum()),
        n_true_found_lenient=int(found_lenient.sum()),
        precision_strict=_ratio(int(strict.sum()), n_judged),
        precision_lenient=_ratio(int(loose.sum()), n_judged),
        recall=_ratio(int(found.sum()), n_true_judged),
        recall_lenient=_ratio(int(found_lenient.sum()), n_true_judged),
        n_split_learned_judged=int(split[child_truth].sum()),
        n_split_strict_correct=int((strict & split[child_truth]).sum()),
        n_split_true_judged=int(split[true_child].sum()),
        n_split_true_found=int((found & split[true_child]).sum()),
    )


def firing_forest_recovery(
    codes: list[Tensor],
    parents: list[Tensor],
    truth_fire: list[Tensor],
    forest: SyntheticForest,
    min_f1: float = 0.5,
) -> FiringRecoveryReport:
    """Node and parent-link recovery of a learned forest, latents matched to truth by firing.

    ``codes[l]``: [n_tokens, n_l] codes of level ``l`` on held-out tokens (fires where > 0, or
    bool); ``truth_fire[l]``: [n_tokens, n_truth_l] BoolTensor of the same tokens (from
    :meth:`SyntheticForest.sample_with_truth`); ``parents[l][j]``: index in level ``l`` of the
    parent of level-``l + 1`` latent ``j``, or -1. Each level is matched one-to-one to its truth
    cut by :func:`match_by_f1`; only pairs with F1 >= ``min_f1`` count as matched.
    """
    if not 0.0 < min_f1 <= 1.0:
        raise ValueError(f"min_f1 must lie in (0, 1], got {min_f1}")
    if len(truth_fire) != forest.n_levels:
        raise ValueError(
            f"truth_fire must have one entry per truth level ({forest.n_levels}), "
            f"got {len(truth_fire)}"
        )
    shapes = [torch.empty(c.shape[1], 0) for c in codes]
    _check_forest(shapes, parents, forest)
    sizes = forest.level_sizes()
    report = FiringRecoveryReport(min_f1=min_f1)
    tables = []
    for level, (level_codes, fired) in enumerate(zip(codes, truth_fire, strict=True)):
        if fired.shape[1] != sizes[level]:
            raise ValueError(
                f"truth_fire[{level}] must have {sizes[level]} columns, got {fired.shape[1]}"
            )
        matching = match_by_f1(level_codes, fired)
        tables.append(_matched_lookups(matching, level_codes.shape[1], sizes[level], min_f1))
        matched = matching.f1 >= min_f1
        n_matched = int(matched.sum())
        report.levels.append(
            FiringLevelRecovery(
                level=level,
                n_learned=level_codes.shape[1],
                n_truth=sizes[level],
                n_matched=n_matched,
                recovery=_ratio(n_matched, sizes[level]),
                mean_matched_f1=float(matching.f1[matched].mean()) if n_matched else float("nan"),
            )
        )
    for level, links in enumerate(parents):
        report.edges.append(
            _firing_edge_recovery(
                level,
                links.detach().cpu().long(),
                forest.true_parents(level),
                forest.ancestor_or_self(level),
                ~forest.same_as_parent(level),
                tables[level],
                tables[level + 1],
            )
        )
    return report
