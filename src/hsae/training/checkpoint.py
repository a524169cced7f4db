"""Crash-safe training checkpoints: everything a killed run needs to continue bit-for-bit.

A checkpoint is a folder holding

* ``state.safetensors`` — model weights and forest, sparsity controllers, dead-feature counters,
  co-activation statistics and the perturbation generator's state;
* ``optimizer.pt`` — Adam's state, a plain tensor dictionary read back with
  ``torch.load(weights_only=True)`` (no pickled code can run on load);
* ``trainer.json`` — step, forest updates, tokens drawn, scheduler position, data position and
  a fingerprint of the configuration.

Files are written to a temporary folder that is renamed into place last, so a crash leaves
either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hsae.errors import HSAEError
from hsae.io import write_json

if TYPE_CHECKING:
    from hsae.training.trainer import Trainer

STATE_FILE = "state.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.json"
CHECKPOINT_VERSION = 1


class CheckpointError(HSAEError, RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


def config_fingerprint(trainer: Trainer) -> dict[str, Any]:
    """The settings a checkpoint must agree on to be resumed (not device or logging)."""
    values = trainer.config.model_dump()
    values.pop("device", None)
    return values


def _state_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    tensors |= trainer.sparsity.state_tensors()
    for level, counter in enumerate(trainer.tokens_since_fired):
        tensors[f"tokens_since_fired.{level}"] = counter
    if trainer.coactivation is not None:
        tensors |= trainer.coactivation.state_tensors()
    tensors["generator"] = trainer.generator.get_state()
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _trainer_record(trainer: Trainer) -> dict[str, Any]:
    data_state = trainer.batches.state_dict() if hasattr(trainer.batches, "state_dict") else None
    return {
        "version": CHECKPOINT_VERSION,
        "step": trainer.step,
        "forest_updates": trainer.forest_updates,
        "tokens_drawn": trainer.tokens_drawn,
        "scheduler": trainer.scheduler.state_dict(),
        "data": data_state,
        "config": config_fingerprint(trainer),
    }


def save_checkpoint(trainer: Trainer, folder: str | Path) -> Path:
    """Write ``trainer``'s full state to ``folder`` atomically (replacing an older one)."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file(_state_tensors(trainer), str(staging / STATE_FILE))
    torch.save(trainer.optimizer.state_dict(), staging / OPTIMIZER_FILE)
    write_json(staging / TRAINER_FILE, _trainer_record(trainer))
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def _restore_interrupted_swap(target: Path) -> None:
    """If a crash hit between the two renames of :func:`save_checkpoint`, undo it."""
    previous = target.with_name(f".{target.name}.old")
    if not target.exists() and previous.exists():
        os.replace(previous, target)


def read_trainer_record(folder: str | Path) -> dict[str, Any]:
    target = Path(folder)
    _restore_interrupted_swap(target)
    path = target / TRAINER_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {target} (missing {TRAINER_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint record {path} is corrupt: {error}") from None


def load_checkpoint(trainer: Trainer, folder: str | Path) -> None:
    """Restore ``trainer`` from ``folder``; refuse checkpoints of a differently configured run."""
    target = Path(folder)
    record = read_trainer_record(target)
    mismatched = _differences(record.get("config", {}), config_fingerprint(trainer))
    if mismatched:
        raise CheckpointError(
            f"checkpoint {target} was written by a run with different settings ({mismatched}); "
            "start a new run folder or use the original settings"
        )
    try:
        tensors = load_file(str(target / STATE_FILE))
        optimizer_state = torch.load(target / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"checkpoint {target} is unreadable or corrupt: {error}") from None
    model_state = {
        k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")
    }
    trainer.model.load_state_dict(model_state)
    trainer.sparsity.load_state_tensors(tensors)
    trainer.sparsity.started = bool(int(tensors["sparsity.started"]))
    for level, counter in enumerate(trainer.tokens_since_fired):
        counter.copy_(tensors[f"tokens_since_fired.{level}"])
    if trainer.coactivation is not None:
        trainer.coactivation.load_state_tensors(tensors)
    trainer.generator.set_state(tensors["generator"])
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.scheduler.load_state_dict(record["scheduler"])
    if record.get("data") is not None and hasattr(trainer.batches, "load_state_dict"):
        trainer.batches.load_state_dict(record["data"])
    trainer.step = int(record["step"])
    trainer.forest_updates = int(record["forest_updates"])
    trainer.tokens_drawn = int(record["tokens_drawn"])
    trainer.initialised = True


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in keys)
