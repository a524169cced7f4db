"""Adaptive sparsity weight per level (paper App. A.2), steering each level's L0 to a target.

L0 is tracked with an EMA (momentum m). The desired trajectory of that smoothed L0 is
dL0 = -eta (L0 - target) per step. When L0 falls faster than that trajectory the level is
being over-sparsified, so its weight lambda is lowered; when it stays denser, lambda is raised.

Our decision (``hsae-method.md`` section 4, docs/method.md): the paper's rule read literally
compares the EMA's one-step change with the trajectory. That change is
``(1 - m) (batch L0 - EMA)``, so the rule is "this batch's L0 against the trajectory point
EMA - (eta / (1 - m)) (EMA - target)" (at the defaults, 1 - m = eta, the target itself), and
lambda moved a full 3% up or down on every batch's noise. Here the batch L0 is replaced by a
short smoothing of it (an EMA of momentum :data:`SMOOTHING`, about ten batches) and lambda
moves in proportion to the remaining gap instead of by a fixed step:

    log lambda += clip( GAIN * log(smoothed L0 / trajectory point), -adjust, +adjust ).

Far from the target the step is the paper's full ``adjust``; near it the step shrinks with the
gap, so lambda settles instead of dithering. The long EMA is kept for the trajectory point and
the logs. (A controller acting on the long EMA alone lags it by 1 / (1 - m) steps and missed
the target by 2x in runs of a thousand steps; tests/test_fidelity.py measures both.)
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_RANGE = 1000.0
"""lambda stays within [initial / WEIGHT_RANGE, initial * WEIGHT_RANGE]."""
L0_FLOOR = 1e-3
"""A level whose smoothed L0 is 0 (all features silent) is treated as this L0 in the logs."""
SMOOTHING = 0.9
"""Momentum of the short average of batch L0s the controller acts on (about ten batches)."""
GAIN = 0.1
"""Change of log lambda per unit of log gap between the smoothed L0 and the trajectory."""


class AdaptiveSparsity:
    """Per-level sparsity weights lambda_l and the L0 EMAs that steer them (all on-device)."""

    def __init__(
        self,
        n_levels: int,
        target_l0: float,
        initial_weight: float,
        momentum: float,
        decay_rate: float,
        adjust: float,
        adaptive: bool = True,
        device: torch.device | str = "cpu",
    ):
        self.target_l0 = target_l0
        self.momentum = momentum
        self.decay_rate = decay_rate
        self.adjust = adjust
        self.adaptive = adaptive
        self.weights = torch.full((n_levels,), float(initial_weight), device=device)
        # Bounds keep a level whose L0 lags (e.g. thresholds still moving) from driving its
        # weight to absurd values that it would then take thousands of steps to unwind.
        self.min_weight = initial_weight * WEIGHT_RANGE**-1
        self.max_weight = initial_weight * WEIGHT_RANGE
        self.l0_ema = torch.zeros(n_levels, device=device)
        self.smoothed = torch.zeros(n_levels, device=device)
        self.started = False

    def update(self, batch_l0: Tensor) -> None:
        """Feed this step's per-level batch L0 and adjust the weights."""
        batch_l0 = batch_l0.detach().to(self.l0_ema.device, torch.float32)
        if not self.started:
            self.l0_ema.copy_(batch_l0)
            self.smoothed.copy_(batch_l0)
            self.started = True
            return
        point = self.trajectory_point()
        self.l0_ema.mul_(self.momentum).add_(batch_l0, alpha=1.0 - self.momentum)
        self.smoothed.mul_(SMOOTHING).add_(batch_l0, alpha=1.0 - SMOOTHING)
        if not self.adaptive:
            return
        self.weights.mul_(self.factor(self.smoothed, point)).clamp_(
            self.min_weight, self.max_weight
        )

    def trajectory_point(self) -> Tensor:
        """The L0 a batch would show if the EMA followed dL0 = -eta (L0 - target) this step."""
        ema = self.l0_ema
        return ema - (self.decay_rate / (1.0 - self.momentum)) * (ema - self.target_l0)

    def factor(self, smoothed: Tensor, point: Tensor) -> Tensor:
        """Multiplicative change of lambda: > 1 while L0 stays above the trajectory point."""
        gap = torch.log(smoothed.clamp(min=L0_FLOOR) / point.clamp(min=L0_FLOOR))
        return torch.exp((GAIN * gap).clamp(-self.adjust, self.adjust))

    def state_tensors(self) -> dict[str, Tensor]:
        return {
            "sparsity.weights": self.weights,
            "sparsity.l0_ema": self.l0_ema,
            "sparsity.smoothed": self.smoothed,
            "sparsity.started": torch.tensor(int(self.started)),
        }

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.weights.copy_(tensors["sparsity.weights"])
        self.l0_ema.copy_(tensors["sparsity.l0_ema"])
        # Checkpoints written before the short average existed resume from the long EMA.
        self.smoothed.copy_(tensors.get("sparsity.smoothed", tensors["sparsity.l0_ema"]))
        self.started = bool(int(tensors["sparsity.started"]))
