"""The JumpReLU estimator, and the support-only kernels of every level kind's training step.

Everything here computes exactly the same values and gradients as the plain dense formulas in
:mod:`hsae.model.level` (the tests compare them at several densities); it only skips work on
entries that carry no gradient. A level's training forward computes its dense pre-activations
once (the encoder's forward matmul: the floor of any step) and then works on its *support*:
the (token, latent) entries above threshold plus those inside the estimator's band just below
it (TopK kinds: the selected entries). Band entries contribute nothing to the output but must
receive a gradient, because the threshold's pseudo-derivative reads it.

* :func:`support_encode`: the support's activations, whose backward forms the encoder's weight
  gradient, its biases' and the thresholds' from the support entries only;
* :func:`support_decode`: decoding from the support (embedding_bag with per-sample weights),
  with a sparse backward for both the values and the decoder;
* :func:`support_l0`: the L0 estimator read from the support;
* :func:`entry_positions` / :func:`scatter_entries`: where given (token, latent) pairs sit among
  the entries, and a code's dense form for the paths that want one;
* :func:`gathered_dots`: dot products of given row pairs of two matrices, with no gathered copy;
* :func:`squared_error`: ||decoded + b_dec - x||^2 per token in two passes over [batch, d_in]
  forward and two backward (autograd's add, sub, pow and sum take about twice that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from hsae.model import native

SPARSE_BACKWARD_MAX_DENSITY = 0.25
"""Above this share of support entries the encoder's weight gradient is one dense product
(x^T grad) rather than an embedding_bag over the entries. On two CPU threads at d = 640 the
entries are still faster at 24% (2.6 against 2.8 ms, fwd+bwd of 256 latents x 1,024 tokens)
and far faster at 12% (3.0 against 5.3 ms): their costs cross near 26%."""
DENSE_DECODE_DENSITY = 0.25
"""Above this share of support entries one dense decoder product beats gathering rows. On two
CPU threads at d = 640, decoding forward and backward from the entries takes 6.1 ms at 24%
density against 7.3 ms for the dense product (256 latents), 7.2 against 12.4 ms at 12.5%
(512): their costs cross near 28%."""


def rectangle_band(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Where the rectangle kernel K((pre - theta) / eps) is non-zero: |pre - theta| < eps / 2."""
    return (pre - threshold).abs() < (bandwidth / 2)


def threshold_pseudo_gradient(
    grad_acts: Tensor, pre: Tensor, threshold: Tensor, bandwidth: float
) -> Tensor:
    """dL/d theta through a = JumpReLU_theta(pre): sum over tokens of dL/da * -(theta/eps) K."""
    band = rectangle_band(pre, threshold, bandwidth)
    return -(threshold / bandwidth) * (grad_acts * band).sum(0)


class JumpReLU(Function):
    """a = pre * H(pre - theta); d a / d pre = H(pre - theta), d a / d theta = -(theta/eps) K."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_pre = grad_out * (pre > threshold) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = threshold_pseudo_gradient(grad_out, pre, threshold, ctx.bandwidth)
        return grad_pre, grad_threshold, None


class L0WithSTE(Function):
    """Batch-mean number of latents above threshold; gradient -(1/eps) K reaches theta only."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        band_count = rectangle_band(pre, threshold, bandwidth).sum(0).to(pre.dtype)
        ctx.save_for_backward(band_count)
        ctx.bandwidth = bandwidth
        ctx.batch = pre.shape[0]
        return (pre > threshold).sum().to(pre.dtype) / pre.shape[0]

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        (band_count,) = ctx.saved_tensors
        grad_threshold = -grad_out * band_count / (ctx.bandwidth * ctx.batch)
        return None, grad_threshold, None


