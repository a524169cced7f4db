"""``hsae plan``: what a run at a given size costs, before any GPU-day is spent.

For a model width, level sizes, token budget, batch and world size this computes

* the activation cache's size on disk (rows x width x bytes per value) against the free disk;
* the memory one training process holds: parameters, gradients, Adam's two moments, and the
  activations of one batch (the [batch, features] tensors the step keeps for its backward);
* the FLOPs per training token (encoder forward and weight gradient dense, decoder and
  constraint over the active entries);
* the wall time: one training step at full size is *measured* on this machine's device and
  multiplied by the number of steps a process takes; for a named accelerator a FLOP-bound
  estimate is given as well, which is a lower bound (it ignores memory traffic, elementwise
  work and data loading).
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hsae.config import HSAEConfig
from hsae.errors import HSAEError

BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2}

ACCELERATORS = {
    # name: (dense TF32 / fp32-with-tensor-cores peak in FLOP/s, description)
    "h100": (494.7e12, "NVIDIA H100 SXM, TF32 dense peak"),
    "h200": (494.7e12, "NVIDIA H200, TF32 dense peak"),
    "a100": (156e12, "NVIDIA A100, TF32 dense peak"),
    "a800": (156e12, "NVIDIA A800 (A100 compute), TF32 dense peak"),
}
FLOP_EFFICIENCY = 0.4
"""Share of the accelerator's peak the FLOP-bound estimate assumes the step reaches."""
BATCH_FEATURE_TENSORS = 4
"""[batch, features] float tensors one level keeps for the backward (pre-activations,
activations, the active mask and the estimator's band), counted in the memory estimate."""


class PlanError(HSAEError, ValueError):
    """The plan's inputs are out of range; the message names the setting."""


@dataclass(frozen=True)
class PlanInputs:
    """The size of a run to plan."""

    d_model: int
    level_sizes: list[int]
    train_tokens: int = 100_000_000
    harvest_tokens: int | None = None
    """Activations to harvest (None: as many as the training tokens, one pass)."""
    batch_size: int = 1024
    target_l0: float = 50.0
    world_size: int = 1
    cache_dtype: str = "bfloat16"
    cache_dir: str = "."
    """Where the cache would go (its free disk is compared with the cache's size)."""

    def __post_init__(self) -> None:
        if self.cache_dtype not in BYTES_PER_VALUE:
            raise PlanError(
                f"cache_dtype must be one of {sorted(BYTES_PER_VALUE)}, got {self.cache_dtype!r}"
            )
        if self.world_size < 1:
            raise PlanError(f"world_size must be >= 1, got {self.world_size}")
        if self.batch_size % self.world_size:
            raise PlanError(
                f"batch_size {self.batch_size} must be divisible by world_size {self.world_size} "
                "(each process takes batch_size / world_size rows a step)"
            )
        if self.harvest_tokens is not None and self.harvest_tokens < 1:
            raise PlanError(f"harvest_tokens must be >= 1, got {self.harvest_tokens}")
        # The sizes, L0 and token budget are checked by the model's own configuration.
        self.config()

    def config(self) -> HSAEConfig:
        try:
            return HSAEConfig(
                d_in=self.d_model,
                level_sizes=self.level_sizes,
                train_tokens=self.train_tokens,
                batch_size=self.batch_size,
                target_l0=self.target_l0,
            )
        except HSAEError as error:
            raise PlanError(str(error)) from None


@dataclass
class Plan:
    """What :func:`make_plan` found; every size in bytes, times in seconds."""

    inputs: dict[str, Any]
    cache_bytes: int
    free_disk_bytes: int | None
    parameters: int
    memory: dict[str, int]
    flops_per_token: float
    steps_per_process: int
    device: str
    measured_step_seconds: float | None
    estimated_seconds: float | None
    accelerator_estimates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def cache_fits(self) -> bool | None:
        return None if self.free_disk_bytes is None else self.cache_bytes <= self.free_disk_bytes


def parameter_count(d_model: int, level_sizes: list[int]) -> int:
    """W_enc, W_dec, b_enc, log-threshold and b_dec of every level."""
    return sum(2 * d_model * n + 2 * n + d_model for n in level_sizes)


def flops_per_token(d_model: int, level_sizes: list[int], target_l0: float) -> float:
    """Training FLOPs per token: the encoder's forward and weight gradient are dense (2 d n
    each); decoding, its backward and the constraint run over about ``target_l0`` active
    entries per level (2 d L0 forward, 4 d L0 backward, and as much again for the constraint)."""
    dense = 4.0 * d_model * sum(level_sizes)
    sparse = len(level_sizes) * 12.0 * d_model * target_l0
    return dense + sparse


def memory_per_process(inputs: PlanInputs) -> dict[str, int]:
    """Bytes one training process holds (float32 model, gradients and Adam moments)."""
    params = parameter_count(inputs.d_model, inputs.level_sizes)
    rows = inputs.batch_size // inputs.world_size
    features = sum(inputs.level_sizes)
    memory = {
        "parameters": 4 * params,
        "gradients": 4 * params,
        "adam_moments": 8 * params,
        "batch_activations": 4 * rows * (BATCH_FEATURE_TENSORS * features + 2 * inputs.d_model),
    }
    memory["total"] = sum(memory.values())
    return memory


