"""TopK level: each token keeps its k largest positive pre-activations (Gao et al. 2024).

a(x) = relu(pre(x)) on the k = round(target_l0) largest pre-activations of each token, zero
elsewhere; the same at training and inference, so the L0 is k per token by construction (fewer
only where a token has fewer than k positive pre-activations). There is no sparsity penalty and
no sparsity controller. The gradient flows through the selected pre-activations only: the
selection itself has no gradient, so the parent-children constraint cannot switch a latent on
(JumpReLU's threshold band can), it only reshapes the latents already selected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hsae.model import kernels
from hsae.model.level import Level, LevelCodes, entries_of


class TopKLevel(Level):
    """A TopK sparse autoencoder with k = round(target_l0) active latents per token."""

    kind = "topk"
    uses_sparsity_controller = False
    saelens_architecture = "topk"

    def __init__(
        self,
        d_in: int,
        n_features: int,
        generator: torch.Generator | None = None,
        target_l0: float | None = None,
    ):
        super().__init__(d_in, n_features, generator, target_l0)
        if target_l0 is None:
            raise ValueError("a topk level needs target_l0 (k = round(target_l0))")
        self.k = max(1, min(n_features, round(target_l0)))

    def select(self, pre: Tensor) -> Tensor:
        """[batch, n] mask of each row's k largest pre-activations, where they are > 0."""
        values, index = pre.topk(self.k, dim=1)
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(1, index, values > 0)

    def encode(self, x: Tensor, bandwidth: float = 1e-3) -> Tensor:
        pre = self.pre_activations(x)
        return pre * self.select(pre.detach())

    def encode_for_training(self, x: Tensor, bandwidth: float, fused: bool) -> LevelCodes:
        if fused:
            pre = kernels.encoder_pre_activations(x, self.W_enc, self.b_enc, self.b_dec)
            return self.selected_codes(x, pre, self.select(pre))
        pre_with_grad = self.pre_activations(x)
        pre = pre_with_grad.detach()
        selected = self.select(pre)
        acts = pre_with_grad * selected
        # The support only if something reads it: the dense path's loss does not (static
        # shapes, nothing read back to the host).
        return LevelCodes(acts=acts, pre=pre, support=lambda: entries_of(selected))

    def active(self, codes: LevelCodes) -> Tensor:
        return codes.acts.detach() > 0

    def saelens_fields(self) -> dict[str, Any]:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}