def support_of(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """(rows, cols) of latents above theta - eps/2: the active ones and the band below theta."""
    return (pre > threshold - bandwidth / 2).nonzero(as_tuple=True)


def support_entries(
    pre: Tensor, threshold: Tensor, bandwidth: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The support of :func:`support_of` (row-major, as ``nonzero`` orders it) with each
    entry's pre-activation and whether it is active (above ``threshold``), from ``pre`` and
    ``threshold`` without gradient. On the CPU one fused C++ pass pair
    (``native/support.cpp``; 2.7 against 8.1 ms for four levels of 256-2048 latents x 1,024
    tokens on two threads); elsewhere the library kernels, with the same results."""
    cut = threshold - bandwidth / 2
    if native.takes(pre, threshold):
        rows, cols, pre_support, active = native.ops().support_entries(pre, cut, threshold)
        return rows, cols, pre_support, active
    rows, cols = (pre > cut).nonzero(as_tuple=True)
    pre_support = gather_support(pre, rows, cols)
    return rows, cols, pre_support, pre_support > threshold.index_select(0, cols)


class _GatherDistinct(Function):
    """values = dense.flatten()[flat_index] for distinct indices.

    Autograd's generic gather scatters its gradient back with an accumulating index_put, which
    is serial and slow on CPU; distinct indices allow a plain (parallel) index copy instead.
    """

    @staticmethod
    def forward(ctx, dense: Tensor, flat_index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(flat_index)
        ctx.shape = dense.shape
        return dense.reshape(-1).index_select(0, flat_index)

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (flat_index,) = ctx.saved_tensors
        grad = grad_values.new_zeros(ctx.shape.numel())
        grad.index_copy_(0, flat_index, grad_values)
        return grad.view(ctx.shape), None


def gather_entries(dense: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """dense[rows, cols] for distinct (row, col) pairs, with a fast backward."""
    return _GatherDistinct.apply(dense, rows * dense.shape[1] + cols)


# --- the support-only training step --------------------------------------------------------
# A level's training forward computes the dense pre-activations once (the encoder's forward
# matmul, the step's floor) and from there works on the support only: the (token, latent)
# entries that are active or inside the estimator's band, a few per cent of [batch, features].
# The values, the encoder's gradients, the decoder both ways and the L0 estimator all run on
# those entries; nothing else of [batch, features] is read again.


def any_by(index: Tensor, size: int, flags: Tensor | None = None) -> Tensor:
    """[size] booleans: True where an entry with that index is flagged (every entry when
    ``flags`` is None). Scatters, with no boolean indexing: no host sync on a GPU, and several
    times faster than ``index_fill_`` on the CPU for tens of thousands of entries."""
    if flags is None:
        found = torch.zeros(size, dtype=torch.bool, device=index.device)
        return found.scatter_(0, index, found.new_ones(()).expand(index.shape))
    found = torch.zeros(size, dtype=torch.int8, device=index.device)
    return found.scatter_reduce_(0, index, flags.to(torch.int8), reduce="amax") > 0


def stable_order(keys: Tensor, bound: int) -> Tensor:
    """The permutation sorting integer ``keys`` (all in [0, bound)) stably.

    Keys that fit are sorted as int32: the radix sort then makes half the passes (0.33 against
    0.66 ms for 70,000 keys on two CPU threads; fewer bits on a GPU too)."""
    if bound <= torch.iinfo(torch.int32).max and keys.dtype != torch.int32:
        keys = keys.to(torch.int32)
    return torch.argsort(keys, stable=True)


def column_order(cols: Tensor, n_columns: int) -> tuple[Tensor, Tensor]:
    """(permutation sorting entries by column, start offset of each column in that order);
    on the CPU a counting sort in C++ (``native/support.cpp``)."""
    if cols.dtype == torch.int64 and native.takes(cols):
        order, starts = native.ops().column_order(cols, n_columns)
        return order, starts
    order = stable_order(cols, n_columns)
    counts = torch.bincount(cols, minlength=n_columns)
    return order, torch.cumsum(counts, 0) - counts


class ColumnOrder:
    """The column order (:func:`column_order`) of one level's support entries, computed on
    first use and then shared: the encoder's and the decoder's weight gradients both sum the
    same entries by column, so one sort serves both backward passes."""

    def __init__(self, cols: Tensor, n_columns: int):
        self.cols, self.n_columns = cols, n_columns
        self._order: tuple[Tensor, Tensor] | None = None
        self._rows: tuple[Tensor, Tensor] | None = None

    def get(self) -> tuple[Tensor, Tensor]:
        if self._order is None:
            self._order = column_order(self.cols, self.n_columns)
        return self._order

    def rows_in_order(self, rows: Tensor) -> Tensor:
        """The entries' ``rows`` in column order, gathered once for both weight gradients
        (kept while the same ``rows`` tensor asks again)."""
        if self._rows is None or self._rows[0] is not rows:
            self._rows = (rows, rows.index_select(0, self.get()[0]))
        return self._rows[1]


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's entries in a row-sorted entry list (embedding_bag's offsets)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def sparse_t_times(
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    dense: Tensor,
    n_cols: int,
    order: ColumnOrder | None = None,
) -> Tensor:
    """S^T @ dense for S[rows, cols] = values ([n_cols, dense.shape[1]]), without forming S.

    One embedding_bag over the entries sorted by column: bag j sums values[k] dense[rows[k]]
    over the entries of column j. Faster on CPU than torch.sparse.mm with COO or CSR operands
    (benchmarks/step_speed.py's note) and a single kernel on GPU. ``order``: the entries'
    shared :class:`ColumnOrder` (``cols`` must be its columns), else sorted here.
    """
    if order is None:
        permutation, offsets = column_order(cols, n_cols)
        rows_in_order = rows.index_select(0, permutation)
    else:
        (permutation, offsets), rows_in_order = order.get(), order.rows_in_order(rows)
    return F.embedding_bag(
        rows_in_order,
        dense,
        offsets,
        mode="sum",
        per_sample_weights=values.index_select(0, permutation),
    )


class _SupportEncode(Function):
    """values[k] = a(pre[rows[k], cols[k]]) of the support entries, with sparse gradients.

    ``pre`` (no gradient) was computed as (x - b_dec) W_enc + b_enc; ``gate`` is None for kinds
    whose support entries all pass their pre-activation through (TopK kinds), else the JumpReLU
    threshold: a = pre H(pre - theta) with the rectangle-kernel estimator for theta. The
    backward forms every parameter gradient from the support entries alone.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        threshold: Tensor | None,
        pre_support: Tensor,
        rows: Tensor,
        cols: Tensor,
        bandwidth: float,
        order: ColumnOrder | None = None,
    ) -> Tensor:
        if threshold is None:
            values = pre_support.clone()
        else:
            values = pre_support * (pre_support > threshold.index_select(0, cols))
        ctx.save_for_backward(x, W_enc, b_dec, threshold, pre_support, rows, cols)
        ctx.bandwidth, ctx.order = bandwidth, order
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):  # type: ignore[override]
        x, W_enc, b_dec, threshold, pre_support, rows, cols = ctx.saved_tensors
        n_tokens, n_latents = x.shape[0], W_enc.shape[1]
        grad_threshold = None
        if threshold is None:
            grad_pre = grad_values
        else:
            theta = threshold.index_select(0, cols)
            grad_pre = grad_values * (pre_support > theta)
            if ctx.needs_input_grad[4]:
                band = (pre_support - theta).abs() < (ctx.bandwidth / 2)
                summed = grad_values.new_zeros(n_latents).scatter_add_(0, cols, grad_values * band)
                grad_threshold = -(threshold / ctx.bandwidth) * summed
        grad_b_enc = grad_pre.new_zeros(n_latents).scatter_add_(0, cols, grad_pre)
        dense_grad = None
        if cols.numel() > SPARSE_BACKWARD_MAX_DENSITY * n_tokens * n_latents:
            dense_grad = grad_pre.new_zeros(n_tokens, n_latents).index_put_((rows, cols), grad_pre)
        grad_x = grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[0]:
            if dense_grad is None:
                dense_grad = grad_pre.new_zeros(n_tokens, n_latents)
                dense_grad.index_put_((rows, cols), grad_pre)
            grad_x = dense_grad @ W_enc.t()
        if ctx.needs_input_grad[1]:
            # d pre / d W_enc = x - b_dec: centring the [batch, d] input once is cheaper than
            # correcting the [d, n] gradient by an outer product afterwards.
            centred = x - b_dec
            if dense_grad is not None:
                grad_W_enc = centred.t() @ dense_grad
            else:
                grad_W_enc = sparse_t_times(rows, cols, grad_pre, centred, n_latents, ctx.order).t()
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        grad_b_enc_out = grad_b_enc if ctx.needs_input_grad[2] else None
        return (
            grad_x,
            grad_W_enc,
            grad_b_enc_out,
            grad_b_dec,
            grad_threshold,
            None,
            None,
            None,
            None,
            None,
        )


def support_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    threshold: Tensor | None,
    pre_support: Tensor,
    rows: Tensor,
    cols: Tensor,
    bandwidth: float,
    order: ColumnOrder | None = None,
) -> Tensor:
    """Differentiable activations of the support entries (see :class:`_SupportEncode`);
    ``order``: the entries' shared :class:`ColumnOrder`."""
    return _SupportEncode.apply(
        x, W_enc, b_enc, b_dec, threshold, pre_support, rows, cols, bandwidth, order
    )


