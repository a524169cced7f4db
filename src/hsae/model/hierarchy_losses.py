"""The two mechanisms that tie adjacent levels together (``hsae-method.md`` sections 2 and 3).

* :func:`stack_constraint`: sum over the level pairs and their parents p with children of
  ||f_p(x) - sum_{c in C(p)} f_c(x)||^2, batch-averaged, computed from the supports'
  activations, per-child decoder dot products and the decoder dot products of co-active
  siblings only, all pairs in one pass (:func:`parent_children_constraint`: one pair). No
  [batch, features, d] tensor is formed. :func:`dense_parent_children_constraint` is one
  pair's value from dense activations with static shapes (the dense reference path's, and a
  check on the support-only one).
* :func:`sample_perturbation` and :func:`perturbed_reconstruction`: each parent with children is
  substituted, with probability r shared across the batch, by the sum of its children's outputs
  in its own level's reconstruction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd import Function

from hsae.model import native
from hsae.model.forest import children_count
from hsae.model.kernels import (
    BorrowedBackward,
    GradientAddend,
    any_by,
    entry_positions,
    gathered_dots,
    row_offsets,
    row_sparse_gradient,
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
    """Batch mean of sum_p ||a_p d_p - sum_{c in C(p)} a_c d_c||^2 (unit-norm decoders) for one
    level pair: :func:`stack_constraint` of two levels."""
    return stack_constraint(
        [parent_codes, child_codes], [parent_decoder, child_decoder], [parent_index]
    )


def stack_constraint(
    codes: Sequence[LevelCodes],
    decoders: Sequence[Tensor],
    parents: Sequence[Tensor],
    forest: StackForest | None = None,
    addends: Sequence[GradientAddend] | None = None,
    products: DecoderProducts | None = None,
) -> Tensor:
    """The constraint summed over every adjacent level pair of a stack, from the supports.

    ``codes[l]`` and ``decoders[l]`` are level l's; ``parents[l]`` maps each level-(l+1)
    feature to its level-l parent (-1: none). Per pair, the batch mean of
    sum_p ||a_p d_p - sum_{c in C(p)} a_c d_c||^2, expanded as
    a_p^2 <d_p, d_p> - 2 a_p sum_c a_c <d_p, d_c> + sum_{c, c'} a_c a_c' <d_c, d_c'> and summed
    over tokens first: the value needs only per-feature sums over the support
    (alpha_p = sum_t a_p^2, gamma_c = sum_t a_c^2, beta_c = sum_t a_p a_c, and sigma of each
    co-active sibling pair) and decoder products of the features in the support; so does the
    gradient (:class:`_StackConstraint`). Every sum runs over support entries only (latents off
    the support have zero value and zero gradient). The squared norms are kept as <d, d> rather
    than 1 so the gradient equals that of the unexpanded form (it differs along d itself, which
    Adam would otherwise see differently).

    All pairs are done at once, the features numbered across levels: the entry-level index
    work is one pass over the whole stack's support instead of one per pair (a third of the
    kernels), a middle level's decoder norms are computed once for both of its roles, and each
    decoder gets one gradient from the constraint instead of one per pair it belongs to.
    ``forest``: :func:`stack_forest` of ``parents``, for a caller that keeps it while the
    forest does not change (computed here when None).

    ``addends``: per level, the :class:`GradientAddend` of a decode of that level built before
    this call in the same loss (:func:`hsae.model.kernels.support_decode`); on the fused CPU
    kernel, a level whose addend holds a token gets its decoder gradient added into that
    decode's instead of a gradient of its own (the others, and every level on the library
    path, get theirs through autograd). The tokens are taken out of the addends here.

    ``products``: :func:`normalise_with_products`'s of these very decoders and this forest (the
    caller checks that neither changed since), which the fused CPU kernel then reads instead of
    a pass over the decoders (bitwise the same); the library path computes its own.
    """
    if len(codes) != len(decoders) or len(parents) != len(codes) - 1:
        raise ValueError(
            f"stack_constraint needs one decoder per level and one parent map per level pair: "
            f"got {len(codes)} levels, {len(decoders)} decoders, {len(parents)} parent maps"
        )
    n_tokens = codes[0].pre.shape[0]
    # The addends' tokens, taken out of them: an addend holding its token would hold the
    # decode's graph in a reference cycle (token -> its node -> the node's addend), freed only
    # by the cyclic garbage collector rather than when the backward is done.
    levels_addends: list[GradientAddend | None] = (
        list(addends) if addends is not None else [None] * len(codes)
    )
    tokens = [None if addend is None else addend.token for addend in levels_addends]
    for addend in levels_addends:
        if addend is not None:
            addend.token = None
    if forest is None:
        forest = stack_forest(parents, [int(decoder.shape[0]) for decoder in decoders])
    if not forest.any_links:
        return codes[0].pre.new_zeros(())
    # float32 throughout, also inside a bf16 autocast region (the products are reductions).
    with torch.autocast(codes[0].pre.device.type, enabled=False):
        entries = (
            *(c.values for c in codes),
            *(c.rows for c in codes),
            *(c.cols for c in codes),
            *decoders,
        )
        if not native_constraint_applies(codes, decoders):
            return _StackConstraint.apply(forest, n_tokens, *entries)
        deferred = tuple(
            None if token is None else addend
            for addend, token in zip(levels_addends, tokens, strict=True)
        )
        # The tokens make this node's backward run before those decodes' (they wait for it).
        taken = [token for token in tokens if token is not None]
        return _NativeStackConstraint.apply(forest, n_tokens, deferred, products, *entries, *taken)


class DecoderProducts(NamedTuple):
    """What the fused constraint's forward takes of the decoders, numbered across levels as
    in :class:`StackForest`: computed where the decoders were last normalised
    (:func:`normalise_with_products`)."""

    norms: Tensor
    """[features] float32: each decoder row's squared norm, <d, d>."""
    dots: Tensor
    """[features] float32: each row's dot product with its parent's row (0: no parent)."""


