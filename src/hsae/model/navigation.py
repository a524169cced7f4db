"""Walking the feature forest: children, ancestors, subtrees, roots and a table of every node.

Plain functions over a forest (the list of ``L - 1`` parent-link LongTensors of
:mod:`hsae.model.forest`: ``forest[l][j]`` is the level-``l`` parent of level-``l+1`` feature
``j``, or -1) and the level sizes; :class:`hsae.model.HSAE` exposes them as methods
(``model.children(level, i)``, ``model.ancestors(level, i)``, ...). A node is a
``(level, index)`` pair. Every feature of level 0, and every unassigned feature of a deeper
level, is the root of its own tree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hsae.errors import HSAEError

Node = tuple[int, int]


class NavigationError(HSAEError, IndexError):
    """A level or feature index outside the model."""


def check_node(
    level_sizes: Sequence[int], level: int, index: int, error: type[Exception] = NavigationError
) -> None:
    """Raise ``error`` (one line) unless ``(level, index)`` names a feature of the model."""
    if not isinstance(level, int) or not 0 <= level < len(level_sizes):
        raise error(f"level must lie in [0, {len(level_sizes) - 1}], got {level}")
    if not isinstance(index, int) or not 0 <= index < level_sizes[level]:
        raise error(
            f"feature index of level {level} must lie in [0, {level_sizes[level] - 1}], got {index}"
        )


def children(
    forest: Sequence[Tensor], level_sizes: Sequence[int], level: int, index: int
) -> Tensor:
    """Indices in ``level + 1`` of the children of ``(level, index)``, ascending (a LongTensor,
    empty for a leaf or a feature of the last level)."""
    check_node(level_sizes, level, index)
    if level == len(level_sizes) - 1:
        return torch.zeros(0, dtype=torch.long)
    return (forest[level].cpu() == index).nonzero(as_tuple=True)[0]


def parent(
    forest: Sequence[Tensor], level_sizes: Sequence[int], level: int, index: int
) -> Node | None:
    """The parent ``(level - 1, p)`` of a node, or None for a root."""
    check_node(level_sizes, level, index)
    if level == 0:
        return None
    link = int(forest[level - 1][index])
    return (level - 1, link) if link >= 0 else None


def ancestors(
    forest: Sequence[Tensor], level_sizes: Sequence[int], level: int, index: int
) -> list[Node]:
    """The node's parent, grandparent, ... up to its tree's root (empty for a root)."""
    chain: list[Node] = []
    node = parent(forest, level_sizes, level, index)
    while node is not None:
        chain.append(node)
        node = parent(forest, level_sizes, *node)
    return chain


def subtree(
    forest: Sequence[Tensor], level_sizes: Sequence[int], level: int, index: int
) -> list[Node]:
    """The node and all its descendants, breadth first (level by level, ascending indices)."""
    check_node(level_sizes, level, index)
    nodes: list[Node] = [(level, index)]
    frontier = torch.tensor([index], dtype=torch.long)
    for deeper in range(level + 1, len(level_sizes)):
        frontier = torch.isin(forest[deeper - 1].cpu(), frontier).nonzero(as_tuple=True)[0]
        if frontier.numel() == 0:
            break
        nodes += [(deeper, int(i)) for i in frontier.tolist()]
    return nodes


def roots(forest: Sequence[Tensor], level_sizes: Sequence[int]) -> list[Node]:
    """Roots of every tree: all of level 0, then each level's unassigned features."""
    found: list[Node] = [(0, i) for i in range(level_sizes[0])]
    for level in range(1, len(level_sizes)):
        unassigned = (forest[level - 1].cpu() < 0).nonzero(as_tuple=True)[0]
        found += [(level, int(i)) for i in unassigned.tolist()]
    return found


