"""Language-model loss with a level's reconstruction spliced into the residual stream.

For each level: CE loss recovered = (CE_zero - CE_recon) / (CE_zero - CE_clean), where CE_zero
replaces the residual stream after block ``layer`` by zeros, and the KL divergence of the
spliced model's next-token distribution from the clean one. BOS and padding positions keep
their clean activations (they were never part of the training data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.model import HSAE
from hsae.model.navigation import NavigationError

Replacement = Callable[[Tensor], Tensor]


@dataclass
class SpliceResult:
    ce_clean: float
    ce_zero: float
    ce_spliced: list[float]
    kl_spliced: list[float]
    ce_loss_recovered: list[float]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Keep = Tensor | Callable[[Tensor], Tensor] | None
"""Where a replacement applies: a [batch, seq] boolean mask, a function of the block's output
giving that mask for each forward pass, or None (every position)."""


@contextmanager
def replaced_output(block: torch.nn.Module, keep: Keep, replace: Replacement) -> Iterator[None]:
    """Within the context, the block's output ``h`` becomes ``replace(h)`` where ``keep``."""

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        packed = isinstance(output, (tuple, list))  # (hidden, ...) or, e.g. OpenAI GPT, a list
        hidden = output[0] if packed else output
        where = keep(hidden) if callable(keep) else keep
        new = replace(hidden).to(hidden.dtype)
        if where is not None:
            new = torch.where(where.to(hidden.device).unsqueeze(-1), new, hidden)
        if not packed:
            return new
        return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def spliced(block: torch.nn.Module, model: HSAE, level: int, keep: Keep = None) -> Iterator[None]:
    """Within the context, the output of ``block`` (the hooked transformer block) is replaced by
    ``model``'s level-``level`` reconstruction where ``keep`` (see :data:`Keep`).

    For a loaded language model with BOS and padding kept clean automatically, use
    :func:`hsae.steering.spliced`.
    """
    if not 0 <= level < model.n_levels:
        raise NavigationError(f"level must lie in [0, {model.n_levels - 1}], got {level}")
    with replaced_output(block, keep, reconstruction(model, level)):
        yield


def _next_token_log_probs(model: Any, ids: Tensor, mask: Tensor) -> Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def _cross_entropy(log_probs: Tensor, ids: Tensor, target_mask: Tensor) -> tuple[float, int]:
    picked = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float(-(picked * target_mask).sum()), int(target_mask.sum())


def _kl(clean: Tensor, spliced: Tensor, target_mask: Tensor) -> float:
    per_position = (clean.exp() * (clean - spliced)).sum(-1)
    return float((per_position * target_mask).sum())


@torch.no_grad()
def spliced_losses(
    language_model: Any,
    block: torch.nn.Module,
    models: list[HSAE],
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
) -> list[SpliceResult]:
    """CE/KL for every level of every model in ``models`` on ``batches``.

    Each batch is (input_ids, attention_mask, splice_mask): the splice mask marks the positions
    whose residual is replaced (real tokens, not BOS or padding).
    """
    sums: dict[str, float] = {"clean": 0.0, "zero": 0.0}
    spliced_ce = [[0.0] * m.n_levels for m in models]
    kls = [[0.0] * m.n_levels for m in models]
    tokens = 0
    for ids, mask, keep in batches:
        target_mask = mask[:, 1:].float()
        clean = _next_token_log_probs(language_model, ids, mask)
        ce, count = _cross_entropy(clean, ids, target_mask)
        sums["clean"] += ce
        tokens += count
        with replaced_output(block, keep, torch.zeros_like):
            zero = _next_token_log_probs(language_model, ids, mask)
        sums["zero"] += _cross_entropy(zero, ids, target_mask)[0]
        for index, model in enumerate(models):
            for level in range(model.n_levels):
                with spliced(block, model, level, keep):
                    log_probs = _next_token_log_probs(language_model, ids, mask)
                spliced_ce[index][level] += _cross_entropy(log_probs, ids, target_mask)[0]
                kls[index][level] += _kl(clean, log_probs, target_mask)
    if tokens == 0:
        raise ValueError("no tokens to evaluate the spliced language-model loss on")
    ce_clean, ce_zero = sums["clean"] / tokens, sums["zero"] / tokens
    results = []
    for index in range(len(models)):
        ce_levels = [value / tokens for value in spliced_ce[index]]
        results.append(
            SpliceResult(
                ce_clean=ce_clean,
                ce_zero=ce_zero,
                ce_spliced=ce_levels,
                kl_spliced=[value / tokens for value in kls[index]],
                ce_loss_recovered=[
                    (ce_zero - ce) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")
                    for ce in ce_levels
                ],
                tokens=tokens,
            )
        )
    return results


def reconstruction(model: HSAE, level: int) -> Replacement:
    """``h -> model.decode(model.encode_level(h, level), level)`` for [..., d] residuals."""

    def replace(hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        codes = model.encode_level(flat, level)
        return model.decode(codes, level).to(hidden.device).reshape(hidden.shape)

    return replace
