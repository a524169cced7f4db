"""BatchTopK level: the k x batch largest activations of the whole batch (Bussmann et al. 2024).

Training: a = relu(pre) on the round(k * batch) largest entries of relu(pre) over the batch,
zero elsewhere (k = target_l0), so the mean L0 is k per token while single tokens use more or
fewer latents. Every training forward also moves a running inference threshold (a buffer,
saved with the model) towards the smallest activation it selected, with momentum
``THRESHOLD_MOMENTUM`` (SAELens's ``topk_threshold_lr`` = 0.01). Inference is JumpReLU with
that one threshold for every latent, which is also how SAELens saves a BatchTopK SAE: its
export is a SAELens "jumprelu" SAE (docs/interop.md). No sparsity penalty, no controller; the
gradient flows through the selected pre-activations only, as in :mod:`hsae.model.levels.topk`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsae.model import kernels
from hsae.model.level import BatchGroup, Level, LevelCodes, entries_of

THRESHOLD_MOMENTUM = 0.99
"""The inference threshold's running average keeps this share of its value per step."""


class BatchTopKLevel(Level):
    """A BatchTopK sparse autoencoder: k = target_l0 active latents per token on average."""

    kind = "batchtopk"
    uses_sparsity_controller = False
    saelens_architecture = "jumprelu"
    batch_dependent = True

    inference_threshold: Tensor

    def __init__(
        self,
        d_in: int,
        n_features: int,
        generator: torch.Generator | None = None,
        target_l0: float | None = None,
    ):
        super().__init__(d_in, n_features, generator, target_l0)
        if target_l0 is None:
            raise ValueError("a batchtopk level needs target_l0 (k = target_l0 per token)")
        self.k = min(float(n_features), float(target_l0))
        self.register_buffer("inference_threshold", torch.tensor(0.0))

    def select(self, pre: Tensor, group: BatchGroup | None = None) -> tuple[Tensor, Tensor]:
        """Mask of the round(k * batch) largest positive entries of ``pre`` over the whole
        batch, and the smallest selected value (inf when none is positive).

        With a ``group`` (data-parallel training: ``pre`` holds this process's share of the
        batch) the selection is over the global batch: the round(k * global batch) largest
        entries of all processes, found from each process's own top candidates."""
        if group is not None and group.size > 1:
            return self._select_global(pre, group)
        flat = pre.reshape(-1)
        n_selected = max(1, min(flat.numel(), round(self.k * pre.shape[0])))
        values, index = flat.topk(n_selected, sorted=False)
        positive = values > 0
        mask = torch.zeros_like(flat, dtype=torch.bool).index_put_((index,), positive)
        smallest = values.masked_fill(~positive, float("inf")).min()
        return mask.view_as(pre), smallest

    def _select_global(self, pre: Tensor, group: BatchGroup) -> tuple[Tensor, Tensor]:
        # The global top n lies among the union of each process's own top n: gather those,
        # take the n-th largest as the cut and keep every local entry at or above it (ties at
        # the cut, a measure-zero event for float pre-activations, all stay selected).
        flat = pre.reshape(-1)
        n_global = flat.numel() * group.size
        n_selected = max(1, min(n_global, round(self.k * pre.shape[0] * group.size)))
        local_top = flat.topk(min(n_selected, flat.numel()), sorted=False).values
        cut = group.gather(local_top).topk(n_selected, sorted=False).values.min()
        mask = (pre >= cut) & (pre > 0)
        smallest = group.min(pre.masked_fill(~mask, float("inf")).min().reshape(1))[0]
        return mask, smallest

    def encode(self, x: Tensor, bandwidth: float = 1e-3) -> Tensor:
        """JumpReLU with the learned inference threshold (>= 0) shared by every latent."""
        pre = self.pre_activations(x)
        return pre * (pre > self.inference_threshold)

    def encode_for_training(
        self, x: Tensor, bandwidth: float, fused: bool, group: BatchGroup | None = None
    ) -> LevelCodes:
        """The batch's top entries (over the global batch of ``group``); in training mode also
        updates the inference threshold."""
        if fused:
            pre = kernels.encoder_pre_activations(x, self.W_enc, self.b_enc, self.b_dec)
        else:
            pre_with_grad = self.pre_activations(x)
            pre = pre_with_grad.detach()
        selected, smallest = self.select(pre, group)
        if self.training:
            self._update_threshold(smallest)
        if fused:
            return self.selected_codes(x, pre, selected)
        acts = pre_with_grad * selected
        # The support only if something reads it: the dense path's loss does not (static
        # shapes, nothing read back to the host).
        return LevelCodes(acts=acts, pre=pre, support=lambda: entries_of(selected))

    @torch.no_grad()
    def _update_threshold(self, smallest: Tensor) -> None:
        moved = THRESHOLD_MOMENTUM * self.inference_threshold + (1 - THRESHOLD_MOMENTUM) * smallest
        # No positive entry selected (smallest = inf): keep the threshold (no host sync).
        self.inference_threshold.copy_(
            torch.where(torch.isfinite(smallest), moved, self.inference_threshold)
        )

    def active(self, codes: LevelCodes) -> Tensor:
        return codes.acts.detach() > 0

    @torch.no_grad()
    def initialise_from_data(self, x: Tensor, target_l0: float) -> None:
        """b_dec at the data mean; the inference threshold at the smallest activation the
        batch selection keeps on the sample ``x``."""
        super().initialise_from_data(x, target_l0)
        _, smallest = self.select(self.pre_activations(x))
        self.inference_threshold.copy_(torch.where(torch.isfinite(smallest), smallest, 0.0))

    def export_tensors(self) -> dict[str, Tensor]:
        threshold = self.inference_threshold.detach().expand(self.n_features).clone()
        return super().export_tensors() | {"threshold": threshold}