def children_lists(forest: Sequence[Tensor], level_sizes: Sequence[int]) -> list[list[list[int]]]:
    """Per level, per feature, its children in the next level (ascending); one sort per level."""
    lists: list[list[list[int]]] = []
    for level, size in enumerate(level_sizes):
        if level == len(level_sizes) - 1:
            lists.append([[] for _ in range(size)])
            continue
        links = forest[level].cpu()
        linked = (links >= 0).nonzero(as_tuple=True)[0]
        order = linked[torch.argsort(links[linked], stable=True)]
        counts = torch.bincount(links[order], minlength=size).tolist()
        flat = order.tolist()
        starts = [0]
        for count in counts:
            starts.append(starts[-1] + count)
        lists.append([flat[starts[i] : starts[i + 1]] for i in range(size)])
    return lists


def walk(forest: Sequence[Tensor], level_sizes: Sequence[int]) -> Iterator[Node]:
    """Every node once, tree by tree (in the order of :func:`roots`), each tree depth first
    (a parent before its children, children in ascending index)."""
    kids = children_lists(forest, level_sizes)
    for root in roots(forest, level_sizes):
        stack = [root]
        while stack:
            level, index = stack.pop()
            yield level, index
            if level + 1 < len(level_sizes):
                stack += [(level + 1, kid) for kid in reversed(kids[level][index])]


def forest_table(
    forest: Sequence[Tensor],
    level_sizes: Sequence[int],
    frequencies: Sequence[Any] | None = None,
    labels: Mapping[Any, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per feature, level by level: ``level``, ``feature``, ``parent`` (index in the
    level above, -1 for a root), ``n_children``, ``frequency`` and ``label``.

    ``frequencies[l]`` (tensor, array or list of ``level_sizes[l]`` numbers, e.g. firing rates)
    fills ``frequency`` (None without it); ``labels`` maps ``"level:index"`` strings or
    ``(level, index)`` pairs to a label (None where absent). ``pandas.DataFrame(rows)`` turns
    the result into a table.
    """
    if frequencies is not None and len(frequencies) != len(level_sizes):
        raise NavigationError(
            f"frequencies must hold one entry per level ({len(level_sizes)}), "
            f"got {len(frequencies)}"
        )
    names_by_level = _labels_by_level(labels or {}, level_sizes)
    rows: list[dict[str, Any]] = []
    for level, size in enumerate(level_sizes):
        links = forest[level - 1].cpu() if level > 0 else torch.full((size,), -1, dtype=torch.long)
        if level + 1 < len(level_sizes):
            following = forest[level].cpu()
            n_children = torch.bincount(following[following >= 0], minlength=size)
        else:
            n_children = torch.zeros(size, dtype=torch.long)
        if frequencies is not None:
            column = torch.as_tensor(frequencies[level], dtype=torch.float64).reshape(-1).cpu()
            if column.numel() != size:
                raise NavigationError(
                    f"frequencies[{level}] must hold {size} values, got {column.numel()}"
                )
            freq: list[Any] = column.tolist()
        else:
            freq = [None] * size
        names = names_by_level[level] if level in names_by_level else [None] * size
        rows += [
            {
                "level": level,
                "feature": feature,
                "parent": link,
                "n_children": count,
                "frequency": rate,
                "label": name,
            }
            for feature, link, count, rate, name in zip(
                range(size), links.tolist(), n_children.tolist(), freq, names, strict=True
            )
        ]
    return rows


def _labels_by_level(
    labels: Mapping[Any, str], level_sizes: Sequence[int]
) -> dict[int, list[str | None]]:
    """Per level with any label, the label of each feature (None where absent)."""
    by_level: dict[int, list[str | None]] = {}
    for key, name in labels.items():
        try:
            level, index = (int(p) for p in key.split(":")) if isinstance(key, str) else key
        except (TypeError, ValueError):
            raise NavigationError(
                f"labels keys must be 'level:index' strings or (level, index) pairs, got {key!r}"
            ) from None
        if 0 <= level < len(level_sizes) and 0 <= index < level_sizes[level]:
            by_level.setdefault(level, [None] * level_sizes[level])[index] = name
    return by_level