def normalise_with_products(
    decoders: Sequence[Tensor], norms: Sequence[Tensor], forest: StackForest
) -> DecoderProducts | None:
    """Divide each decoder's rows in place by its ``norms`` (a level's
    :meth:`Level.decoder_norms`: then bitwise what :meth:`Level.normalise_decoder` gives) and
    return, from the same pass over the rows, the products the constraint's next forward needs
    (:class:`DecoderProducts`): the fused CPU kernel (``native/stack_constraint.cpp``,
    ``normalise_decoder_rows``) reads each row once for both, where the forward would read all
    280 MB of decoders again at d = 2304. None, and nothing done, where the fused kernels do not
    take the decoders (another device or dtype, rows not contiguous, no forest links)."""
    if not forest.any_links or not native.takes(*decoders):
        return None
    if any(decoder.stride(1) != 1 for decoder in decoders):
        return None
    with torch.no_grad():
        n_features = forest.offsets[-1]
        products = DecoderProducts(
            torch.empty(n_features, dtype=torch.float32),
            torch.empty(n_features, dtype=torch.float32),
        )
        native.ops().normalise_decoder_rows(
            list(decoders), list(norms), forest.parent, products.norms, products.dots
        )
    for decoder in decoders:  # written in place outside autograd's view
        torch.autograd.graph.increment_version(decoder)
    return products


class StackForest(NamedTuple):
    """A stack's forest with its features numbered across levels (:func:`stack_forest`)."""

    offsets: tuple[int, ...]
    """Level l's features are numbered offsets[l] to offsets[l + 1] - 1."""
    parent: Tensor
    """[features] long: each feature's parent, numbered across levels (-1: none)."""
    with_children: Tensor
    """[features] bool: which features have at least one child."""
    any_links: bool
    """Whether any feature has a parent (read once per forest, not once per step)."""


def stack_forest(parents: Sequence[Tensor], sizes: Sequence[int]) -> StackForest:
    """The links ``parents`` (level l+1 to level l) of levels of ``sizes`` features, with the
    features numbered across levels."""
    offsets = (0, *itertools.accumulate(sizes))
    device = parents[0].device if parents else None
    pieces = [torch.full((sizes[0],), -1, dtype=torch.long, device=device)]
    for level, links in enumerate(parents):
        pieces.append(torch.where(links >= 0, links + offsets[level], -1))
    parent = torch.cat(pieces)
    linked = parent >= 0
    with_children = any_by(parent.clamp(min=0), offsets[-1], linked)
    return StackForest(offsets, parent, with_children, bool(linked.any()))


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


