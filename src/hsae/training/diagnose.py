"""What went non-finite when a training loss turns NaN or inf (run only after it happened)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from hsae.model import TrainingLoss


def non_finite_report(
    step: int,
    batch: Tensor,
    out: TrainingLoss,
    model: nn.Module,
    checkpoint: tuple[Path, int] | None = None,
) -> str:
    """One line: the step, then the first culprit found among the input batch, the loss terms
    (per level), the parameters and the gradients of the previous update, then what to do.

    ``checkpoint`` is (folder, step) of the last checkpoint written, if the caller keeps one.
    """
    found = _culprits(batch, out, model)
    what = "; ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
    loss = float(out.total)
    if _finite(loss):  # a parameter went bad where the support-only step does not read it
        message = f"training went non-finite at step {step} (loss {loss:g}): {what}."
    else:
        message = f"loss became {loss} at step {step}: {what or 'cause not found'}."
    if found and found[0].startswith("input batch"):
        message += " Check the activations for inf/NaN (a corrupt cache or an overflowing model)."
    else:
        message += " Lower lr (or rho / aux_coefficient if their term went bad first)."
    if checkpoint is not None:
        folder, saved = checkpoint
        message += f" The checkpoint of step {saved} in {folder} is kept."
    return message


def _culprits(batch: Tensor, out: TrainingLoss, model: nn.Module) -> list[str]:
    found = []
    bad_rows = (~torch.isfinite(batch)).any(dim=-1)
    if bool(bad_rows.any()):
        found.append(f"input batch has {int(bad_rows.sum())} of {batch.shape[0]} rows with inf/NaN")
    for name, values in (("mse", out.mse), ("l0", out.l0)):
        for level, value in enumerate(values.tolist()):
            if not _finite(value):
                found.append(f"level {level} {name} = {value}")
    for name, value in (("constraint", out.constraint), ("aux", out.aux)):
        if not _finite(float(value)):
            found.append(f"{name} term = {float(value)}")
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            found.append(f"parameter {name} holds inf/NaN")
        elif parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all()):
            found.append(f"gradient of {name} (previous step) holds inf/NaN")
    return found


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))