def measure_step(
    inputs: PlanInputs, device: torch.device, repeats: int = 2, seed: int = 0
) -> float:
    """Seconds of one full-size training step on ``device`` (the fastest of ``repeats`` after
    one warm-up step), on gaussian activations: the step's cost does not depend on the data
    beyond its sparsity, which the initialisation puts near the target."""
    from hsae.training import Trainer

    rows = inputs.batch_size // inputs.world_size
    config = HSAEConfig(
        **inputs.config().model_dump()
        | {"batch_size": rows, "train_tokens": 1000 * rows, "device": str(device)}
    )
    generator = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield torch.randn(config.batch_size, config.d_in, generator=generator)

    trainer = Trainer(config, batches())
    trainer.initialise()
    trainer.update_forest()  # a forest, so the constraint and the perturbation are timed too
    trainer.train_step()  # warm-up: allocations, kernel selection
    best = math.inf
    for _ in range(repeats):
        _synchronise(device)
        started = time.perf_counter()
        trainer.train_step()
        _synchronise(device)
        best = min(best, time.perf_counter() - started)
    return best


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_plan(
    inputs: PlanInputs, device: str = "auto", measure: bool = True, repeats: int = 2
) -> Plan:
    """The plan for ``inputs``; ``measure=False`` skips the timed step (no wall-time estimate
    for this device)."""
    from hsae.training.trainer import resolve_device

    rows = inputs.harvest_tokens if inputs.harvest_tokens is not None else inputs.train_tokens
    cache_bytes = rows * inputs.d_model * BYTES_PER_VALUE[inputs.cache_dtype]
    free = _free_disk(Path(inputs.cache_dir))
    steps = max(1, inputs.train_tokens // inputs.batch_size)
    flops = flops_per_token(inputs.d_model, inputs.level_sizes, inputs.target_l0)
    resolved = resolve_device(device)
    step_seconds = measure_step(inputs, resolved, repeats) if measure else None
    per_process_tokens = inputs.train_tokens / inputs.world_size
    return Plan(
        inputs=asdict(inputs),
        cache_bytes=cache_bytes,
        free_disk_bytes=free,
        parameters=parameter_count(inputs.d_model, inputs.level_sizes),
        memory=memory_per_process(inputs),
        flops_per_token=flops,
        steps_per_process=steps,
        device=_describe(resolved),
        measured_step_seconds=step_seconds,
        estimated_seconds=None if step_seconds is None else step_seconds * steps,
        accelerator_estimates={
            name: flops * per_process_tokens / (peak * FLOP_EFFICIENCY)
            for name, (peak, _) in ACCELERATORS.items()
        },
    )


def _free_disk(path: Path) -> int | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def format_plan(plan: Plan) -> str:
    """The plan as the lines ``hsae plan`` prints."""
    inputs = plan.inputs
    sizes = "/".join(str(n) for n in inputs["level_sizes"])
    rows = inputs["harvest_tokens"] or inputs["train_tokens"]
    lines = [
        f"HSAE d={inputs['d_model']}, levels {sizes}, {inputs['train_tokens']:,} training "
        f"tokens, batch {inputs['batch_size']} over {inputs['world_size']} process(es)",
        f"activation cache: {rows:,} rows x {inputs['d_model']} x {inputs['cache_dtype']} = "
        f"{_bytes(plan.cache_bytes)}"
        + (
            ""
            if plan.free_disk_bytes is None
            else f" (free at {inputs['cache_dir']}: {_bytes(plan.free_disk_bytes)}"
            + ("" if plan.cache_fits else "; DOES NOT FIT")
            + ")"
        ),
        f"parameters: {plan.parameters:,}",
        "memory per training process: "
        + ", ".join(f"{key.replace('_', ' ')} {_bytes(n)}" for key, n in plan.memory.items()),
        f"FLOPs per training token: {plan.flops_per_token / 1e6:.1f} M "
        f"({plan.flops_per_token * inputs['train_tokens'] / 1e15:.2f} PFLOP in all)",
    ]
    if plan.measured_step_seconds is not None and plan.estimated_seconds is not None:
        lines.append(
            f"measured on {plan.device}: {plan.measured_step_seconds:.3f} s per step of "
            f"{inputs['batch_size'] // inputs['world_size']} rows -> "
            f"{plan.steps_per_process:,} steps take {_duration(plan.estimated_seconds)}"
        )
    for name, seconds in plan.accelerator_estimates.items():
        lines.append(
            f"FLOP bound on one {ACCELERATORS[name][1]} per process at "
            f"{FLOP_EFFICIENCY:.0%}: {_duration(seconds)} (a lower bound: memory traffic, "
            "elementwise work and data loading are not counted)"
        )
    return "\n".join(lines)


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