def native_constraint_applies(codes: Sequence[LevelCodes], decoders: Sequence[Tensor]) -> bool:
    """Whether the fused C++ kernel (:mod:`hsae.model.native`) takes this stack."""
    return native.takes(*(c.values for c in codes), *decoders)


class _NativeStackConstraint(Function):
    """:class:`_StackConstraint` in one fused C++ kernel on the CPU (``native/
    stack_constraint.cpp``): the forward groups the support entries by token and finds each
    child entry's parent entry and co-active siblings through a small per-feature state (each
    feature's latest entry; no [tokens x parents] table), sums alpha, beta, gamma and sigma,
    and takes the decoder products of the features in the support; the backward gives each
    entry's gradient and writes every decoder row's gradient once, as the weighted sum of the
    rows it depends on, or, for a level with a :class:`GradientAddend` (``deferred[l]``), hands
    the addend the rows' terms to add into its decode's gradient (the trailing tensors are the
    addends' tokens)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        forest: StackForest,
        n_tokens: int,
        deferred: tuple[GradientAddend | None, ...],
        products: DecoderProducts | None,
        *tensors: Tensor,
    ) -> Tensor:
        n_levels = len(forest.offsets) - 1
        values, rows, cols, decoders = (
            list(tensors[i * n_levels : (i + 1) * n_levels]) for i in range(4)
        )
        ctx.deferred = deferred
        ctx.n_tokens_in = len(tensors) - 4 * n_levels
        total, *state = native.ops().stack_constraint_forward(
            values,
            rows,
            cols,
            forest.parent,
            forest.with_children,
            decoders,
            n_tokens,
            None if products is None else products.norms,
            None if products is None else products.dots,
        )
        ctx.save_for_backward(*decoders, *state)
        ctx.sizes = (n_tokens, n_levels, [v.numel() for v in values])
        ctx.forest = forest
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        n_tokens, n_levels, counts = ctx.sizes
        saved = ctx.saved_tensors
        decoders, state = list(saved[:n_levels]), saved[n_levels:]
        first = 4  # forest, n_tokens, deferred, products
        need_values = any(ctx.needs_input_grad[first : first + n_levels])
        needs_decoder = ctx.needs_input_grad[first + 3 * n_levels : first + 4 * n_levels]
        # 1: a gradient of its own; 2: terms added into the addend's decode's gradient.
        need_decoders = [
            (2 if addend is not None else 1) if needed else 0
            for needed, addend in zip(needs_decoder, ctx.deferred, strict=True)
        ]
        out = native.ops().stack_constraint_backward(
            2.0 * float(grad) / n_tokens,
            counts,
            ctx.forest.parent,
            ctx.forest.with_children,
            decoders,
            *state,
            need_values,
            need_decoders,
        )
        grads: list[Tensor | None] = [None] * (first + 4 * n_levels + ctx.n_tokens_in)
        if need_values:
            grads[first : first + n_levels] = out[:n_levels]
            out = out[n_levels:]
        for level, needed in enumerate(need_decoders):
            if needed == 1:
                grads[first + 3 * n_levels + level] = out[level]
            elif needed == 2:
                addend = ctx.deferred[level]
                addend.add_into = _RowTerms(out[n_levels:], decoders, level)
        return tuple(grads)


class _RowTerms:
    """Adds one level's constraint decoder gradient, given as row terms by the fused backward,
    into a gradient in place (:class:`GradientAddend`'s ``add_into``; the decode's dense
    float32 gradient, which the native op checks)."""

    def __init__(self, terms: Sequence[Tensor], decoders: list[Tensor], level: int):
        self.terms, self.decoders, self.level = tuple(terms), decoders, level

    def __call__(self, grad: Tensor) -> None:
        native.ops().stack_constraint_decoder_rows(*self.terms, self.decoders, self.level, grad)


class _StackConstraint(Function):
    """The constraint of a whole stack from per-feature sums, with an analytic backward.

    Forward, for the support entries of every level at once (the features numbered across
    levels, :class:`StackForest`): the parent's value at every child entry's token (one int32
    position table), the sums alpha, beta, gamma by feature, the co-active sibling pairs (a
    count table finds the (token, parent) groups with two or more child entries; only those few
    are sorted), then, level by level, decoder products for the rows in the support (the whole
    decoder, as a view, when most rows are). The backward gives the values' gradients per entry
    and each decoder's one gradient from the same sums: (alpha + gamma)-weighted rows, the
    beta-weighted rows of its children (one embedding_bag sums each parent's children) and of
    its features' parents, and the co-active siblings' rows, non-zero only on rows in the
    support.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, forest: StackForest, n_tokens: int, *tensors: Tensor
    ) -> Tensor:
        offsets = forest.offsets
        n_levels = len(offsets) - 1
        values, rows, cols, decoders = (
            tensors[i * n_levels : (i + 1) * n_levels] for i in range(4)
        )
        n_features, n_parents = offsets[-1], offsets[-2]
        counts = [v.numel() for v in values]
        n_parent_entries = sum(counts[:-1])
        all_values = torch.cat(values)
        all_rows = torch.cat(rows)
        all_cols = torch.cat([c + o if o else c for c, o in zip(cols, offsets[:-1], strict=True)])
        # Parent entries: those of every level but the last; child entries: all but the first's.
        parent_values = all_values[:n_parent_entries]
        parent_cols = all_cols[:n_parent_entries]
        # The parent's value at each child entry's token. Entries of features without a parent
        # stay in the lists with weight 0 (cheaper than copying the others out).
        child_values, child_rows, child_cols = (
            t[counts[0] :] for t in (all_values, all_rows, all_cols)
        )
        entry_parents = forest.parent.index_select(0, child_cols)
        assigned = entry_parents >= 0
        group = child_rows * n_parents + entry_parents.clamp(min=0)
        # One int32 [tokens x parents] table, for the parents' positions, then the groups' counts.
        table = torch.empty(n_tokens * n_parents, dtype=torch.int32, device=group.device)
        position = entry_positions(
            all_rows[:n_parent_entries], parent_cols, n_tokens, n_parents, group, table
        )
        found = (position >= 0) & assigned
        position = position.clamp(min=0).long()
        if parent_values.numel():
            parent_at_child = parent_values.index_select(0, position) * found
        else:  # no parent fires or sits in its band anywhere in the batch
            parent_at_child = child_values.new_zeros(child_values.shape)
        weighted = child_values * assigned  # the child values the constraint sees

        with_children = forest.with_children
        alpha = _sum_by(parent_cols, parent_values.square(), n_features) * with_children
        beta = _sum_by(child_cols, parent_at_child * child_values, n_features)
        gamma = _sum_by(child_cols, weighted.square(), n_features)
        norm_weight = alpha.add_(gamma)  # a middle level's features are parents and children
        first, second, pair, pair_u, pair_v = _co_active_siblings(
            group, child_cols, n_tokens * n_parents, n_features, assigned, table
        )
        del table
        sigma = child_values.new_zeros(pair_u.shape).scatter_add_(
            0,
            pair,
            child_values.index_select(0, first) * child_values.index_select(0, second),
        )
        # Siblings share a level: the pairs, sorted by feature, split at the level offsets.
        bounds = torch.searchsorted(pair_u, pair_u.new_tensor(offsets)).tolist()

        # Level by level, decoder products of the features in the support only.
        flags = any_by(child_cols, n_features) | (any_by(parent_cols, n_features) & with_children)
        used, matrices, links, norms, dots, pair_dots = [], [], [], [], [], []
        for level, decoder in enumerate(decoders):
            start, end = offsets[level], offsets[level + 1]
            level_used = _used_rows(flags[start:end])
            matrix = _rows(decoder, level_used)
            used.append(level_used)
            matrices.append(matrix)
            norms.append(
                _scatter_rows(
                    torch.linalg.vector_norm(matrix, dim=1).square(), level_used, end - start
                )
            )
            if level == 0:
                links.append(None)
                dots.append(matrix.new_zeros(end - start))
            else:
                # Each used feature's parent in the level above (-1: none; its beta is 0).
                link = _rows(forest.parent[start:end], level_used) - offsets[level - 1]
                link = link.clamp(min=-1)
                links.append(link)
                rows_dot = gathered_dots(
                    matrix,
                    torch.arange(matrix.shape[0], device=matrix.device),
                    decoders[level - 1],
                    link.clamp(min=0),
                )
                dots.append(_scatter_rows(rows_dot, level_used, end - start))
                low, high = bounds[level], bounds[level + 1]
                pair_dots.append(
                    gathered_dots(
                        decoder, pair_u[low:high] - start, decoder, pair_v[low:high] - start
                    )
                )
        all_norms, all_dots = torch.cat(norms), torch.cat(dots)
        all_pair_dots = torch.cat(pair_dots) if pair_dots else sigma.new_zeros(0)
        total = (
            torch.dot(norm_weight, all_norms)
            - 2.0 * torch.dot(beta, all_dots)
            + 2.0 * torch.dot(sigma, all_pair_dots)
        ) / n_tokens
        ctx.save_for_backward(
            parent_values, parent_cols, child_values, weighted, child_cols, position, found,
            parent_at_child, first, second, pair, pair_u, pair_v, sigma, all_pair_dots,
            beta, norm_weight, all_norms, all_dots, with_children,
            *decoders, *matrices, *used, *links,
        )  # fmt: skip
        ctx.sizes = (n_tokens, n_levels, offsets, counts, bounds)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        n_tokens, n_levels, offsets, counts, bounds = ctx.sizes
        saved = ctx.saved_tensors
        (
            parent_values, parent_cols, child_values, weighted, child_cols, position, found,
            parent_at_child, first, second, pair, pair_u, pair_v, sigma, pair_dots,
            beta, norm_weight, norms, dots, with_children,
        ) = saved[:20]  # fmt: skip
        decoders, matrices, used, links = (
            saved[20 + i * n_levels : 20 + (i + 1) * n_levels] for i in range(4)
        )
        # Detached: embedding_bag then takes its forward-only kernel (kernels._SupportDecode).
        decoders = tuple(decoder.detach() for decoder in decoders)
        matrices = tuple(matrix.detach() for matrix in matrices)
        scale = 2.0 * grad / n_tokens
        n_parent_entries = parent_values.numel()
        grads: list[Tensor | None] = [None] * (2 + 4 * n_levels)
        if any(ctx.needs_input_grad[2 : 2 + n_levels]):
            entry_dots = dots.index_select(0, child_cols)
            all_grads = child_values.new_zeros(sum(counts))
            # d/d a_p = 2/T (a_p <d_p, d_p> - sum of the children's a_c <d_c, d_p> at its
            # token); a parent without children is not in the sum: no gradient.
            grad_parent = all_grads[:n_parent_entries]
            torch.mul(
                parent_values,
                (norms * with_children).index_select(0, parent_cols),
                out=grad_parent,
            )
            if n_parent_entries:
                grad_parent.scatter_add_(0, position, -(child_values * entry_dots * found))
            # d/d a_c = 2/T (a_c <d_c, d_c> - a_p <d_c, d_p> + co-active siblings' terms); 0
            # for a feature without a parent (its weighted value and parent value are 0).
            grad_child = all_grads[counts[0] :]
            grad_child.addcmul_(weighted, norms.index_select(0, child_cols))
            grad_child.addcmul_(parent_at_child, entry_dots, value=-1.0)
            sibling_dots = pair_dots.index_select(0, pair)
            grad_child.scatter_add_(0, first, child_values.index_select(0, second) * sibling_dots)
            grad_child.scatter_add_(0, second, child_values.index_select(0, first) * sibling_dots)
            grads[2 : 2 + n_levels] = all_grads.mul_(scale).split(counts)
        child_weights = beta * -scale
        row_weights = norm_weight * scale
        for level in range(n_levels):
            if not ctx.needs_input_grad[2 + 3 * n_levels + level]:
                continue
            start, end = offsets[level], offsets[level + 1]
            matrix, level_used = matrices[level], used[level]
            weights = _rows(row_weights[start:end], level_used).unsqueeze(1)
            if level == 0:
                rows = matrix * weights
            else:
                # As a child: -beta_c d_p, the parents' rows weighted per feature in one
                # embedding_bag (no gathered copy), then its own rows and co-active siblings'.
                rows = torch.nn.functional.embedding_bag(
                    links[level].clamp(min=0),
                    decoders[level - 1],
                    torch.arange(matrix.shape[0], device=matrix.device),
                    mode="sum",
                    per_sample_weights=_rows(child_weights[start:end], level_used),
                )
                rows.addcmul_(matrix, weights)
                low, high = bounds[level], bounds[level + 1]
                if high > low:
                    u, v = pair_u[low:high] - start, pair_v[low:high] - start
                    u_slot, v_slot = u, v
                    if level_used is not None:
                        slot = _slots(level_used, end - start)
                        u_slot, v_slot = slot.index_select(0, u), slot.index_select(0, v)
                    pair_weights = (sigma[low:high] * scale).unsqueeze(1)
                    decoder = decoders[level]
                    rows.index_add_(0, u_slot, decoder.index_select(0, v) * pair_weights)
                    rows.index_add_(0, v_slot, decoder.index_select(0, u) * pair_weights)
            if level + 1 < n_levels:
                # As a parent: -sum_c beta_c d_c over its children in the support, one
                # embedding_bag over the children grouped by parent (no [children, d] temp).
                slot = links[level + 1]
                if level_used is not None:
                    mapped = _slots(level_used, end - start).index_select(0, slot.clamp(min=0))
                    slot = torch.where(slot >= 0, mapped, slot)
                kept = (slot >= 0).nonzero(as_tuple=True)[0]
                order = kept.index_select(0, stable_order(slot.index_select(0, kept), end - start))
                child_start, child_end = offsets[level + 1], offsets[level + 2]
                rows.add_(
                    torch.nn.functional.embedding_bag(
                        order,
                        matrices[level + 1],
                        row_offsets(slot.index_select(0, order), matrix.shape[0]),
                        mode="sum",
                        per_sample_weights=_rows(
                            child_weights[child_start:child_end], used[level + 1]
                        ).index_select(0, order),
                    )
                )
            grads[2 + 3 * n_levels + level] = _scatter_rows(rows, level_used, end - start)
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
    group: Tensor,
    cols: Tensor,
    n_groups: int,
    n_children: int,
    counted: Tensor | None = None,
    table: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pairs of child entries in the same (token, parent) group, and their distinct latents.

    Returns (first, second): entry index pairs, i < j in group order; ``pair``: each pair's
    index among the distinct latent pairs (u, v), u < v. A count table over the groups keeps
    only the entries of groups with two or more (siblings mostly fire apart, so few remain), and
    only those are sorted. (No argsort of every entry: the cost follows the support.)
    ``counted``: which entries take part (None: all). ``table``: an int32 buffer of
    ``n_groups`` for the count table (overwritten), else allocated.
    """
    if table is None:
        counts = torch.zeros(n_groups, dtype=torch.int32, device=group.device)
    else:
        counts = table.zero_()
    if counted is None:
        counts.scatter_add_(0, group, torch.ones_like(group, dtype=torch.int32))
        shared = counts.index_select(0, group) > 1
    else:
        counts.scatter_add_(0, group, counted.to(torch.int32))
        shared = (counts.index_select(0, group) > 1) & counted
    shared = shared.nonzero(as_tuple=True)[0]
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
    parent_index: Tensor,
    n_parents: int,
    rate: float,
    generator: torch.Generator | None = None,
    with_children: Tensor | None = None,
) -> Tensor:
    """s_p ~ Bernoulli(rate) for every parent with children; parents without children: False.
    ``with_children``: :func:`has_children` of these links, on their device, where the caller
    keeps it (the trainer, once per forest); computed here otherwise."""
    # Drawn on the CPU so one seeded generator reproduces a run on any device.
    draws = torch.rand(n_parents, generator=generator) < rate
    if with_children is None:
        with_children = has_children(parent_index, n_parents)
    return draws.to(parent_index.device) & with_children


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
    addend: GradientAddend | None = None,
    own: Tensor | None = None,
    borrowed_backward: BorrowedBackward | None = None,
) -> Tensor:
    """Level reconstruction with each substituted parent replaced by its children's outputs.

    ``child_decodes_itself``: the same loss also holds the child level's own reconstruction
    (as the HSAE's does), so the child decoder's gradient from the few borrowed rows can be a
    sparse one added into that dense gradient, instead of a second [n, d] tensor.
    ``with_bias=False``: the decoders' output only, without the level's b_dec (for a caller
    that adds it inside its own error, as :func:`hsae.model.kernels.squared_error` does).
    ``borrowed``: the children of the substituted parents (:func:`borrowed_children`), whose
    columns alone the dense path then decodes. ``addend``: for the level's own decode
    (:meth:`Level.decode_columns`). ``own``: that decode of the level's unsubstituted columns,
    when the caller has made it (``addend`` is then its business). ``borrowed_backward``: the
    child level's own decode's :class:`~hsae.model.kernels.BorrowedBackward` (made with this
    draw's borrowed children), to which the fused borrowed decode hands its backward.
    """
    if own is None:
        own = level.decode_columns(codes, ~substituted, fused, addend=addend)
    if borrowed is not None and not fused:
        # The borrowed columns picked by a [children, k] one-hot product rather than a gather:
        # a gather's scatter backward, beside the constraint's, gets wrong gradients from
        # inductor's CPU fusion (torch 2.13; tests/test_compiled.py compares).
        acts = child_codes.acts
        pick = torch.nn.functional.one_hot(borrowed.index, acts.shape[1]).t().to(acts.dtype)
        weighted = acts @ (pick * borrowed.weight)
        decoded = own + weighted @ child_level.W_dec.index_select(0, borrowed.index)
    else:
        if borrowed_backward is not None:  # made with these very flags
            borrowed_columns = borrowed_backward.flags
        else:
            borrowed_columns = (parent_index >= 0) & substituted[parent_index.clamp(min=0)]
        if fused and _native_decode_applies(own, child_codes, child_level.W_dec):
            handed = borrowed_backward is not None and borrowed_backward.token is not None
            token = [borrowed_backward.token] if handed else []  # type: ignore[union-attr]
            if borrowed_backward is not None:  # the child decode's ctx holds it: no cycle
                borrowed_backward.token = None
            decoded = _NativeBorrowedDecode.apply(
                child_codes.values,
                child_level.W_dec,
                own,
                child_codes.rows,
                child_codes.cols,
                borrowed_columns,
                child_decodes_itself,
                borrowed_backward if handed else None,
                *token,
            )
        else:
            decoded = own + child_level.decode_columns(
                child_codes, borrowed_columns, fused, row_sparse_grad=child_decodes_itself
            )
    return decoded + level.b_dec if with_bias else decoded


def _native_decode_applies(own: Tensor, child_codes: LevelCodes, decoder: Tensor) -> bool:
    """Whether the fused C++ kernel decodes the borrowed children: it also needs a contiguous
    output to add into."""
    return own.is_contiguous() and native.takes(own, child_codes.values, decoder)


class _NativeBorrowedDecode(Function):
    """``own`` plus the borrowed children's outputs, added in place by one C++ pass over the
    child level's entries (``native/borrowed_decode.cpp``): each entry whose feature is flagged
    in ``borrowed`` adds value * its decoder row into its token's row. Backward: the borrowed
    entries' value gradients (<grad, row>, zero for the others) and the borrowed rows' decoder
    gradient, sparse (``row_sparse_grad``: the decoder gets a dense gradient elsewhere in the
    loss, into which autograd adds it) or dense. With a :class:`~hsae.model.kernels.
    BorrowedBackward` (and its token, the trailing input), the backward only hands it the
    gradient: the child level's own decode, whose backward runs next, forms those two."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: Tensor,
        decoder: Tensor,
        own: Tensor,
        rows: Tensor,
        cols: Tensor,
        borrowed: Tensor,
        row_sparse_grad: bool,
        handed_to: BorrowedBackward | None = None,
        *token: Tensor,
    ) -> Tensor:
        entries = native.ops().borrowed_decode_forward(
            values.detach(), rows, cols, borrowed, decoder.detach(), own
        )
        ctx.mark_dirty(own)
        ctx.save_for_backward(values, decoder, rows, cols, entries)
        ctx.row_sparse_grad, ctx.handed_to, ctx.n_token = row_sparse_grad, handed_to, len(token)
        return own

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        tail: tuple[Tensor | None, ...] = (None,) * (1 + ctx.n_token)
        if ctx.handed_to is not None:
            ctx.handed_to.grad = grad.contiguous()
            return (None, None, grad, None, None, None, None, *tail)
        values, decoder, rows, cols, entries = ctx.saved_tensors
        need_values, need_decoder = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_values, latents, grad_rows = native.ops().borrowed_decode_backward(
            grad, values.detach(), rows, cols, entries, decoder.detach(), need_values, need_decoder
        )
        grad_decoder = None
        if need_decoder and ctx.row_sparse_grad:
            grad_decoder = row_sparse_gradient(latents, grad_rows, decoder.shape)
        elif need_decoder:
            grad_decoder = decoder.new_zeros(decoder.shape).index_copy_(0, latents, grad_rows)
        values_grad = grad_values if need_values else None
        return (values_grad, grad_decoder, grad, None, None, None, None, *tail)