def encoder_pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """(x - b_dec) W_enc + b_enc as one addmm, without gradient (the step's one dense matmul)."""
    with torch.no_grad():
        # Under bf16 autocast the product runs in bf16; pre is float32 either way, so the
        # threshold comparison, the estimator and the codes are float32.
        return torch.addmm(b_enc - b_dec @ W_enc, x, W_enc).float()


class _SupportL0(Function):
    """Batch-mean count of support entries above theta; gradient -(1/eps) K reaches theta.

    The same estimator as :class:`L0WithSTE`, read from the support (which holds every entry
    above theta and the whole band), so it costs O(support) instead of O(batch x features).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, threshold: Tensor, pre_support: Tensor, cols: Tensor, n_tokens: int, bandwidth: float
    ) -> Tensor:
        theta = threshold.index_select(0, cols)
        band = (pre_support - theta).abs() < (bandwidth / 2)
        # A scatter, not bincount(cols[band]): no boolean index (a host sync on a GPU; twice
        # the time on the CPU).
        band_count = threshold.new_zeros(threshold.shape[0]).scatter_add_(
            0, cols, band.to(threshold.dtype)
        )
        ctx.save_for_backward(band_count)
        ctx.scale = bandwidth * n_tokens
        return (pre_support > theta).sum().to(threshold.dtype) / n_tokens

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (band_count,) = ctx.saved_tensors
        return -grad_out * band_count / ctx.scale, None, None, None, None


def support_l0(
    threshold: Tensor, pre_support: Tensor, cols: Tensor, n_tokens: int, bandwidth: float
) -> Tensor:
    return _SupportL0.apply(threshold, pre_support, cols, n_tokens, bandwidth)


TILED_DECODE_MIN_BYTES = 2 << 20
"""A decoder larger than this is decoded from the entries block of rows by block on the CPU
(``native/tiled_decode.cpp``): the library kernels read rows in entry order, from L3 or memory
once it outgrows L2 (2,048 x 640 float32 is 5 MiB: 1.5 against 2.3 ms forward, 1,024 tokens on
two threads; at 512 latents, 1.3 MiB, the two are even)."""
TILED_DOTS_MIN_BYTES = 0
"""A decoder larger than this takes the tiled kernel for the values' gradient (one dot product
an entry) too. It beats the library's (embedding_bag's per-sample-weight gradient, a plain loop)
at every size: at d = 640 on two threads, 1,024 tokens x 60 entries, 1.5 against 2.4 ms at 256
latents, 1.6 against 2.3 at 512, 1.2 against 2.5 at 1,024 (2026-12-02, AMD host)."""
TILED_DECODE_BLOCK_BYTES = 512 << 10
"""The decoder rows of one block: well inside a core's L2 (0.5 to 2 MiB on current x86)."""


