"""The model: levels of a registered kind, the forest between them, and the HSAE holding both;
the Matryoshka baseline presents its nested prefixes as levels."""

from hsae.model.hsae import HSAE, TrainingLoss, load_hsae
from hsae.model.level import Level
from hsae.model.levels import LEVEL_KINDS, BatchTopKLevel, JumpReLULevel, TopKLevel
from hsae.model.matryoshka import MatryoshkaSAE

__all__ = [
    "HSAE",
    "LEVEL_KINDS",
    "BatchTopKLevel",
    "JumpReLULevel",
    "Level",
    "MatryoshkaSAE",
    "TopKLevel",
    "TrainingLoss",
    "load_hsae",
]
