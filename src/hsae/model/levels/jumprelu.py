"""JumpReLU level: a learnable per-feature threshold trained through a straight-through estimator.

a_i(x) = JumpReLU_theta_i(pre_i(x)) = pre_i(x) H(pre_i(x) - theta_i), theta_i = exp(log_threshold_i)
(Rajamanoharan et al. 2024). The loss carries lambda * L0, whose straight-through gradient trains
the thresholds; the trainer's sparsity controller steers lambda to the target L0. The support
of a training forward is the active latents plus those inside the estimator's band just below
the threshold (they contribute nothing to the output but their gradient reaches theta).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hsae.model import kernels
from hsae.model.kernels import JumpReLU, L0WithSTE, support_of
from hsae.model.level import Level, LevelCodes


class JumpReLULevel(Level):
    """A JumpReLU sparse autoencoder with a learnable per-feature threshold."""

    kind = "jumprelu"
    uses_sparsity_controller = True
    saelens_architecture = "jumprelu"

    def __init__(
        self,
        d_in: int,
        n_features: int,
        generator: torch.Generator | None = None,
        target_l0: float | None = None,
    ):
        super().__init__(d_in, n_features, generator, target_l0)
        self.log_threshold = nn.Parameter(torch.full((n_features,), -1.0))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor, bandwidth: float = 1e-3) -> Tensor:
        """[batch, n] activations with the straight-through estimator on the threshold."""
        return JumpReLU.apply(self.pre_activations(x), self.threshold, bandwidth)

    def encode_for_training(self, x: Tensor, bandwidth: float, fused: bool) -> LevelCodes:
        threshold = self.threshold
        if fused:
            # The support-only step: one dense matmul, then O(support) work (kernels.py).
            pre = kernels.encoder_pre_activations(x, self.W_enc, self.b_enc, self.b_dec)
            rows, cols, pre_support, active = kernels.support_entries(
                pre, threshold.detach(), bandwidth
            )
            order = kernels.ColumnOrder(cols, self.n_features)
            values = kernels.support_encode(
                x,
                self.W_enc,
                self.b_enc,
                self.b_dec,
                threshold,
                pre_support,
                rows,
                cols,
                bandwidth,
                order,
            )
            return LevelCodes(
                column_order=order,
                pre=pre,
                rows=rows,
                cols=cols,
                values=values,
                active_entries=active,
                pre_support=pre_support,
            )
        pre_with_grad = self.pre_activations(x)
        acts = JumpReLU.apply(pre_with_grad, threshold, bandwidth)
        pre = pre_with_grad.detach()
        cut = threshold.detach()
        return LevelCodes(acts=acts, pre=pre, support=lambda: support_of(pre, cut, bandwidth))

    def sparsity_loss(self, codes: LevelCodes, bandwidth: float) -> Tensor:
        """Batch-mean L0 whose straight-through gradient trains the thresholds."""
        if codes.pre_support is not None:
            return kernels.support_l0(
                self.threshold, codes.pre_support, codes.cols, codes.n_tokens, bandwidth
            )
        return L0WithSTE.apply(codes.pre, self.threshold, bandwidth)

    def active(self, codes: LevelCodes) -> Tensor:
        return codes.pre > self.threshold.detach()

    def threshold_parameters(self) -> list[nn.Parameter]:
        return [self.log_threshold]

    @torch.no_grad()
    def initialise_from_data(self, x: Tensor, target_l0: float) -> None:
        """b_dec at the data mean; thresholds so each feature starts firing ~2x target_l0/n."""
        self.b_dec.copy_(x.mean(0))
        pre = self.pre_activations(x)
        firing_rate = min(0.5, 2.0 * target_l0 / self.n_features)
        quantiles = torch.quantile(pre.float(), 1.0 - firing_rate, dim=0)
        self.log_threshold.copy_(quantiles.clamp(min=1e-3).log())

    def export_tensors(self) -> dict[str, Tensor]:
        return super().export_tensors() | {"threshold": self.threshold.detach()}
