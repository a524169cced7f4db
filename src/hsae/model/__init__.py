"""The model: levels of a registered kind, the forest between them, and the HSAE holding both."""

from hsae.model.hsae import HSAE, TrainingLoss, load_hsae
from hsae.model.level import Level
from hsae.model.levels import LEVEL_KINDS, BatchTopKLevel, JumpReLULevel, TopKLevel

__all__ = [
    "HSAE",
    "LEVEL_KINDS",
    "BatchTopKLevel",
    "JumpReLULevel",
    "Level",
    "TopKLevel",
    "TrainingLoss",
    "load_hsae",
]
