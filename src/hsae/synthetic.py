"""Synthetic activations with a known ground-truth feature forest.

This module owns the generator of the synthetic benchmark: a forest of feature directions, a
vectorised token sampler, and the ground truth that a trained HSAE level should recover. Two
families share it (``SyntheticSpec.kind``): "splitting" (below) and "absorption" (at the end).

The forest
    ``n_roots`` trees of depth ``depth`` in ``d`` dimensions plus ``n_independent`` features that
    never split. Roots (and independent features) get random unit directions; a child at depth
    ``k + 1`` gets ``normalise(parent + spread[k - 1] * g)`` with ``g ~ N(0, I / d)``, so
    ``||spread * g|| ~ spread`` and deeper (smaller-spread) splits are finer. Internal nodes
    have between ``branching[0]`` and ``branching[1]`` children. Leaves are the generative atoms.

Sampling a token
    Every unit (root or independent feature) fires independently with its own probability
    (lognormal spread ``frequency_sigma``, scaled so that on average ``active_per_token`` leaves
    are active). A firing internal node passes the token down to one child, drawn with the
    node's (lognormal) child weights, and with probability ``sibling_overlap`` to a second,
    distinct child as well. So siblings are mostly exclusive, a node fires exactly when some
    leaf below it fires, and children fire only when their parent fires. Each active leaf gets
    a magnitude ``exp(magnitude_sigma * N(0, 1))`` (median 1); ``x = sum magnitude * leaf
    direction + noise_std * N(0, I)``.

The truth at level ``l`` (0-based; the cut at depth ``l + 1``)
    The nodes at depth ``l + 1`` plus the leaves shallower than that (they persist unsplit).
    A cut node's direction is the normalised expected contribution of its subtree given that it
    fires, ``sum_leaf P(leaf | node) * leaf_direction`` (magnitudes share one mean, so this is
    the magnitude-weighted mean of its leaves): what an SAE latent at that granularity learns.
    The true parent of a level-``l + 1`` node is its ancestor in cut ``l``, or itself if it did
    not split. Cut nodes are ordered by depth-first preorder, so a subtree is contiguous.

The absorption family (``kind="absorption"``, preset :meth:`SyntheticSpec.absorption`)
    Modelled on feature absorption in LLM SAEs: *every* node is a generative atom with its own
    direction, and a child points mostly its own way: ``normalise(parent_share * parent + u)``
    with ``u`` a random unit vector. A firing internal node passes the token down with
    probability ``descend_probability`` (else it fires alone); a share ``exclusive_share`` of
    internal nodes have mutually exclusive children (one at most), the others pass a second
    child with probability ``sibling_overlap``. A child fires only with its parent and the
    parent still contributes: ``x = sum over firing nodes of magnitude * direction + noise``.
    ``active_per_token`` counts active atoms (all firing nodes). The truth at level ``l`` is
    every node of depth ``<= l + 1`` (a wider level keeps the coarser features and adds the
    next depth), each with its own direction; the true parent of a level-``l + 1`` node is its
    tree parent if it is new at that level (depth ``l + 2``), else itself.

Firing rates
    Unit (root and independent) rates are lognormal (``frequency_sigma``) or, with
    ``zipf_exponent`` set, Zipf-like: ``rank ** -zipf_exponent`` over a random ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

MAX_BRANCHING = 64
CHUNK_ENTRIES = 1 << 24
"""Token chunks are sized so the dense [tokens, atoms] magnitude matrix stays near 64 MiB."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of a synthetic forest; validated on construction (``ValueError`` per field)."""

    d: int = 64
    """Activation dimension, >= 2."""
    n_roots: int = 16
    """Number of trees, >= 0."""
    depth: int = 4
    """Depth of every tree (= number of truth levels), >= 1; roots are at depth 1."""
    branching: tuple[int, int] = (2, 3)
    """Inclusive (min, max) number of children of an internal node, 1 <= min <= max <= 64."""
    n_independent: int = 16
    """Features outside every tree; they never split. ``n_roots + n_independent >= 1``."""
    active_per_token: float = 6.0
    """Expected number of active atoms per token (leaves incl. independent features; absorption:
    every firing node), > 0."""
    sibling_overlap: float = 0.1
    """Probability that a firing internal node passes the token to a second child, in [0, 1]."""
    spread: tuple[float, ...] = (0.6, 0.45, 0.3)
    """Noise scale of child directions around their parent, per depth below the root; exactly
    ``depth - 1`` finite values >= 0."""
    magnitude_sigma: float = 0.4
    """Log-scale spread of the lognormal (median 1) magnitude of an active atom, >= 0."""
    noise_std: float = 0.02
    """Standard deviation of the isotropic gaussian noise added to every token, >= 0."""
    frequency_sigma: float = 0.5
    """Log-scale spread of unit firing rates and of child weights (lognormal), >= 0."""
    seed: int = 0
    """Seed of the forest's structure, directions and firing rates."""
    kind: Literal["splitting", "absorption"] = "splitting"
    """"splitting": leaves are the atoms, children cluster around their parent (``spread``).
    "absorption": every node is an atom, children point their own way (module docstring)."""
    parent_share: float = 0.3
    """Absorption only: a child's direction is ``normalise(parent_share * parent + u)``, ``u`` a
    random unit vector (cosine with the parent about ``parent_share / sqrt(1 + share**2)``
    for large d); >= 0."""
    descend_probability: float = 0.6
    """Absorption only: probability that a firing internal node passes the token to its
    children (otherwise it fires alone), in [0, 1]."""
    exclusive_share: float = 0.5
    """Absorption only: share of internal nodes whose children are mutually exclusive (never a
    second child); the others pass a second child with probability ``sibling_overlap``.
    In [0, 1]."""
    zipf_exponent: float | None = None
    """Unit firing rates ``rank ** -zipf_exponent`` over a random ranking of the units instead of
    lognormal(``frequency_sigma``); None (lognormal) or a finite number > 0."""

    @classmethod
    def absorption(cls, **changes: Any) -> SyntheticSpec:
        """The absorption family's preset (8 trees of depth 4 plus 24 independent features;
        truth sizes about 32 / 50 / 100 / 230), with ``changes`` applied on top."""
        preset: dict[str, Any] = {
            "kind": "absorption",
            "n_roots": 8,
            "n_independent": 24,
            "branching": (2, 3),
            "active_per_token": 3.0,
            "sibling_overlap": 0.3,
            "zipf_exponent": 0.8,
        }
        return cls(**(preset | changes))

    def __post_init__(self) -> None:
        for name in ("branching", "spread"):  # accept lists; store hashable tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _require_int("d", self.d, 2)
        _require_int("n_roots", self.n_roots, 0)
        _require_int("depth", self.depth, 1)
        _require_int("n_independent", self.n_independent, 0)
        _require_int("seed", self.seed, 0)
        _validate_branching(self.branching)
        if self.n_roots + self.n_independent < 1:
            raise ValueError(
                "n_roots + n_independent must be >= 1, "
                f"got n_roots={self.n_roots}, n_independent={self.n_independent}"
            )
        _require_float("active_per_token", self.active_per_token, 0.0, math.inf, low_open=True)
        _require_float("sibling_overlap", self.sibling_overlap, 0.0, 1.0)
        _require_float("magnitude_sigma", self.magnitude_sigma, 0.0, math.inf)
        _require_float("noise_std", self.noise_std, 0.0, math.inf)
        _require_float("frequency_sigma", self.frequency_sigma, 0.0, math.inf)
        _validate_spread(self.spread, self.depth)
        if self.kind not in ("splitting", "absorption"):
            raise ValueError(f"kind must be 'splitting' or 'absorption', got {self.kind!r}")
        _require_float("parent_share", self.parent_share, 0.0, math.inf)
        _require_float("descend_probability", self.descend_probability, 0.0, 1.0)
        _require_float("exclusive_share", self.exclusive_share, 0.0, 1.0)
        if self.zipf_exponent is not None:
            _require_float("zipf_exponent", self.zipf_exponent, 0.0, math.inf, low_open=True)


