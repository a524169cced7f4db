"""Activations at chosen prompt positions equal the harvest's capture of the same tokens."""

from __future__ import annotations

import pytest
import torch

from hsae.activations import capture_residual, load_language_model
from hsae.activations.models import HarvestError
from hsae.activations.prompts import activations_at, encode_prompts, pad_prompts


@pytest.fixture(scope="module")
def lm():
    return load_language_model(device="cpu", dtype="float32")


def test_rows_match_single_prompt_capture(lm):
    texts = ["dog: a domesticated animal", "a", "mitosis: cell division in which the nucleus"]
    prompts = encode_prompts(lm, texts)
    positions = [1, -1, len(prompts[2]) - 3]
    rows = activations_at(lm, 6, prompts, positions, batch_size=2)
    for i, ids in enumerate(prompts):
        padded, mask, prefix = pad_prompts([ids], lm)
        alone = capture_residual(lm, padded, mask, 6)[0]
        where = (positions[i] % len(ids)) + prefix
        torch.testing.assert_close(rows[i], alone[where].float(), rtol=1e-4, atol=1e-3)


def test_position_outside_prompt_is_refused(lm):
    with pytest.raises(HarvestError, match="outside prompt 0"):
        activations_at(lm, 0, [[5, 6]], [2])
