"""The level kinds, registered by name (``HSAEConfig.level``).

Adding a kind is one new file here with a :class:`hsae.model.level.Level` subclass and one
line in ``LEVEL_KINDS`` (docs/extending.md).
"""

from __future__ import annotations

from hsae.model.level import Level
from hsae.model.levels.batchtopk import BatchTopKLevel
from hsae.model.levels.jumprelu import JumpReLULevel
from hsae.model.levels.topk import TopKLevel

LEVEL_KINDS: dict[str, type[Level]] = {
    JumpReLULevel.kind: JumpReLULevel,
    TopKLevel.kind: TopKLevel,
    BatchTopKLevel.kind: BatchTopKLevel,
}
"""Level kind name -> class; ``HSAE`` builds every level through this table."""

__all__ = ["LEVEL_KINDS", "BatchTopKLevel", "JumpReLULevel", "Level", "TopKLevel"]
