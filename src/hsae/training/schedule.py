"""Learning-rate schedule: linear warm-up over the first part of the run, then cosine to zero."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    warmup_steps = int(warmup_fraction * total_steps)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
