"""One JumpReLU SAE level: its parameters, encoder, decoder and initialisation.

Feature i of a level has activation a_i(x) = JumpReLU_theta_i((x - b_dec) W_enc[:, i] + b_enc[i])
and output vector f_i(x) = a_i(x) d_i, where d_i = W_dec[i] is kept at unit norm
(``hsae-method.md`` section 1). Inputs here are already in the scaled units (mean norm
sqrt(d_in)); :class:`hsae.model.hsae.HSAE` applies the activation scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hsae.model import kernels
from hsae.model.kernels import (
    JumpReLU,
    L0WithSTE,
    decode_support,
    gather_entries,
    jumprelu_encode,
    support_of,
)


@dataclass
class LevelCodes:
    """What one training forward of a level produces."""

    acts: Tensor
    """[batch, n] activations (zero off the active set), differentiable."""
    pre: Tensor
    """[batch, n] pre-activations, no gradient."""
    rows: Tensor
    """Token index of each support entry (active or inside the threshold band)."""
    cols: Tensor
    """Latent index of each support entry."""
    values: Tensor
    """acts[rows, cols], differentiable."""


class JumpReLULevel(nn.Module):
    """A JumpReLU sparse autoencoder with a learnable per-feature threshold."""

    def __init__(self, d_in: int, n_features: int, generator: torch.Generator | None = None):
        super().__init__()
        self.d_in = d_in
        self.n_features = n_features
        decoder = torch.randn(n_features, d_in, generator=generator)
        decoder /= decoder.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.log_threshold = nn.Parameter(torch.full((n_features,), -1.0))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    # --- plain (reference) maths --------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor, bandwidth: float = 1e-3) -> Tensor:
        """[batch, n] activations with the straight-through estimator on the threshold."""
        return JumpReLU.apply(self.pre_activations(x), self.threshold, bandwidth)

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    # --- training forward -----------------------------------------------------------------
    def encode_for_training(self, x: Tensor, bandwidth: float, fused: bool) -> LevelCodes:
        threshold = self.threshold
        if fused:
            acts, pre = jumprelu_encode(x, self.W_enc, self.b_enc, self.b_dec, threshold, bandwidth)
        else:
            pre_with_grad = self.pre_activations(x)
            acts = JumpReLU.apply(pre_with_grad, threshold, bandwidth)
            pre = pre_with_grad.detach()
        rows, cols = support_of(pre, threshold.detach(), bandwidth)
        values = gather_entries(acts, rows, cols)
        return LevelCodes(acts=acts, pre=pre, rows=rows, cols=cols, values=values)

    def l0(self, codes: LevelCodes, bandwidth: float) -> Tensor:
        """Batch-mean L0 whose straight-through gradient trains the thresholds."""
        return L0WithSTE.apply(codes.pre, self.threshold, bandwidth)

    def decode_columns(self, codes: LevelCodes, columns: Tensor | None, fused: bool) -> Tensor:
        """Decoder output (without b_dec) of the features flagged in ``columns`` (None: all).

        The fast path decodes only support entries when they are few, and falls back to one
        dense product when the code is dense enough for that to be cheaper. Both give every
        support entry (active or in the threshold band) its gradient.
        """
        n_tokens = codes.acts.shape[0]
        selected = None if columns is None else columns[codes.cols]
        n_selected = codes.values.numel() if selected is None else int(selected.sum())
        if not fused or n_selected > kernels.DENSE_DECODE_DENSITY * codes.acts.numel():
            acts = codes.acts if columns is None else codes.acts * columns
            return acts @ self.W_dec
        if selected is None:
            return decode_support(codes.values, codes.rows, codes.cols, self.W_dec, n_tokens)
        entries = selected.nonzero(as_tuple=True)[0]
        values = codes.values.index_select(0, entries)
        rows, cols = codes.rows[entries], codes.cols[entries]
        return decode_support(values, rows, cols, self.W_dec, n_tokens)

    # --- initialisation and constraints ------------------------------------------------------
    @torch.no_grad()
    def initialise_from_data(self, x: Tensor, target_l0: float) -> None:
        """b_dec at the data mean; thresholds so each feature starts firing ~2x target_l0/n."""
        self.b_dec.copy_(x.mean(0))
        pre = self.pre_activations(x)
        firing_rate = min(0.5, 2.0 * target_l0 / self.n_features)
        quantiles = torch.quantile(pre.float(), 1.0 - firing_rate, dim=0)
        self.log_threshold.copy_(quantiles.clamp(min=1e-3).log())

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))
