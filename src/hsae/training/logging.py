"""Where training logs go: always a JSON-lines file, optionally TensorBoard and Weights & Biases.

The optional sinks are used only when asked for; asking for one whose package is missing is
refused up front with the command that installs it, rather than failing mid-run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsae.errors import HSAEError
from hsae.training.trainer import StepLog

LogSink = Callable[[StepLog], None]


class LoggingSetupError(HSAEError, RuntimeError):
    """An optional logging backend was requested but cannot be used."""


def missing_backends(tensorboard: bool, wandb: bool) -> list[str]:
    """Install hints for requested optional backends whose packages are absent."""
    import importlib.util

    missing = []
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        missing.append("tensorboard (pip install tensorboard)")
    if wandb and importlib.util.find_spec("wandb") is None:
        missing.append("wandb (pip install wandb)")
    return missing


def jsonl_sink(path: Path) -> LogSink:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(log: StepLog) -> None:
        # One whole line per write; a line torn by a crash is dropped when the run resumes.
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(log.as_dict()) + "\n")

    return write


def _scalars(log: StepLog) -> dict[str, float]:
    values: dict[str, float] = {
        "loss": log.loss,
        "lr": log.lr,
        "constraint": log.constraint,
        "aux": log.aux,
    }
    for name in ("mse", "l0", "variance_explained", "sparsity_weight", "dead_fraction"):
        for level, value in enumerate(getattr(log, name)):
            values[f"{name}/level_{level}"] = value
    return values


def tensorboard_sink(folder: Path, tag: str) -> LogSink:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LoggingSetupError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        ) from None
    writer = SummaryWriter(log_dir=str(folder / tag))

    def write(log: StepLog) -> None:
        for name, value in _scalars(log).items():
            writer.add_scalar(name, value, log.step)
        writer.flush()

    return write


def wandb_sink(project: str, tag: str, config: dict[str, Any]) -> LogSink:
    try:
        import wandb
    except ImportError:
        raise LoggingSetupError(
            "Weights & Biases logging needs the wandb package: pip install wandb"
        ) from None
    run = wandb.init(project=project, name=tag, config=config, reinit=True)

    def write(log: StepLog) -> None:
        run.log(_scalars(log), step=log.step)

    return write


def combine(sinks: list[LogSink]) -> LogSink:
    def write(log: StepLog) -> None:
        for sink in sinks:
            sink(log)

    return write
