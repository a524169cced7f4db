"""Training: the alternating loop, the sparsity controller, the schedule and the data seam."""

from hsae.training.trainer import NonFiniteLossError, StepLog, Trainer, train

__all__ = ["NonFiniteLossError", "StepLog", "Trainer", "train"]
