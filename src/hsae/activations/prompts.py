"""Activations at chosen positions of short prompts: what the probing-style evaluations need.

Harvesting fills a cache with every token of a corpus; the evaluations (absorption, sparse
probing, taxonomy alignment) instead ask for the residual stream at one token of each of many
short prompts ("the last token of the word", "the token after the colon"). This module runs
those prompts in padded batches and returns one row per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from hsae.activations.models import HarvestError, LanguageModel, capture_residual


def encode_prompts(lm: LanguageModel, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (BOS is added when the prompts run)."""
    encoded = lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def activations_at(
    lm: LanguageModel,
    layer: int,
    prompts: Sequence[Sequence[int]],
    positions: Sequence[int],
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Residual stream after block ``layer`` at ``positions[i]`` of ``prompts[i]``: [n, d_model].

    ``prompts`` are token ids without BOS (it is prepended here when the model has one);
    ``positions`` index into those ids, negative values counting from the end. The result is
    float32 on the CPU, in the same raw units as a harvested activation cache.
    """
    if len(prompts) != len(positions):
        raise HarvestError(f"{len(prompts)} prompts but {len(positions)} positions")
    resolved = [
        _resolve(position, len(ids), i)
        for i, (ids, position) in enumerate(zip(prompts, positions, strict=True))
    ]
    rows = torch.empty((len(prompts), lm.d_model), dtype=torch.float32)
    bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=not progress)
    # Similar lengths share a batch, so little compute goes into padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        ids, mask, prefix = pad_prompts([prompts[i] for i in chosen], lm)
        with torch.no_grad():
            hidden = capture_residual(lm, ids, mask, layer)
        where = torch.tensor([resolved[i] + prefix for i in chosen], device=hidden.device)
        picked = hidden[torch.arange(len(chosen), device=hidden.device), where]
        rows[torch.tensor(chosen)] = picked.float().cpu()
        bar.update(len(chosen))
    bar.close()
    return rows


def _resolve(position: int, length: int, index: int) -> int:
    if length == 0:
        raise HarvestError(f"prompt {index} has no tokens")
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise HarvestError(f"position {position} is outside prompt {index} of {length} tokens")
    return resolved


def pad_prompts(
    group: Sequence[Sequence[int]], lm: LanguageModel
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded ids and attention mask for ``group`` with BOS first (when the model has
    one), and the number of prefix tokens (0 or 1)."""
    bos = lm.bos_token_id
    prefix = 1 if bos is not None else 0
    length = prefix + max(len(ids) for ids in group)
    ids = torch.full((len(group), length), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(group), length), dtype=torch.long)
    for row, tokens in enumerate(group):
        if bos is not None:
            ids[row, 0] = bos
        ids[row, prefix : prefix + len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[row, : prefix + len(tokens)] = 1
    return ids, mask, prefix
