"""The standard evaluation of a run's models: quality, hierarchy and spliced LM loss, as JSON.

The result has, for each model name (``"hsae"``, ``"baseline"``), ``"levels"`` (per level:
``l0``, ``variance_explained``, ``dead_fraction``, ``dense_fraction``, ``mse``, and when the
language model is available ``ce_loss_recovered`` and ``kl``) and ``"hierarchy"``
(``hamming_per_1k``, ``hamming_normalised``, ``p_parent_given_child``,
``p_child_given_parent``, and per level pair).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from hsae.evaluation.quality import evaluate
from hsae.evaluation.splice import SpliceResult, spliced_losses
from hsae.model import HSAE


def evaluate_models(
    models: dict[str, HSAE],
    heldout: Tensor,
    splice: tuple[Any, torch.nn.Module, Iterable[tuple[Tensor, Tensor, Tensor]]] | None = None,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Evaluate every model on the same held-out activations (and spliced contexts)."""
    results: dict[str, Any] = {"tokens": int(heldout.shape[0])}
    for name, model in models.items():
        results[name] = evaluate(model, heldout, batch_size=batch_size).to_dict()
    if splice is not None:
        language_model, block, batches = splice
        names = list(models)
        spliced = spliced_losses(language_model, block, [models[n] for n in names], batches)
        for name, outcome in zip(names, spliced, strict=True):
            _merge_splice(results[name], outcome)
        results["lm"] = {
            "ce_clean": spliced[0].ce_clean,
            "ce_zero": spliced[0].ce_zero,
            "tokens": spliced[0].tokens,
        }
    return results


def _merge_splice(model_results: dict[str, Any], outcome: SpliceResult) -> None:
    for level, entry in enumerate(model_results["levels"]):
        entry["ce_loss_recovered"] = outcome.ce_loss_recovered[level]
        entry["ce_spliced"] = outcome.ce_spliced[level]
        entry["kl"] = outcome.kl_spliced[level]


def comparison_table(results: dict[str, Any], names: list[str]) -> str:
    """A Markdown table of the metrics of ``names`` side by side."""
    header = "| metric | " + " | ".join(names) + " |"
    lines = [header, "|" + " --- |" * (len(names) + 1)]
    hierarchy_rows = [
        ("Hamming per 1k tokens (lower is better)", "hamming_per_1k"),
        ("Hamming / union (lower is better)", "hamming_normalised"),
        ("P(parent given child)", "p_parent_given_child"),
        ("P(child given parent)", "p_child_given_parent"),
    ]
    for label, key in hierarchy_rows:
        values = [_fmt(results[n]["hierarchy"][key]) for n in names]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    n_levels = len(results[names[0]]["levels"])
    level_rows = [
        ("L0", "l0"),
        ("variance explained", "variance_explained"),
        ("dead fraction", "dead_fraction"),
        ("CE loss recovered", "ce_loss_recovered"),
    ]
    for level in range(n_levels):
        for label, key in level_rows:
            if key not in results[names[0]]["levels"][level]:
                continue
            values = [_fmt(results[n]["levels"][level][key]) for n in names]
            lines.append(f"| level {level} {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