def _require_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _require_float(
    name: str, value: object, low: float, high: float, low_open: bool = False
) -> None:
    bracket = "(" if low_open else "["
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if valid:
        number = float(value)  # type: ignore[arg-type]
        valid = math.isfinite(number) and (number > low if low_open else number >= low)
        valid = valid and number <= high
    if not valid:
        upper = "inf)" if math.isinf(high) else f"{high}]"
        raise ValueError(
            f"{name} must be a finite number in {bracket}{low}, {upper}, got {value!r}"
        )


def _validate_branching(branching: object) -> None:
    ok = isinstance(branching, tuple) and len(branching) == 2
    ok = ok and all(isinstance(b, int) and not isinstance(b, bool) for b in branching)  # type: ignore[union-attr]
    ok = ok and 1 <= branching[0] <= branching[1] <= MAX_BRANCHING  # type: ignore[index]
    if not ok:
        raise ValueError(
            f"branching must be a tuple (min, max) of integers with 1 <= min <= max <= "
            f"{MAX_BRANCHING}, got {branching!r}"
        )


def _validate_spread(spread: object, depth: int) -> None:
    ok = isinstance(spread, tuple) and len(spread) == depth - 1
    ok = ok and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0
        for s in spread  # type: ignore[union-attr]
    )
    if not ok:
        raise ValueError(
            f"spread must be a tuple of depth - 1 = {depth - 1} finite numbers in [0, inf), "
            f"got {spread!r}"
        )


