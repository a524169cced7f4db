"""The two mechanisms that tie adjacent levels together (``hsae-method.md`` sections 2 and 3).

* :func:`parent_children_constraint`: sum over parents p with children of
  ||f_p(x) - sum_{c in C(p)} f_c(x)||^2, batch-averaged, computed from activations, per-child
  decoder dot products and the decoder dot products of co-active siblings only. No
  [batch, features, d] tensor is formed. :func:`dense_parent_children_constraint` is the same
  value from dense activations with static shapes (the dense reference path's, and a check on
  the support-only one).
* :func:`sample_perturbation` and :func:`perturbed_reconstruction`: each parent with children is
  substituted, with probability r shared across the batch, by the sum of its children's outputs
  in its own level's reconstruction.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import Function

from hsae.model.forest import children_count
from hsae.model.kernels import (
    any_by,
    entry_positions,
    gathered_dots,
    row_offsets,
    stable_order,
)
from hsae.model.level import Level, LevelCodes


def has_children(parent_index: Tensor, n_parents: int) -> Tensor:
    """[n_parents] booleans: which parents have at least one child (static shapes: no
    boolean indexing, so no host sync on a GPU)."""
    return any_by(parent_index.clamp(min=0), n_parents, parent_index >= 0)


def parent_children_constraint(
    parent_codes: LevelCodes,
    child_codes: LevelCodes,
    parent_decoder: Tensor,
    child_decoder: Tensor,
    parent_index: Tensor,
) -> Tensor:
    """Batch mean of sum_p ||a_p d_p - sum_{c in C(p)} a_c d_c||^2 (unit-norm decoders).

    Expanded as a_p^2 <d_p, d_p> - 2 a_p sum_c a_c <d_p, d_c> + sum_{c, c'} a_c a_c' <d_c, d_c'>
    and summed over tokens first, the value needs only per-feature sums over the support
    (alpha_p = sum_t a_p^2, gamma_c = sum_t a_c^2, beta_c = sum_t a_p a_c, and sigma of each
    co-active sibling pair) and decoder products of the features in the support; so does the
    gradient (:class:`_ParentChildrenConstraint`). Every sum runs over support entries only
    (latents off the support have zero value and zero gradient). The squared norms are kept as
    <d, d> rather than 1 so the gradient equals that of the unexpanded form (it differs along d
    itself, which Adam would otherwise see differently).
    """
    n_tokens, n_parents = parent_codes.pre.shape
    if not bool((parent_index >= 0).any()):
        return parent_codes.pre.new_zeros(())
    # float32 throughout, also inside a bf16 autocast region (the products are reductions).
    with torch.autocast(parent_codes.pre.device.type, enabled=False):
        return _ParentChildrenConstraint.apply(
            parent_codes.values,
            child_codes.values,
            parent_decoder,
            child_decoder,
            parent_codes.rows,
            parent_codes.cols,
            child_codes.rows,
            child_codes.cols,
            parent_index,
            n_tokens,
        )


class SiblingPairs(NamedTuple):
    """Every pair of distinct children that share a parent, once each (:func:`sibling_pairs`)."""

    first: Tensor
    """[pairs] index of one child of each pair."""
    second: Tensor
    """[pairs] index of the other."""
    weight: Tensor | None = None
    """[pairs] 1 for a real pair, 0 for padding (None: no padding)."""


def sibling_pairs(parent_index: Tensor, pad_to_power_of_two: bool = False) -> SiblingPairs:
    """The sibling pairs of a forest: fixed while the forest is, so a caller computes them
    once per forest.

    ``pad_to_power_of_two``: pad the list with weight-0 pairs to the next power of two, so a
    compiled step sees a new shape (and compiles again) only when the count crosses one, not
    at every forest rebuild."""
    children = (parent_index >= 0).nonzero(as_tuple=True)[0]
    order = torch.argsort(parent_index.index_select(0, children), stable=True)
    children = children.index_select(0, order)
    first, second = _pairs_within_groups(parent_index.index_select(0, children))
    first, second = children.index_select(0, first), children.index_select(0, second)
    if not pad_to_power_of_two:
        return SiblingPairs(first, second)
    weight = padding_weights(first.numel(), first.device)
    padding = spread_padding(weight.numel() - first.numel(), parent_index.numel(), first)
    return SiblingPairs(torch.cat([first, padding]), torch.cat([second, padding]), weight)


def spread_padding(k: int, n: int, like: Tensor) -> Tensor:
    """[k] indices of padding entries (weight 0) among n rows: 0, 1, ..., wrapping at n.
    Distinct rows rather than all row 0, so the backward of a gather through them (a
    scatter-add, atomic on a GPU) adds its zeros to different addresses instead of queueing
    thousands of atomic adds on one."""
    return torch.arange(k, dtype=like.dtype, device=like.device) % max(n, 1)


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def padding_weights(n: int, device: torch.device | str = "cpu", at_least: int = 0) -> Tensor:
    """[next power of two >= n, and >= at_least] weights: 1 for the n real entries, 0 for
    the padding."""
    weight = torch.zeros(max(next_power_of_two(n), at_least), device=device)
    weight[:n] = 1.0
    return weight


class BorrowedChildren(NamedTuple):
    """The children that stand in for their substituted parents in one level's perturbed
    reconstruction (:func:`borrowed_children`), padded to a power of two."""

    index: Tensor
    """[k] child indices (padding: children 0, 1, ...; :func:`spread_padding`)."""
    weight: Tensor
    """[k] 1 for a borrowed child, 0 for padding."""


def borrowed_children(
    parent_index: Tensor,
    substituted: Tensor,
    device: torch.device | str | None = None,
    at_least: int = 0,
) -> BorrowedChildren:
    """The children of the ``substituted`` parents, padded to a power of two (and to
    ``at_least`` entries: a caller keeps the largest size it has used, so that a compiled step
    sees one size once the draws have reached their usual range), on ``device``.

    The trainer draws the perturbation on the host and computes this there from a host copy
    of the forest, so the dense path decodes just these columns (a static shape per power of
    two, nothing read back from the device) rather than a full product of the child level's
    masked activations."""
    flags = (parent_index >= 0) & substituted[parent_index.clamp(min=0)]
    index = flags.nonzero(as_tuple=True)[0]
    weight = padding_weights(index.numel(), at_least=at_least)
    index = torch.cat(
        [index, spread_padding(weight.numel() - index.numel(), parent_index.numel(), index)]
    )
    target = parent_index.device if device is None else device
    # From the host without a stream sync (a pageable source is staged before the call returns).
    return BorrowedChildren(
        index.to(target, non_blocking=True), weight.to(target, non_blocking=True)
    )


def borrowed_capacity(
    parent_index: Tensor, n_parents: int, rate: float, spread: float = 4.0
) -> int:
    """How many borrowed children one level's draws almost never exceed, as a power of two:
    their mean plus ``spread`` standard deviations, rounded up, for parents substituted
    independently with probability ``rate`` (:func:`sample_perturbation`), each lending all its
    children.

    A caller pads :func:`borrowed_children` to at least this from the forest's first draw, so a
    compiled step sees one size per forest rather than one more each time a draw outgrows the
    last (4 standard deviations: a draw exceeds it about once in 30,000 steps per level)."""
    counts = children_count(parent_index.cpu(), n_parents).to(torch.float64)
    mean = rate * float(counts.sum())
    std = (rate * (1.0 - rate) * float(counts.square().sum())) ** 0.5
    return next_power_of_two(math.ceil(mean + spread * std))


def dense_parent_children_constraint(
    parent_acts: Tensor,
    child_acts: Tensor,
    parent_decoder: Tensor,
    child_decoder: Tensor,
    parent_index: Tensor,
    pairs: SiblingPairs,
) -> Tensor:
    """:func:`parent_children_constraint` from [batch, n] activations, through autograd.

    The same expansion summed over tokens: alpha_p <d_p, d_p> - 2 beta_c <d_p(c), d_c> +
    gamma_c <d_c, d_c> + 2 sigma_uv <d_u, d_v> over the sibling pairs ``pairs``
    (:func:`sibling_pairs` of ``parent_index``; padding pairs weigh 0). Every shape is fixed by
    the level sizes and the forest, and nothing is read back to the host, so it suits a captured
    or compiled step; it costs dense passes over [batch, n] (and [batch, pairs]) where the
    support-only form reads the support alone."""
    n_tokens, n_parents = parent_acts.shape
    with torch.autocast(parent_acts.device.type, enabled=False):
        parent_acts, child_acts = parent_acts.float(), child_acts.float()
        has_parent = (parent_index >= 0).to(child_acts.dtype)
        their_parents = parent_index.clamp(min=0)
        with_children = has_children(parent_index, n_parents).to(parent_acts.dtype)
        alpha = parent_acts.square().sum(0) * with_children
        parent_at_child = parent_acts.index_select(1, their_parents)
        beta = (parent_at_child * child_acts).sum(0) * has_parent
        gamma = child_acts.square().sum(0) * has_parent
        u, v, pair_weight = pairs
        sigma = (child_acts.index_select(1, u) * child_acts.index_select(1, v)).sum(0)
        if pair_weight is not None:
            sigma = sigma * pair_weight
        parent_sq = parent_decoder.square().sum(1)
        child_sq = child_decoder.square().sum(1)
        dots = (child_decoder * parent_decoder.index_select(0, their_parents)).sum(1)
        pair_dots = (child_decoder.index_select(0, u) * child_decoder.index_select(0, v)).sum(1)
        total = (
            torch.dot(alpha, parent_sq)
            - 2.0 * torch.dot(beta, dots)
            + torch.dot(gamma, child_sq)
            + 2.0 * torch.dot(sigma, pair_dots)
        )
        return total / n_tokens


class _ParentChildrenConstraint(Function):
    """The constraint of one level pair from per-feature sums, with an analytic backward.

    Forward, for the support entries of both levels (a few per cent of [batch, features]):
    the parent's value at every child entry's token (one int32 position table), the sums
    alpha, beta, gamma by feature, the co-active sibling pairs (a count table finds the
    (token, parent) groups with two or more child entries; only those few are sorted), then
    decoder products for the rows in the support (whole decoders, as views, when most rows
    are). The backward gives the values' gradients per entry and each decoder's gradient from
    the same per-feature sums: alpha/gamma-weighted rows plus the beta-weighted rows of the other
    level (one embedding_bag sums each parent's children), non-zero only on rows in the support.
    About twenty kernels each way, against the hundred-odd of the same formulas written with
    autograd.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        parent_values: Tensor,
        child_values: Tensor,
        parent_decoder: Tensor,
        child_decoder: Tensor,
        parent_rows: Tensor,
        parent_cols: Tensor,
        child_rows: Tensor,
        child_cols: Tensor,
        parent_index: Tensor,
        n_tokens: int,
    ) -> Tensor:
        n_parents, n_children = parent_decoder.shape[0], child_decoder.shape[0]
        device = parent_values.device
        with_children = has_children(parent_index, n_parents)
        # Child entries whose latent has a parent, and that parent's value at their token.
        entry_parents = parent_index.index_select(0, child_cols)
        entries = (entry_parents >= 0).nonzero(as_tuple=True)[0]
        all_assigned = entries.numel() == child_cols.numel()
        if not all_assigned:
            entry_parents = entry_parents.index_select(0, entries)
        cols = child_cols if all_assigned else child_cols.index_select(0, entries)
        values = child_values if all_assigned else child_values.index_select(0, entries)
        rows = child_rows if all_assigned else child_rows.index_select(0, entries)
        group = rows * n_parents + entry_parents
        position = entry_positions(parent_rows, parent_cols, n_tokens, n_parents, group)
        found = position >= 0
        position = position.clamp(min=0).long()
        if parent_values.numel():
            parent_at_child = parent_values.index_select(0, position) * found
        else:  # no parent fires or sits in its band anywhere in the batch
            parent_at_child = values.new_zeros(values.shape)

        alpha = _sum_by(parent_cols, parent_values.square(), n_parents) * with_children
        beta = _sum_by(cols, parent_at_child * values, n_children)
        gamma = _sum_by(cols, values.square(), n_children)
        first, second, pair, pair_u, pair_v = _co_active_siblings(
            group, cols, n_tokens * n_parents, n_children
        )

        sigma = values.new_zeros(pair_u.shape).scatter_add_(
            0, pair, values.index_select(0, first) * values.index_select(0, second)
        )

        # Decoder products of the features in the support only (all rows when most are).
        parents_used = _used_rows(any_by(parent_cols, n_parents) & with_children)
        children_used = _used_rows(any_by(cols, n_children))
        parent_matrix = _rows(parent_decoder, parents_used)
        child_matrix = _rows(child_decoder, children_used)
        # Each used child's parent (parent 0 for a child without one: its beta is 0).
        their_parents = _rows(parent_index, children_used).clamp(min=0)
        parent_sq = torch.linalg.vector_norm(parent_matrix, dim=1).square()
        child_sq = torch.linalg.vector_norm(child_matrix, dim=1).square()
        used = torch.arange(child_matrix.shape[0], device=device)
        dots = gathered_dots(child_matrix, used, parent_decoder, their_parents)
        pair_dots = gathered_dots(child_decoder, pair_u, child_decoder, pair_v)

        total = (
            torch.dot(_rows(alpha, parents_used), parent_sq)
            - 2.0 * torch.dot(_rows(beta, children_used), dots)
            + torch.dot(_rows(gamma, children_used), child_sq)
            + 2.0 * torch.dot(sigma, pair_dots)
        ) / n_tokens
        ctx.save_for_backward(
            parent_values, parent_cols, values, cols, entries, position, found,
            parent_at_child, first, second, pair, pair_u, pair_v, sigma, pair_dots,
            alpha, beta, gamma, parents_used, children_used, parent_matrix, child_matrix,
            their_parents, parent_sq, child_sq, dots, parent_index, parent_decoder,
            child_decoder, used, with_children,
        )  # fmt: skip
        ctx.sizes = (n_tokens, n_parents, n_children, child_values.shape[0], all_assigned)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (
            parent_values, parent_cols, values, cols, entries, position, found,
            parent_at_child, first, second, pair, pair_u, pair_v, sigma, pair_dots,
            alpha, beta, gamma, parents_used, children_used, parent_matrix, child_matrix,
            their_parents, parent_sq, child_sq, dots, parent_index, parent_decoder,
            child_decoder, used, with_children,
        ) = ctx.saved_tensors  # fmt: skip
        n_tokens, n_parents, n_children, n_child_entries, all_assigned = ctx.sizes
        scale = 2.0 * grad / n_tokens
        grads: list[Tensor | None] = [None] * 10
        # Per-feature norms and parent dots as full-size vectors (zero off the rows used). A
        # parent without children is not in the sum: its activation gets no gradient, also
        # when the whole decoder is used (parents_used None) and its norm is at hand.
        parent_sq_all = _scatter_rows(parent_sq, parents_used, n_parents) * with_children
        child_sq_all = _scatter_rows(child_sq, children_used, n_children)
        entry_dots = _scatter_rows(dots, children_used, n_children).index_select(0, cols)
        if ctx.needs_input_grad[0]:
            # d/d a_p = 2/T (a_p <d_p, d_p> - sum of the children's a_c <d_c, d_p> at its token)
            grad_parent = parent_values * parent_sq_all.index_select(0, parent_cols)
            if parent_values.numel():
                grad_parent.scatter_add_(0, position, -(values * entry_dots * found))
            grads[0] = grad_parent * scale
        if ctx.needs_input_grad[1]:
            # d/d a_c = 2/T (a_c <d_c, d_c> - a_p <d_c, d_p> + sum of co-active siblings' terms)
            grad_child = values * child_sq_all.index_select(0, cols) - parent_at_child * entry_dots
            grad_child.scatter_add_(0, first, values.index_select(0, second) * pair_dots[pair])
            grad_child.scatter_add_(0, second, values.index_select(0, first) * pair_dots[pair])
            if not all_assigned:
                grad_child = grad_child.new_zeros(n_child_entries).index_copy_(
                    0, entries, grad_child
                )
            grads[1] = grad_child * scale
        child_weights = _rows(beta, children_used) * -scale
        if ctx.needs_input_grad[2]:
            # d/d d_p = 2/T (alpha_p d_p - sum_c beta_c d_c) over the parent rows used; a
            # child's beta is non-zero only when its parent is among them. The children's sum
            # is one embedding_bag over the children grouped by parent (no [children, d] temp).
            slot = _rows(parent_index, children_used)
            if parents_used is not None:
                mapped = _slots(parents_used, n_parents).index_select(0, slot.clamp(min=0))
                slot = torch.where(slot >= 0, mapped, slot)
            kept = (slot >= 0).nonzero(as_tuple=True)[0]
            order = kept.index_select(0, stable_order(slot.index_select(0, kept), n_parents))
            sorted_slots = slot.index_select(0, order)
            rows = torch.nn.functional.embedding_bag(
                order,
                child_matrix,
                row_offsets(sorted_slots, parent_matrix.shape[0]),
                mode="sum",
                per_sample_weights=child_weights.index_select(0, order),
            )
            rows.addcmul_(parent_matrix, (_rows(alpha, parents_used) * scale).unsqueeze(1))
            grads[2] = _scatter_rows(rows, parents_used, n_parents)
        if ctx.needs_input_grad[3]:
            # d/d d_c = 2/T (gamma_c d_c - beta_c d_p + sum over co-active siblings sigma d_c')
            # The parents' rows weighted per child in one embedding_bag (no gathered copy).
            rows = torch.nn.functional.embedding_bag(
                their_parents, parent_decoder, used, mode="sum", per_sample_weights=child_weights
            )
            rows.addcmul_(child_matrix, (_rows(gamma, children_used) * scale).unsqueeze(1))
            if pair_u.numel():
                u_slot, v_slot = pair_u, pair_v
                if children_used is not None:
                    slot = _slots(children_used, n_children)
                    u_slot, v_slot = slot.index_select(0, pair_u), slot.index_select(0, pair_v)
                pair_weights = (sigma * scale).unsqueeze(1)
                rows.index_add_(0, u_slot, child_decoder.index_select(0, pair_v) * pair_weights)
                rows.index_add_(0, v_slot, child_decoder.index_select(0, pair_u) * pair_weights)
            grads[3] = _scatter_rows(rows, children_used, n_children)
        return tuple(grads)


FULL_ROWS_SHARE = 0.5
"""When more than this share of a decoder's rows are in the support, the constraint works on
the whole decoder (a view) rather than gathering the rows and scattering their gradient."""


def _used_rows(flags: Tensor) -> Tensor | None:
    """The flagged rows' indices (sorted), or None, meaning all rows, when most are flagged."""
    used = flags.nonzero(as_tuple=True)[0]
    return None if used.numel() > FULL_ROWS_SHARE * flags.numel() else used


def _rows(tensor: Tensor, used: Tensor | None) -> Tensor:
    """``tensor``'s rows ``used`` (the tensor itself when None: all rows)."""
    return tensor if used is None else tensor.index_select(0, used)


def _scatter_rows(rows: Tensor, used: Tensor | None, size: int) -> Tensor:
    """``rows`` (a vector or a [len(used), d] block) at the rows ``used`` of a zero tensor of
    ``size`` rows (``rows`` itself when ``used`` is None: all rows)."""
    if used is None:
        return rows
    return rows.new_zeros((size, *rows.shape[1:])).index_copy_(0, used, rows)


def _sum_by(index: Tensor, weights: Tensor, size: int) -> Tensor:
    """[size] sums of ``weights`` by ``index`` (bincount returns integers when empty; a 1-D
    scatter_add_ is 30-40% faster than index_add_ on the CPU for tens of thousands of
    entries)."""
    return weights.new_zeros(size).scatter_add_(0, index, weights)


def _slots(indices: Tensor, size: int) -> Tensor:
    """[size] longs: the position of each feature in ``indices``, -1 for the others."""
    slot = torch.full((size,), -1, dtype=torch.long, device=indices.device)
    return slot.index_copy_(0, indices, torch.arange(indices.numel(), device=indices.device))


def _co_active_siblings(
    group: Tensor, cols: Tensor, n_groups: int, n_children: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pairs of child entries in the same (token, parent) group, and their distinct latents.

    Returns (first, second): entry index pairs, i < j in group order; ``pair``: each pair's
    index among the distinct latent pairs (u, v), u < v. A count table over the groups keeps
    only the entries of groups with two or more (siblings mostly fire apart, so few remain), and
    only those are sorted. (No argsort of every entry: the cost follows the support.)
    """
    counts = torch.zeros(n_groups, dtype=torch.int32, device=group.device)
    counts.scatter_add_(0, group, torch.ones_like(group, dtype=torch.int32))
    shared = (counts.index_select(0, group) > 1).nonzero(as_tuple=True)[0]
    order = stable_order(group.index_select(0, shared), n_groups)
    shared = shared.index_select(0, order)
    first, second = _pairs_within_groups(group.index_select(0, shared))
    first, second = shared.index_select(0, first), shared.index_select(0, second)
    a, b = cols.index_select(0, first), cols.index_select(0, second)
    keys, pair = torch.unique(
        torch.minimum(a, b) * n_children + torch.maximum(a, b), return_inverse=True
    )
    return first, second, pair, keys // n_children, keys % n_children


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
    child_decodes_itself: bool = False,
    with_bias: bool = True,
    borrowed: BorrowedChildren | None = None,
) -> Tensor:
    """Level reconstruction with each substituted parent replaced by its children's outputs.

    ``child_decodes_itself``: the same loss also holds the child level's own reconstruction
    (as the HSAE's does), so the child decoder's gradient from the few borrowed rows can be a
    sparse one added into that dense gradient, instead of a second [n, d] tensor.
    ``with_bias=False``: the decoders' output only, without the level's b_dec (for a caller
    that adds it inside its own error, as :func:`hsae.model.kernels.squared_error` does).
    ``borrowed``: the children of the substituted parents (:func:`borrowed_children`), whose
    columns alone the dense path then decodes.
    """
    own = level.decode_columns(codes, ~substituted, fused)
    if borrowed is not None and not fused:
        # The borrowed columns picked by a [children, k] one-hot product rather than a gather:
        # a gather's scatter backward, beside the constraint's, gets wrong gradients from
        # inductor's CPU fusion (torch 2.13; tests/test_compiled.py compares).
        acts = child_codes.acts
        pick = torch.nn.functional.one_hot(borrowed.index, acts.shape[1]).t().to(acts.dtype)
        weighted = acts @ (pick * borrowed.weight)
        decoded = own + weighted @ child_level.W_dec.index_select(0, borrowed.index)
    else:
        borrowed_columns = (parent_index >= 0) & substituted[parent_index.clamp(min=0)]
        decoded = own + child_level.decode_columns(
            child_codes, borrowed_columns, fused, row_sparse_grad=child_decodes_itself
        )
    return decoded + level.b_dec if with_bias else decoded
