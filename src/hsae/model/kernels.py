"""Fast paths of the JumpReLU level: fused encode with a sparse backward, and sparse decoding.

Everything here computes exactly the same values and gradients as the plain dense formulas in
:mod:`hsae.model.level` (the tests compare them); it only skips work on inactive latents:

* :func:`jumprelu_encode` fuses ``pre = (x - b_dec) W_enc + b_enc`` with the JumpReLU and its
  straight-through estimator (Rajamanoharan et al. 2024). Its backward forms the encoder
  gradient from the active entries only (a sparse-dense product) when they are few.
* :func:`decode_support` decodes only the *support* of a code: the latents above threshold plus
  those inside the estimator's band just below it. Band latents contribute nothing to the
  output but must receive a gradient, because the threshold's pseudo-derivative reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

SPARSE_BACKWARD_MAX_DENSITY = 0.04
"""Above this share of active entries the dense ``x^T @ grad`` product is faster on CPU/GPU."""
DENSE_DECODE_DENSITY = 0.12
"""Above this share of support entries one dense decoder product beats gathering rows."""


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


class _FusedJumpReLUEncode(Function):
    """Encoder matmul + JumpReLU whose backward touches only the active entries' inputs."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        bandwidth: float,
    ) -> tuple[Tensor, Tensor]:
        # (x - b_dec) W_enc + b_enc, without forming x - b_dec or its gradient.
        # Under bf16 autocast the product runs in bf16; pre is float32 either way, so the
        # threshold comparison, the straight-through estimator and the codes are float32.
        pre = torch.addmm(b_enc - b_dec @ W_enc, x, W_enc).float()
        acts = pre * (pre > threshold)
        ctx.save_for_backward(x, W_enc, b_dec, threshold, pre)
        ctx.bandwidth = bandwidth
        ctx.mark_non_differentiable(pre)
        return acts, pre

    @staticmethod
    def backward(ctx, grad_acts: Tensor, _grad_pre: Tensor | None):  # type: ignore[override]
        x, W_enc, b_dec, threshold, pre = ctx.saved_tensors
        active = pre > threshold
        grad_pre = grad_acts * active
        grad_b_enc = grad_pre.sum(0)

        grad_x = grad_pre @ W_enc.t() if ctx.needs_input_grad[0] else None
        grad_W_enc = None
        if ctx.needs_input_grad[1]:
            grad_W_enc = _input_times_sparse_grad(x, grad_pre, active)
            grad_W_enc -= torch.outer(b_dec, grad_b_enc)
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        grad_threshold = None
        if ctx.needs_input_grad[4]:
            grad_threshold = threshold_pseudo_gradient(grad_acts, pre, threshold, ctx.bandwidth)
        grad_b_enc_out = grad_b_enc if ctx.needs_input_grad[2] else None
        return grad_x, grad_W_enc, grad_b_enc_out, grad_b_dec, grad_threshold, None


def _input_times_sparse_grad(x: Tensor, grad_pre: Tensor, active: Tensor) -> Tensor:
    """x^T @ grad_pre, as a sparse-dense product when few entries are active."""
    n_active = int(active.sum())
    if n_active > SPARSE_BACKWARD_MAX_DENSITY * active.numel():
        return x.t() @ grad_pre
    rows, cols = active.nonzero(as_tuple=True)
    values = grad_pre[rows, cols]
    n_tokens, n_latents = grad_pre.shape
    transposed = torch.sparse_coo_tensor(
        torch.stack([cols, rows]), values, (n_latents, n_tokens), is_coalesced=False
    )
    return torch.sparse.mm(transposed, x).t()


def jumprelu_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor, bandwidth: float
) -> tuple[Tensor, Tensor]:
    """Return (activations, pre-activations) of one JumpReLU level; pre carries no gradient."""
    return _FusedJumpReLUEncode.apply(x, W_enc, b_enc, b_dec, threshold, bandwidth)


def support_of(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """(rows, cols) of latents above theta - eps/2: the active ones and the band below theta."""
    return (pre > threshold - bandwidth / 2).nonzero(as_tuple=True)


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


def decode_support(
    values: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_tokens: int
) -> Tensor:
    """sum over entries k of values[k] W_dec[cols[k]] into token rows[k] (rows sorted)."""
    counts = torch.bincount(rows, minlength=n_tokens)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)