def tiled_chunk(W_dec: Tensor, values: Tensor, min_bytes: int | None = None) -> int:
    """Rows per block of the tiled CPU decode (``TILED_DECODE_BLOCK_BYTES``, at most all of
    them), or 0 where the library kernels serve: a decoder under ``min_bytes`` (default
    ``TILED_DECODE_MIN_BYTES``), not float32, not on the CPU or not contiguous, under
    torch.compile, or the fused kernels not built."""
    size = W_dec.numel() * W_dec.element_size()
    threshold = TILED_DECODE_MIN_BYTES if min_bytes is None else min_bytes
    if size <= threshold or not W_dec.is_contiguous() or W_dec.shape[0] == 0:
        return 0
    if not native.takes(W_dec, values):
        return 0
    block = max(16, TILED_DECODE_BLOCK_BYTES // (W_dec.shape[1] * W_dec.element_size()))
    return min(block, W_dec.shape[0])


class GradientAddend:
    """A term of a decoder's gradient that another part of the same loss computes later in the
    backward, added in place into the dense gradient of the decode that carries it
    (:func:`support_decode` with ``addend``), instead of arriving as a second [n, d] gradient
    that autograd then adds: two passes over the decoder's size fewer (the constraint's, at
    d = 2304 some 280 MB each).

    The decode sets ``token``, a 0-element output of its own, which the term's producer takes
    as an input: the producer's backward then runs before the decode's and sets ``add_into``;
    the decode's backward calls it on its gradient. A producer that finds no token (the decode
    took a path without the addend) returns its gradient to autograd as usual."""

    def __init__(self) -> None:
        self.token: Tensor | None = None
        """Set by the decode: its 0-element output, to be taken by the term's producer."""
        self.add_into: Callable[[Tensor], None] | None = None
        """Set in the producer's backward: adds the term into a gradient in place."""


class BorrowedBackward:
    """The backward of a perturbed parent level's borrowed children (the children of its
    substituted parents, whose outputs stand in for theirs), done by the child level's own
    decode (:func:`support_decode` with ``borrowed``): its backward, which forms each entry's
    dot product and each decoder row's gradient anyway, forms the borrowed entries' too (their
    dot products with the parent reconstruction's gradient, summed into the same values'
    gradient, and their decoder rows' share added into its dense one) instead of a borrowed
    backward of its own with a row-sparse decoder gradient (at d = 640, 2.0 against 3.1 ms for
    512 latents x 1,024 tokens).

    As with :class:`GradientAddend`, the decode sets ``token``, a 0-element output of its own;
    the borrowed children's decode takes it as an input, so its backward runs first and sets
    ``grad`` (the parent reconstruction's gradient) instead of forming its own gradients; the
    child decode's backward reads it. A borrowed decode that finds no token (the child decode
    took a path without this) forms its gradients itself."""

    def __init__(self, flags: Tensor, values: Tensor) -> None:
        self.flags = flags
        """[child features] bool: the children of the substituted parents."""
        self.values = values
        """The child level's entry values: the borrowed entries carry them whole (the child
        level's own decode may mask its own substituted columns)."""
        self.token: Tensor | None = None
        """Set by the child decode: its 0-element output, to be taken by the borrowed decode."""
        self.grad: Tensor | None = None
        """Set in the borrowed decode's backward: the parent reconstruction's gradient."""


def borrowed_backward_applies(W_dec: Tensor, values: Tensor) -> bool:
    """Whether a decode can take a :class:`BorrowedBackward`: the fused CPU kernels (float32 on
    the CPU, built) and a contiguous decoder."""
    return W_dec.is_contiguous() and native.takes(W_dec, values)


class _SupportDecode(Function):
    """sum_k values[k] W_dec[cols[k]] into row rows[k] (rows sorted), with a sparse backward.

    Forward: one embedding_bag with per-sample weights. Backward: the values' gradient is the
    per-entry dot <grad_out[row], W_dec[col]> (embedding_bag's own per-sample-weight kernel,
    which forms no [entries, d] tensor); the decoder's gradient is S^T grad_out as one more
    embedding_bag over the entries sorted by column (autograd's generic embedding_bag weight
    gradient is several times slower on CPU), into which a :class:`GradientAddend`'s term is
    added. With a :class:`BorrowedBackward` whose gradient has arrived, the fused CPU kernels
    form the borrowed entries' gradients too (``borrowed_values``: their values, an input so
    that they get them; ``merge``: they are ``values`` itself, whose one gradient then holds
    both, summed in the kernel). ``selected``: a bool per entry, the entries decoded (the
    others count as zero: a perturbed level's own decode without its substituted columns);
    their mask is applied here rather than by a product in the graph, so that the kernel forms
    the masked gradient directly. The second output is the token of both.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        values: Tensor,
        W_dec: Tensor,
        rows: Tensor,
        cols: Tensor,
        n_tokens: int,
        row_sparse_grad: bool = False,
        order: ColumnOrder | None = None,
        addend: GradientAddend | None = None,
        borrowed_values: Tensor | None = None,
        borrowed: BorrowedBackward | None = None,
        selected: Tensor | None = None,
        merge: bool = False,
    ) -> tuple[Tensor, Tensor]:
        chunk = tiled_chunk(W_dec, values)
        ctx.row_sparse_grad, ctx.order = row_sparse_grad, order
        ctx.chunk = tiled_chunk(W_dec, values, TILED_DOTS_MIN_BYTES)  # the backward's dots
        ctx.addend, ctx.borrowed, ctx.merge = addend, borrowed, merge
        decoded = values.detach() if selected is None else values.detach() * selected
        # The decoded values, not the input: the decoder's gradient is formed from them.
        ctx.save_for_backward(decoded, W_dec, rows, cols, borrowed_values, selected)
        token = values.new_empty(0)
        if chunk:
            out = native.ops().tiled_decode(decoded, rows, cols, W_dec.detach(), n_tokens, chunk)
            return out, token
        offsets = row_offsets(rows, n_tokens)
        # Detached: a weight that requires grad makes embedding_bag take its training variant
        # (_embedding_bag, which also builds the entries' bag map); this Function has its own
        # backward, so the forward-only kernel serves (3% faster for 70,000 entries).
        out = F.embedding_bag(cols, W_dec.detach(), offsets, mode="sum", per_sample_weights=decoded)
        return out, token

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_token: Tensor | None):  # type: ignore[override]
        values, W_dec, rows, cols, borrowed_values, selected = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        borrowed, grad_borrowed = ctx.borrowed, None
        if borrowed is not None:
            grad_borrowed, borrowed.grad = borrowed.grad, None  # set again by a second backward
        grad_values = grad_W_dec = grad_borrowed_values = None
        borrowed_rows: list[Tensor] = []  # the borrowed features and their rows' gradient
        if grad_borrowed is not None:
            # The borrowed entries' dots and, for the decoder's gradient, their rows' share.
            rows_wanted = ctx.needs_input_grad[1]
            grad_values, grad_borrowed_values, *borrowed_rows = (
                native.ops().tiled_dots_borrowed(
                    grad_out, rows, cols, W_dec.detach(), ctx.chunk or W_dec.shape[0],
                    grad_borrowed, borrowed.flags, selected, ctx.merge,
                    borrowed_values.detach() if rows_wanted else None,
                )
            )  # fmt: skip
            if ctx.merge:  # the borrowed values are the values: their one gradient holds both
                grad_borrowed_values = None
            grad_values = grad_values if ctx.needs_input_grad[0] else None
            grad_borrowed_values = grad_borrowed_values if ctx.needs_input_grad[8] else None
        elif ctx.needs_input_grad[0] and ctx.chunk:
            grad_values = native.ops().tiled_dots(
                grad_out, rows, cols, W_dec.detach(), ctx.chunk, selected
            )
        elif ctx.needs_input_grad[0]:
            grad_values = gathered_dots(grad_out, rows, W_dec, cols)
            if selected is not None:
                grad_values = grad_values * selected
        if ctx.needs_input_grad[1] and ctx.row_sparse_grad:
            # Only the rows of the latents decoded here: a sparse gradient that autograd adds
            # into the dense one the caller guarantees (no [n, d] tensor written for a few rows).
            latents, slot = torch.unique(cols, return_inverse=True)
            grad_rows = sparse_t_times(rows, slot, values, grad_out, latents.numel())
            grad_W_dec = row_sparse_gradient(latents, grad_rows, W_dec.shape)
        elif ctx.needs_input_grad[1]:
            if ctx.order is None:
                ctx.order = ColumnOrder(cols, W_dec.shape[0])
            grad_W_dec = sparse_t_times(rows, cols, values, grad_out, W_dec.shape[0], ctx.order)
            if borrowed_rows:
                grad_W_dec.index_add_(0, borrowed_rows[0], borrowed_rows[1])
            addend = ctx.addend
            if addend is not None and addend.add_into is not None:
                addend.add_into(grad_W_dec)
                addend.add_into = None  # set again by a second backward through the graph
        return (
            grad_values, grad_W_dec, None, None, None, None, None, None, grad_borrowed_values,
            None, None, None,
        )  # fmt: skip


def row_sparse_gradient(latents: Tensor, rows: Tensor, shape: torch.Size) -> Tensor:
    """A [n, d] gradient that is ``rows`` at the (ascending, distinct) ``latents`` and zero
    elsewhere, as a coalesced sparse COO tensor. Autograd adds it in place into a dense
    gradient that arrives after it; one arriving before it would be copied whole
    (``HSAE.training_loss`` orders its graph for that)."""
    return torch.sparse_coo_tensor(
        latents.unsqueeze(0), rows, shape, is_coalesced=True, check_invariants=False
    )


def support_decode(
    values: Tensor,
    rows: Tensor,
    cols: Tensor,
    W_dec: Tensor,
    n_tokens: int,
    row_sparse_grad: bool = False,
    order: ColumnOrder | None = None,
    addend: GradientAddend | None = None,
    borrowed: BorrowedBackward | None = None,
    selected: Tensor | None = None,
) -> Tensor:
    """Decoding of support entries with the sparse backward of :class:`_SupportDecode`.

    ``row_sparse_grad``: give W_dec a sparse COO gradient over the decoded latents' rows, for a
    decode whose decoder also receives a dense gradient elsewhere in the same loss (autograd
    then adds the rows into it in place); otherwise the gradient is a dense [n, d] tensor.
    ``order``: the entries' shared :class:`ColumnOrder` (for the dense gradient).
    ``addend``: a term of the decoder's gradient computed later in the backward, added into
    the dense gradient here (its ``token`` is set; ignored with ``row_sparse_grad``).
    ``borrowed``: the backward of a perturbed parent level's borrowed children, done here (its
    ``token`` is set; ignored with ``row_sparse_grad`` or where
    :func:`borrowed_backward_applies` does not hold). ``rows`` and ``cols`` must then be all of
    the level's entries, as ``borrowed.values`` are. ``selected``: a bool per entry, the entries
    decoded (the others' values count as zero; None: all).
    """
    if row_sparse_grad:
        addend = borrowed = None
    if borrowed is not None and not borrowed_backward_applies(W_dec, values):
        borrowed = None
    merge = borrowed is not None and borrowed.values is values
    out, token = _SupportDecode.apply(
        values, W_dec, rows, cols, n_tokens, row_sparse_grad, order, addend,
        None if borrowed is None else borrowed.values, borrowed, selected, merge,
    )  # fmt: skip
    if addend is not None:
        addend.token = token
    if borrowed is not None:
        borrowed.token = token
    return out


class _ScatterDistinct(Function):
    """dense[flat_index] = values in a zero [shape] tensor (distinct indices); backward gathers."""

    @staticmethod
    def forward(ctx, values: Tensor, flat_index: Tensor, shape: torch.Size) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(flat_index)
        dense = values.new_zeros(shape.numel())
        dense.index_copy_(0, flat_index, values)
        return dense.view(shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (flat_index,) = ctx.saved_tensors
        return grad.reshape(-1).index_select(0, flat_index), None, None


def scatter_entries(values: Tensor, rows: Tensor, cols: Tensor, shape: torch.Size) -> Tensor:
    """The dense [batch, n] tensor with ``values`` at distinct (rows, cols), zero elsewhere."""
    return _ScatterDistinct.apply(values, rows * shape[1] + cols, shape)


def entry_positions(
    rows: Tensor,
    cols: Tensor,
    n_rows: int,
    n_cols: int,
    query_keys: Tensor,
    table: Tensor | None = None,
) -> Tensor:
    """int32 position among the (distinct) entries (rows, cols) of each query key
    row * n_cols + col; -1 where the key is not an entry.

    The position of every entry is written into an int32 [rows x cols] table (a memset and one
    scatter: several times faster than a binary search of the queries among the entries, and
    far cheaper than the float [batch, n] activations and their gradient). ``table``: an int32
    buffer of n_rows * n_cols to use for it (its contents are overwritten), else allocated.
    """
    if table is None:
        table = torch.empty(n_rows * n_cols, dtype=torch.int32, device=rows.device)
    table.fill_(-1)
    positions = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device)
    table.index_copy_(0, rows * n_cols + cols, positions)
    return table.index_select(0, query_keys)


def gathered_dots(a: Tensor, a_rows: Tensor, b: Tensor, b_rows: Tensor) -> Tensor:
    """[k] dot products <a[a_rows[i]], b[b_rows[i]]>, without gathering the rows.

    embedding_bag's per-sample-weight gradient kernel computes exactly this (sample i of bag
    a_rows[i] reads row b_rows[i]), one dot per pair straight from both matrices: no [k, d]
    temporaries, against two gathers and a product for ``vecdot(a[a_rows], b[b_rows])``
    (0.1 against 0.24 ms for 2,048 pairs at d = 640 on two CPU threads).
    """
    if a_rows.numel() == 0:
        return a.new_zeros(0)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        a, b, b_rows, a_rows, a_rows, 0, -1
    )


def gather_support(pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """pre[rows, cols] as one flat index_select (faster than advanced indexing on CPU)."""
    return pre.reshape(-1).index_select(0, rows * pre.shape[1] + cols)


class _SquaredError(Function):
    """e = decoded + b_dec - x; per-token ||e||^2, with d/d decoded = 2 e g and d/d b_dec its
    sum over tokens. ``x`` gets no gradient (it is data)."""

    @staticmethod
    def forward(ctx, decoded: Tensor, b_dec: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        error = torch.add(decoded, b_dec).sub_(x)
        ctx.save_for_backward(error)
        return torch.linalg.vecdot(error, error)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (error,) = ctx.saved_tensors
        grad_decoded = error * (2 * grad).unsqueeze(1)
        grad_b_dec = grad_decoded.sum(0) if ctx.needs_input_grad[1] else None
        return grad_decoded, grad_b_dec, None


def squared_error(decoded: Tensor, b_dec: Tensor, x: Tensor) -> Tensor:
    """[batch] ||decoded + b_dec - x||^2 (see :class:`_SquaredError`)."""
    return _SquaredError.apply(decoded, b_dec, x)