@dataclass(frozen=True)
class _Structure:
    """The forest's nodes in depth-first preorder (trees first, then independent features)."""

    parent: Tensor  # [n_nodes] node id of the parent, -1 for units
    depth: Tensor  # [n_nodes] 1-based depth
    direction: Tensor  # [n_nodes, d] unit prototype direction (leaves: the generative atom)
    child_weight: Tensor  # [n_nodes] weight of a node among its siblings (normalised)

    @property
    def n_nodes(self) -> int:
        return self.parent.numel()


def _unit(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _build_structure(spec: SyntheticSpec, generator: torch.Generator) -> _Structure:
    """Grow the trees depth-first; a few hundred nodes, so a Python walk over nodes is fine."""
    parents: list[int] = []
    depths: list[int] = []
    directions: list[Tensor] = []
    weights: list[float] = []

    def add(parent: int, depth: int, direction: Tensor, weight: float) -> int:
        parents.append(parent)
        depths.append(depth)
        directions.append(direction)
        weights.append(weight)
        return len(parents) - 1

    def grow(node: int) -> None:
        depth = depths[node]
        if depth == spec.depth:
            return
        low, high = spec.branching
        n_children = int(torch.randint(low, high + 1, (1,), generator=generator))
        raw = torch.exp(spec.frequency_sigma * torch.randn(n_children, generator=generator))
        share = raw / raw.sum()
        scale = spec.spread[depth - 1] / math.sqrt(spec.d)
        for k in range(n_children):
            noise = torch.randn(spec.d, generator=generator, dtype=torch.float64)
            if spec.kind == "absorption":  # mostly its own direction
                direction = _unit(spec.parent_share * directions[node] + _unit(noise))
            else:  # clustered around the parent
                direction = _unit(directions[node] + scale * noise)
            child = add(node, depth + 1, direction, float(share[k]))
            grow(child)

    for _ in range(spec.n_roots):
        grow(add(-1, 1, _unit(torch.randn(spec.d, generator=generator, dtype=torch.float64)), 1.0))
    for _ in range(spec.n_independent):
        add(-1, 1, _unit(torch.randn(spec.d, generator=generator, dtype=torch.float64)), 1.0)
    return _Structure(
        parent=torch.tensor(parents, dtype=torch.long),
        depth=torch.tensor(depths, dtype=torch.long),
        direction=torch.stack(directions),
        child_weight=torch.tensor(weights, dtype=torch.float64),
    )


def _child_table(parent: Tensor, child_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Children of every node, padded: ids [n_nodes, B] (-1) and weights (0)."""
    n_nodes = parent.numel()
    has_parent = parent >= 0
    counts = torch.bincount(parent[has_parent], minlength=n_nodes)
    width = max(int(counts.max()) if n_nodes else 0, 1)
    table = torch.full((n_nodes, width), -1, dtype=torch.long)
    weight = torch.zeros(n_nodes, width, dtype=torch.float32)
    children = has_parent.nonzero(as_tuple=True)[0]
    order = torch.argsort(parent[children], stable=True)  # group siblings, keep their order
    children = children[order]
    owners = parent[children]
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(children.numel()) - first[owners]
    table[owners, slot] = children
    weight[owners, slot] = child_weight[children].float()
    return table, weight


def _pass_probability(
    parent: Tensor, child_weight: Tensor, overlap: Tensor, descend: Tensor
) -> Tensor:
    """P(child fires | parent fires) for every node (1 for units).

    A firing parent p passes the token down with probability ``descend[p]``; then it picks a
    first child with probability ``w_c`` and, with probability ``overlap[p]``, a second distinct
    child with probability ``w_c / (1 - w_first)`` (an only child is always picked).
    """
    n_nodes = parent.numel()
    has_parent = parent >= 0
    children = has_parent.nonzero(as_tuple=True)[0]
    owners = parent[children]
    w = child_weight[children]
    counts = torch.bincount(owners, minlength=n_nodes)
    # sum over siblings c' != c of w_c' / (1 - w_c'); only children get a first pick of 1.
    ratio = torch.where(w < 1.0, w / (1.0 - w).clamp(min=1e-300), torch.zeros_like(w))
    ratio_sum = torch.zeros(n_nodes, dtype=torch.float64).index_add_(0, owners, ratio)
    second = w * (ratio_sum[owners] - ratio)
    probability = torch.ones(n_nodes, dtype=torch.float64)
    picked = torch.where(counts[owners] > 1, w + overlap[owners] * second, 1.0)
    probability[children] = descend[owners] * picked
    return probability


class SyntheticForest:
    """A ground-truth feature forest, its token sampler and its per-level truth.

    Build with :func:`make_synthetic_forest`. Levels are 0-based: level ``l`` is the cut of the
    forest at depth ``l + 1``; there are ``spec.depth`` levels.
    """

    def __init__(self, spec: SyntheticSpec) -> None:
        generator = torch.Generator().manual_seed(spec.seed)
        structure = _build_structure(spec, generator)
        self.spec = spec
        self._parent = structure.parent
        self._depth = structure.depth
        self._children, self._child_weight_table = _child_table(
            structure.parent, structure.child_weight
        )
        self._is_leaf = self._children[:, 0] < 0
        self._n_children = (self._children >= 0).sum(1)
        self._absorption = spec.kind == "absorption"
        # The generative atoms: the leaves (splitting) or every node (absorption).
        is_atom = torch.ones_like(self._is_leaf) if self._absorption else self._is_leaf
        self._atom_nodes = is_atom.nonzero(as_tuple=True)[0]
        self._atom_index = torch.full((structure.n_nodes,), -1, dtype=torch.long)
        self._atom_index[self._atom_nodes] = torch.arange(self._atom_nodes.numel())
        self.atom_directions: Tensor = structure.direction[self._atom_nodes].float()
        """[n_atoms, d] unit directions of the generative atoms, in depth-first preorder."""
        self._units = (structure.parent < 0).nonzero(as_tuple=True)[0]
        if spec.zipf_exponent is None:
            rates = torch.exp(
                spec.frequency_sigma
                * torch.randn(self._units.numel(), generator=generator, dtype=torch.float64)
            )
        else:
            rank = torch.randperm(self._units.numel(), generator=generator) + 1
            rates = rank.double() ** -spec.zipf_exponent
        n_nodes = structure.n_nodes
        self._overlap = torch.full((n_nodes,), spec.sibling_overlap, dtype=torch.float64)
        self._descend = torch.ones(n_nodes, dtype=torch.float64)
        self.exclusive = torch.zeros(n_nodes, dtype=torch.bool)
        """[n_nodes] whether a node's children are mutually exclusive (absorption family)."""
        if self._absorption:
            draw = torch.rand(n_nodes, generator=generator, dtype=torch.float64)
            self.exclusive = (draw < spec.exclusive_share) & ~self._is_leaf
            self._overlap[self.exclusive] = 0.0
            self._descend.fill_(spec.descend_probability)
        self._pass = _pass_probability(
            structure.parent, structure.child_weight, self._overlap, self._descend
        )
        self._truth_direction, expected_atoms = self._subtree_means(structure.direction)
        self.unit_probability: Tensor = _calibrate_rates(
            rates, expected_atoms[self._units], spec.active_per_token
        )
        """[n_roots + n_independent] firing probability of every unit (trees first)."""
        self._cut_nodes, self._cut_position = self._cuts()

    # ----------------------------------------------------------------------------- structure
    def _subtree_means(self, prototype: Tensor) -> tuple[Tensor, Tensor]:
        """Per node: truth direction and expected active atoms if it fires.

        Splitting: the unit expected contribution direction of the subtree. Absorption: the
        node's own direction (every node is an atom).
        Small structural sums run in NumPy: ``np.add.at`` stays single-threaded, where a tiny
        multi-threaded ``index_add_`` can stall for seconds on a busy machine.
        """
        is_atom = np.zeros(self._parent.numel(), dtype=bool)
        is_atom[self._atom_nodes.numpy()] = True
        parent, depth, passing = self._parent.numpy(), self._depth.numpy(), self._pass.numpy()
        mean = np.where(is_atom[:, None], prototype.numpy(), 0.0)
        expected = is_atom.astype(np.float64)
        for level in range(int(depth.max()), 1, -1):  # bottom-up, one depth at a time
            nodes = np.flatnonzero(depth == level)
            np.add.at(mean, parent[nodes], passing[nodes, None] * mean[nodes])
            np.add.at(expected, parent[nodes], passing[nodes] * expected[nodes])
        if self._absorption:
            mean = prototype.numpy()
        return _unit(torch.from_numpy(mean)).float(), torch.from_numpy(expected)

    def _cuts(self) -> tuple[list[Tensor], Tensor]:
        cut_nodes: list[Tensor] = []
        position = torch.full((self.spec.depth, self._parent.numel()), -1, dtype=torch.long)
        for level in range(self.spec.depth):
            members = (self._depth == level + 1) | (self._is_leaf & (self._depth <= level + 1))
            if self._absorption:  # a wider level keeps every coarser feature
                members = self._depth <= level + 1
            nodes = members.nonzero(as_tuple=True)[0]
            cut_nodes.append(nodes)
            position[level, nodes] = torch.arange(nodes.numel())
        return cut_nodes, position

    @property
    def n_levels(self) -> int:
        return self.spec.depth

    @property
    def n_atoms(self) -> int:
        """Number of generative atoms (leaves for splitting, all nodes for absorption)."""
        return self._atom_nodes.numel()

    def _check_level(self, level: int, top: int) -> None:
        if not 0 <= level < top:
            raise ValueError(f"level must be in [0, {top - 1}], got {level}")

    def level_sizes(self) -> list[int]:
        """Number of truth nodes in each cut, levels 0..depth-1 (cut depths 1..depth)."""
        return [nodes.numel() for nodes in self._cut_nodes]

    def suggested_level_sizes(self, multiple: int = 16) -> list[int]:
        """HSAE level sizes for this forest: each truth size rounded up to ``multiple``."""
        return [-(-size // multiple) * multiple for size in self.level_sizes()]

    def level_directions(self, level: int) -> Tensor:
        """[n_truth_level, d] unit directions of the truth nodes of cut ``level``."""
        self._check_level(level, self.n_levels)
        return self._truth_direction[self._cut_nodes[level]].clone()

    def true_parents(self, level: int) -> Tensor:
        """LongTensor [n_truth_{level+1}]: index in cut ``level`` of each next-cut node's parent."""
        self._check_level(level, self.n_levels - 1)
        nodes = self._cut_nodes[level + 1]
        split = self._depth[nodes] == level + 2
        ancestor = torch.where(split, self._parent[nodes], nodes)
        return self._cut_position[level, ancestor].clone()

    def ancestor_or_self(self, level: int) -> Tensor:
        """BoolTensor [n_truth_{level+1}, n_truth_level]: True where the cut-``level`` node is the
        cut-``level + 1`` node itself or one of its ancestors (the lenient parent relation).

        For the splitting family each row has exactly one True, the true parent; for the
        absorption family the coarser ancestors (grandparents, ...) count too.
        """
        self._check_level(level, self.n_levels - 1)
        lower, upper = self._cut_nodes[level + 1], self._cut_nodes[level]
        # ancestors[node, k]: the node's ancestor at depth k + 1 (itself at its own depth).
        n_nodes, depth_max = self._parent.numel(), int(self._depth.max())
        ancestors = torch.full((n_nodes, depth_max), -1, dtype=torch.long)
        node = torch.arange(n_nodes)
        current = node.clone()
        for _ in range(depth_max):  # walk up one depth at a time, all nodes at once
            alive = current >= 0
            ancestors[node[alive], self._depth[current[alive]] - 1] = current[alive]
            current = torch.where(alive, self._parent[current.clamp(min=0)], current)
        at_depth = ancestors[lower][:, self._depth[upper] - 1]  # [n_lower, n_upper]
        return at_depth == upper[None, :]

    def same_as_parent(self, level: int) -> Tensor:
        """BoolTensor [n_truth_{level+1}]: the cut-``level + 1`` nodes that are the same forest
        node as their true parent (unsplit leaves; absorption: every coarser feature)."""
        self._check_level(level, self.n_levels - 1)
        return self._depth[self._cut_nodes[level + 1]] <= level + 1

    def exclusive_parents(self, level: int) -> Tensor:
        """BoolTensor [n_truth_level]: cut-``level`` nodes whose children never co-fire."""
        self._check_level(level, self.n_levels)
        return self.exclusive[self._cut_nodes[level]].clone()

    def level_firing_rates(self, level: int) -> Tensor:
        """[n_truth_level] exact probability that each truth node of cut ``level`` fires."""
        self._check_level(level, self.n_levels)
        probability = torch.zeros(self._parent.numel(), dtype=torch.float64)
        probability[self._units] = self.unit_probability
        for depth in range(2, int(self._depth.max()) + 1):
            nodes = (self._depth == depth).nonzero(as_tuple=True)[0]
            probability[nodes] = probability[self._parent[nodes]] * self._pass[nodes]
        return probability[self._cut_nodes[level]]

    # ------------------------------------------------------------------------------ sampling
    def sample(self, n_tokens: int, generator: torch.Generator | None = None) -> Tensor:
        """[n_tokens, d] float32 activations (vectorised over tokens, chunked for memory)."""
        return self._sample(n_tokens, generator, with_truth=False)[0]

    def sample_with_truth(
        self, n_tokens: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Activations and, per level, a BoolTensor [n_tokens, n_truth_level] of truth firing.

        The activations equal :meth:`sample`'s for the same generator state.
        """
        return self._sample(n_tokens, generator, with_truth=True)

    def _sample(
        self, n_tokens: int, generator: torch.Generator | None, with_truth: bool
    ) -> tuple[Tensor, list[Tensor]]:
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"n_tokens must be an integer >= 0, got {n_tokens!r}")
        x = torch.empty(n_tokens, self.spec.d, dtype=torch.float32)
        sizes = self.level_sizes() if with_truth else []
        truth = [torch.zeros(n_tokens, size, dtype=torch.bool) for size in sizes]
        chunk = max(1024, CHUNK_ENTRIES // max(self.n_atoms, 1))
        for start in range(0, n_tokens, chunk):
            stop = min(start + chunk, n_tokens)
            token, node = self._fired_nodes(stop - start, generator)
            x[start:stop] = self._activations(stop - start, token, node, generator)
            for level, fired in enumerate(truth):
                position = self._cut_position[level, node]
                keep = position >= 0
                flat = (start + token[keep]) * fired.shape[1] + position[keep]
                fired.view(-1)[flat] = True
        return x, truth

    def _fired_nodes(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """All (token, node) pairs that fire in a chunk of ``n`` tokens, descending the trees."""
        fires = torch.rand(n, self._units.numel(), generator=generator) < self.unit_probability
        token, unit = fires.nonzero(as_tuple=True)
        node = self._units[unit]
        tokens, nodes = [token], [node]
        while node.numel():
            internal = ~self._is_leaf[node]
            if self._absorption:  # a firing node may fire alone
                internal &= torch.rand(node.numel(), generator=generator) < self._descend[node]
            token, node = self._descend_once(token[internal], node[internal], generator)
            tokens.append(token)
            nodes.append(node)
        return torch.cat(tokens), torch.cat(nodes)

    def _descend_once(
        self, token: Tensor, node: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Children that fire: one drawn by weight and, w.p. the node's overlap, a second one.

        The second child is drawn from the remaining siblings in proportion to their weights
        (sampling without replacement); only children never get a second pick.
        """
        width = self._children.shape[1]
        weight = self._child_weight_table[node]
        first_slot = _inverse_cdf(weight, torch.rand(node.numel(), generator=generator))
        first = self._children.view(-1)[node * width + first_slot]
        if width < 2:
            return token, first
        chance = torch.rand(node.numel(), generator=generator) < self._overlap[node]
        again = (chance & (self._n_children[node] > 1)).nonzero(as_tuple=True)[0]
        rest = weight[again].scatter(1, first_slot[again, None], 0.0)
        second_slot = _inverse_cdf(rest, torch.rand(again.numel(), generator=generator))
        second = self._children.view(-1)[node[again] * width + second_slot]
        return torch.cat([token, token[again]]), torch.cat([first, second])

    def _activations(
        self, n: int, token: Tensor, node: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        atom = self._atom_index[node]
        is_atom = atom >= 0
        token, atom = token[is_atom], atom[is_atom]
        magnitude = torch.exp(
            self.spec.magnitude_sigma * torch.randn(atom.numel(), generator=generator)
        )
        codes = torch.zeros(n, self.n_atoms, dtype=torch.float32)
        codes.view(-1)[token * self.n_atoms + atom] = magnitude
        x = codes @ self.atom_directions
        if self.spec.noise_std > 0:
            x += self.spec.noise_std * torch.randn(n, self.spec.d, generator=generator)
        return x


def _inverse_cdf(weight: Tensor, uniform: Tensor) -> Tensor:
    """Column drawn from each row of non-negative ``weight`` [P, B] given uniforms [P]."""
    cumulative = weight.cumsum(1)
    threshold = uniform * cumulative[:, -1]
    slot = (cumulative <= threshold[:, None]).sum(1).clamp(max=weight.shape[1] - 1)
    # u * total can round up to total and land on a zero-weight slot: take the heaviest one.
    bad = (weight.gather(1, slot[:, None]).squeeze(1) <= 0).nonzero(as_tuple=True)[0]
    slot[bad] = weight[bad].argmax(1)
    return slot


def _calibrate_rates(rates: Tensor, expected_atoms: Tensor, target: float) -> Tensor:
    """Scale relative firing rates (clipped at 1) so the expected active atoms equal target."""
    ceiling = float(expected_atoms.sum())
    if target > ceiling * (1.0 - 1e-9):
        raise ValueError(
            f"active_per_token must be < {ceiling:.3f} for this forest (every unit always "
            f"firing gives that many active atoms), got {target}"
        )
    low, high = 0.0, 1.0 / float(rates.min())
    for _ in range(200):
        mid = 0.5 * (low + high)
        if float((mid * rates).clamp(max=1.0) @ expected_atoms) < target:
            low = mid
        else:
            high = mid
    return (0.5 * (low + high) * rates).clamp(max=1.0)


def make_synthetic_forest(spec: SyntheticSpec | None = None) -> SyntheticForest:
    """Build the forest of ``spec`` (default: :class:`SyntheticSpec`'s defaults)."""
    return SyntheticForest(spec if spec is not None else SyntheticSpec())
