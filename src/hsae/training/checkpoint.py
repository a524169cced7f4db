"""Crash-safe training checkpoints: everything a killed run needs to continue bit-for-bit.

A checkpoint is a folder holding

* ``state.safetensors`` — model weights and forest, sparsity controllers, dead-feature counters,
  co-activation statistics and the perturbation generator's state;
* ``optimizer.safetensors`` — Adam's state tensors (its settings are in ``trainer.json``);
  nothing is pickled, so loading runs no code;
* ``trainer.json`` — step, forest updates, tokens drawn, scheduler position, data position, a
  fingerprint of the configuration, the optimizer's settings and the sha256 of both tensor
  files. It is written last.

Files are written to a temporary folder that is renamed into place last, so a crash leaves
either the previous checkpoint or the new one, never a mix. A file whose sha256 differs from
the record is refused (:class:`CheckpointError` naming it). Checkpoints of earlier versions
(no checksums, Adam's state in ``optimizer.pt``) still load: the checksum check is skipped and
``optimizer.pt`` is read with ``torch.load(weights_only=True)``, which unpickles tensors and
plain containers only.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hsae.errors import HSAEError
from hsae.io import sha256_file, write_json

STATE_FILE = "state.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.json"
CHECKPOINT_VERSION = 2
RECORD_KEYS = ("step", "forest_updates", "tokens_drawn", "scheduler")


class CheckpointError(HSAEError, RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to a different run."""


@dataclass
class TrainerState:
    """Everything a trainer needs to continue bit-for-bit (``Trainer.state_dict()``)."""

    tensors: dict[str, torch.Tensor]
    """Model weights and forest (``model.*``), controllers, counters, generator state."""
    optimizer: dict[str, Any]
    """The optimizer's ``state_dict()``."""
    record: dict[str, Any]
    """JSON-able: step, forest updates, tokens drawn, scheduler and data position, and the
    ``config`` fingerprint a checkpoint must agree on to be resumed."""
    optional: frozenset[str] = frozenset()
    """Tensors that checkpoints of earlier versions lack (the trainer then derives them)."""


def optimizer_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """An optimizer's state dict split into tensors (``state.<param>.<key>``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        scalars[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[str(index)][key] = value
    return tensors, {"param_groups": state["param_groups"], "state": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], record: Any) -> dict[str, Any]:
    """The inverse of :func:`optimizer_tensors`: a state dict for ``load_state_dict``."""
    state: dict[int, dict[str, Any]] = {
        int(index): dict(values) for index, values in record["state"].items()
    }
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in record["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_checkpoint(state: TrainerState, folder: str | Path) -> Path:
    """Write a trainer's state to ``folder`` atomically (replacing an older one)."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors.items()}
    save_file(tensors, str(staging / STATE_FILE))
    adam_tensors, adam_record = optimizer_tensors(state.optimizer)
    save_file(adam_tensors, str(staging / OPTIMIZER_FILE))
    record = (
        {"version": CHECKPOINT_VERSION}
        | state.record
        | {
            "optimizer": adam_record,
            "sha256": {name: sha256_file(staging / name) for name in (STATE_FILE, OPTIMIZER_FILE)},
        }
    )
    write_json(staging / TRAINER_FILE, record)
    previous = target.with_name(f".{target.name}.old")
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def restore_interrupted_swap(target: Path) -> None:
    """If a crash hit between the two renames of :func:`save_checkpoint`, undo it."""
    previous = target.with_name(f".{target.name}.old")
    if not target.exists() and previous.exists():
        os.replace(previous, target)


def read_trainer_record(folder: str | Path) -> dict[str, Any]:
    target = Path(folder)
    restore_interrupted_swap(target)
    path = target / TRAINER_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {target} (missing {TRAINER_FILE})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"checkpoint record {path} is corrupt: {error}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint record {path} is corrupt: not a JSON object")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise CheckpointError(f"checkpoint record {path} is incomplete: no {', '.join(missing)}")
    version = record.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint record {path}: version {version!r} is not one this hsae reads "
            f"(<= {CHECKPOINT_VERSION})"
        )
    return record


def verify_checkpoint(folder: str | Path, record: dict[str, Any]) -> None:
    """Check the tensor files against the sha256 the record holds (version 2 on)."""
    target = Path(folder)
    checksums = record.get("sha256")
    if checksums is None:
        return  # written before checksums were recorded
    if not isinstance(checksums, dict):
        raise CheckpointError(f"checkpoint record {target / TRAINER_FILE}: bad 'sha256' entry")
    for name in (STATE_FILE, OPTIMIZER_FILE):
        path = target / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {target} is incomplete: {name} is missing")
        if sha256_file(path) != checksums.get(name):
            raise CheckpointError(
                f"checkpoint file {path} is corrupt (sha256 differs from {TRAINER_FILE}); "
                "delete the checkpoint folder to restart training from scratch"
            )


def load_checkpoint(folder: str | Path, like: TrainerState) -> TrainerState:
    """The state saved in ``folder``, checked against ``like`` (the state of the trainer that
    will resume): refuse a checkpoint of a differently configured run, a corrupt or missing
    file, or one lacking a tensor ``like`` has."""
    target = Path(folder)
    record = read_trainer_record(target)
    mismatched = _differences(record.get("config", {}), like.record.get("config", {}))
    if mismatched:
        raise CheckpointError(
            f"checkpoint {target} was written by a run with different settings ({mismatched}); "
            "start a new run folder or use the original settings"
        )
    verify_checkpoint(target, record)
    tensors = _load_tensors(target / STATE_FILE)
    missing = sorted(set(like.tensors) - set(tensors) - like.optional)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint file {target / STATE_FILE} lacks tensors: {shown}")
    return TrainerState(tensors, _load_optimizer(target, record), record)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint file {path} is unreadable or corrupt: {error}") from None


def _load_optimizer(target: Path, record: dict[str, Any]) -> dict[str, Any]:
    if "optimizer" in record:
        tensors = _load_tensors(target / OPTIMIZER_FILE)
        try:
            return optimizer_state(tensors, record["optimizer"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(
                f"checkpoint record {target / TRAINER_FILE}: bad optimizer entry ({error})"
            ) from None
    legacy = target / LEGACY_OPTIMIZER_FILE
    if not legacy.is_file():
        raise CheckpointError(f"checkpoint {target} is incomplete: no optimizer state")
    try:  # version 1: tensors and plain containers only, no code runs
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        message = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"checkpoint file {legacy} is unreadable or unsafe: {message}"
        ) from None
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise CheckpointError(f"checkpoint file {legacy} does not hold an optimizer state")
    return state


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    # A setting the checkpoint does not record was added by a later version: not a difference.
    keys = sorted(k for k in saved if saved[k] != current.get(k))
    return ", ".join(f"{k}: {saved.get(k)!r} vs {current.get(k)!r}" for k in keys)
