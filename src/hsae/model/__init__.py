"""The model: JumpReLU levels, the forest between them, and the HSAE that holds both."""

from hsae.model.hsae import HSAE, TrainingLoss, load_hsae
from hsae.model.level import JumpReLULevel

__all__ = ["HSAE", "JumpReLULevel", "TrainingLoss", "load_hsae"]
