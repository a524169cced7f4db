"""Adaptive sparsity weight per level (paper App. A.2), steering each level's L0 to a target.

L0 is tracked with an EMA. The desired trajectory of that smoothed L0 is
dL0 = -eta (L0 - target) per step. When the EMA falls faster than that trajectory the level is
being over-sparsified, so its weight lambda is lowered; when it stays denser, lambda is raised.

Our decision (``hsae-method.md`` section 4, docs/method.md): the paper's rule read literally
compares the EMA's one-step change with the trajectory, and the EMA's one-step change is
``(1 - m) (batch L0 - EMA)``, so at the defaults (1 - m = eta) it reduces to "this batch's L0
vs the target" and lambda moves +-3% on every batch's noise. Here the controller acts on the
smoothed L0 only: in log space, lambda moves by the gap between the EMA's actual change and
the trajectory's,

    log lambda += clip( log(EMA_t / EMA_{t-1}) + eta log(EMA_t / target), -adjust, +adjust ),

which is zero while the EMA follows the trajectory. Summed over steps, the first term
telescopes (lambda follows the EMA's level, not its step-to-step noise) and the second
integrates the smoothed error, so L0 settles at the target; ``adjust`` caps a single step so a
level far from its target still moves fast.
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_RANGE = 1000.0
"""lambda stays within [initial / WEIGHT_RANGE, initial * WEIGHT_RANGE]."""
L0_FLOOR = 1e-3
"""A level whose smoothed L0 is 0 (all features silent) is treated as this L0 in the logs."""


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
        self.started = False

    def update(self, batch_l0: Tensor) -> None:
        """Feed this step's per-level batch L0 and adjust the weights."""
        batch_l0 = batch_l0.detach().to(self.l0_ema.device, torch.float32)
        if not self.started:
            self.l0_ema.copy_(batch_l0)
            self.started = True
            return
        previous = self.l0_ema.clone()
        self.l0_ema.mul_(self.momentum).add_(batch_l0, alpha=1.0 - self.momentum)
        if not self.adaptive:
            return
        self.weights.mul_(self.factor(previous, self.l0_ema)).clamp_(
            self.min_weight, self.max_weight
        )

    def factor(self, previous_ema: Tensor, ema: Tensor) -> Tensor:
        """Multiplicative change of lambda for one step of the smoothed L0 (see module doc)."""
        now = ema.clamp(min=L0_FLOOR)
        gap = torch.log(now / previous_ema.clamp(min=L0_FLOOR)) + self.decay_rate * torch.log(
            now / self.target_l0
        )
        return torch.exp(gap.clamp(-self.adjust, self.adjust))

    def state_tensors(self) -> dict[str, Tensor]:
        return {
            "sparsity.weights": self.weights,
            "sparsity.l0_ema": self.l0_ema,
            "sparsity.started": torch.tensor(int(self.started)),
        }

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.weights.copy_(tensors["sparsity.weights"])
        self.l0_ema.copy_(tensors["sparsity.l0_ema"])
        self.started = bool(int(tensors["sparsity.started"]))
