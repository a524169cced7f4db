"""The two mechanisms that tie adjacent levels together (``hsae-method.md`` sections 2 and 3).

* :func:`parent_children_constraint`: sum over parents p with children of
  ||f_p(x) - sum_{c in C(p)} f_c(x)||^2, batch-averaged, computed from activations, per-child
  decoder dot products and the decoder dot products of co-active siblings only. No
  [batch, features, d] tensor is formed.
* :func:`sample_perturbation` and :func:`perturbed_reconstruction`: each parent with children is
  substituted, with probability r shared across the batch, by the sum of its children's outputs
  in its own level's reconstruction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsae.model.kernels import decoder_gram, lookup_entries, row_pair_dots
from hsae.model.level import Level, LevelCodes


def has_children(parent_index: Tensor, n_parents: int) -> Tensor:
    flags = torch.zeros(n_parents, dtype=torch.bool, device=parent_index.device)
    flags[parent_index[parent_index >= 0]] = True
    return flags


def parent_children_constraint(
    parent_codes: LevelCodes,
    child_codes: LevelCodes,
    parent_decoder: Tensor,
    child_decoder: Tensor,
    parent_index: Tensor,
) -> Tensor:
    """Batch mean of sum_p ||a_p d_p - sum_{c in C(p)} a_c d_c||^2 (unit-norm decoders).

    Expanded as a_p^2 - 2 a_p sum_c a_c <d_p, d_c> + sum_{c, c'} a_c a_c' <d_c, d_c'>, every sum
    running over support entries only (latents off the support have zero value and zero
    gradient); the last sum over pairs of siblings both in the support at the same token. The
    squared norms are kept as <d, d> rather than 1 so the gradient equals that of the
    unexpanded form (it differs along d itself, which Adam would otherwise see differently).
    """
    n_tokens, n_parents = parent_codes.pre.shape
    if not bool((parent_index >= 0).any()):
        return parent_codes.pre.new_zeros(())
    with_children = has_children(parent_index, n_parents)
    parent_sq, child_sq, child_parent = decoder_gram(parent_decoder, child_decoder, parent_index)
    parent_weights = parent_sq * with_children
    parent_energy = (
        parent_codes.values.pow(2) * parent_weights.index_select(0, parent_codes.cols)
    ).sum()

    entries = (parent_index[child_codes.cols] >= 0).nonzero(as_tuple=True)[0]
    cols = child_codes.cols[entries]
    parents = parent_index[cols]
    child_values = child_codes.values.index_select(0, entries)
    # The parent's activation at each child entry's token, looked up in the parent's support
    # (a parent off its support has value 0 and carries no gradient there).
    parent_values = lookup_entries(
        parent_codes.values,
        parent_codes.rows,
        parent_codes.cols,
        (n_tokens, n_parents),
        child_codes.rows[entries],
        parents,
    )
    cross = (parent_values * child_values * child_parent.index_select(0, cols)).sum()
    child_norms = child_sq.index_select(0, cols)
    child_energy = (child_values.pow(2) * child_norms).sum()
    siblings = _co_active_sibling_products(child_codes, child_decoder, parent_index, n_parents)
    return (parent_energy - 2.0 * cross + child_energy + 2.0 * siblings) / n_tokens


def _co_active_sibling_products(
    codes: LevelCodes, decoder: Tensor, parent_index: Tensor, n_parents: int
) -> Tensor:
    """sum over tokens and unordered pairs c < c' of supported siblings: a_c a_c' <d_c, d_c'>."""
    entries = (parent_index[codes.cols] >= 0).nonzero(as_tuple=True)[0]
    group = codes.rows[entries] * n_parents + parent_index[codes.cols[entries]]
    # One stable sort groups the entries by (token, parent), then only groups of two or more
    # are kept: siblings are mostly exclusive, so few entries remain. (No [tokens x parents]
    # count table: the cost follows the support, not the parent level's size.)
    order = torch.argsort(group, stable=True)
    entries, group = entries[order], group[order]
    _, counts = torch.unique_consecutive(group, return_counts=True)
    shared = torch.repeat_interleave(counts > 1, counts)
    entries, group = entries[shared], group[shared]
    first, second = _pairs_within_groups(group)
    if first.numel() == 0:
        return codes.pre.new_zeros(())
    first, second = entries[first], entries[second]
    cols = codes.cols
    a_first = codes.values.index_select(0, first)
    a_second = codes.values.index_select(0, second)
    low = torch.minimum(cols[first], cols[second])
    high = torch.maximum(cols[first], cols[second])
    pair_keys, which = torch.unique(low * decoder.shape[0] + high, return_inverse=True)
    u, v = pair_keys // decoder.shape[0], pair_keys % decoder.shape[0]
    dots = row_pair_dots(decoder, u, v)
    return (a_first * a_second * dots.index_select(0, which)).sum()


def _pairs_within_groups(sorted_groups: Tensor) -> tuple[Tensor, Tensor]:
    """All index pairs (i, j), i < j, of positions that share a group id (ids sorted)."""
    if sorted_groups.numel() < 2:
        empty = sorted_groups.new_zeros(0)
        return empty, empty
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(counts, 0), counts)
    positions = torch.arange(sorted_groups.numel(), device=sorted_groups.device)
    n_later = group_end - positions - 1
    first = torch.repeat_interleave(positions, n_later)
    pair_starts = torch.repeat_interleave(torch.cumsum(n_later, 0) - n_later, n_later)
    step = torch.arange(first.numel(), device=first.device) - pair_starts
    return first, first + 1 + step


def sample_perturbation(
    parent_index: Tensor, n_parents: int, rate: float, generator: torch.Generator | None = None
) -> Tensor:
    """s_p ~ Bernoulli(rate) for every parent with children; parents without children: False."""
    # Drawn on the CPU so one seeded generator reproduces a run on any device.
    draws = torch.rand(n_parents, generator=generator) < rate
    return draws.to(parent_index.device) & has_children(parent_index, n_parents)


def perturbed_reconstruction(
    level: Level,
    codes: LevelCodes,
    child_level: Level,
    child_codes: LevelCodes,
    parent_index: Tensor,
    substituted: Tensor,
    fused: bool,
) -> Tensor:
    """Level reconstruction with each substituted parent replaced by its children's outputs."""
    own = level.decode_columns(codes, ~substituted, fused)
    borrowed_columns = (parent_index >= 0) & substituted[parent_index.clamp(min=0)]
    borrowed = child_level.decode_columns(child_codes, borrowed_columns, fused)
    return own + borrowed + level.b_dec
