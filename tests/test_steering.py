"""Steering (hsae.steering) on the small run's HSAE and the embedded Gemma 3 270M."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from hsae.activations import load_language_model
from hsae.activations.models import LanguageModel, decoder_layers
from hsae.cli import app
from hsae.errors import HSAEError
from hsae.evaluation.splice import spliced_losses
from hsae.model import HSAE
from hsae.runs import Run, heldout_context_batches
from hsae.steering import (
    SteeringError,
    add,
    clamp,
    greedy_continuation,
    logit_effect,
    logit_lens_scores,
    max_activations,
    prompt_ids,
    spliced,
    steer_run,
    steered,
    steering_plan,
    top_logit_effects,
    zero,
)

PROMPT = "The old dog slept by the warm fire while the cat"


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return load_language_model(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def setup(small_run: Run) -> tuple[HSAE, int]:
    return small_run.load("hsae"), int(small_run.cache().manifest["layer"])


def _logits(lm: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def _residual(lm: LanguageModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    captured: list[torch.Tensor] = []

    def hook(_m: Any, _i: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, tuple) else out)

    handle = decoder_layers(lm.model)[layer].register_forward_hook(hook)
    try:
        _logits(lm, ids)
    finally:
        handle.remove()
    return captured[0][0]


def _most_active(model: HSAE, resid: torch.Tensor, level: int) -> tuple[int, torch.Tensor]:
    acts = model.encode_level(resid[1:], level)  # real tokens only
    feature = int(acts.max(0).values.argmax())
    return feature, model.encode_level(resid, level)[:, feature]


def test_strength_zero_is_the_clean_run_exactly(lm: LanguageModel, setup: tuple[HSAE, int]):
    model, layer = setup
    ids = prompt_ids(lm, PROMPT)
    clean = _logits(lm, ids)
    with steered(lm, model, layer, [add(0, 3, 0.0), add(1, 5, 0.0)]):
        same = _logits(lm, ids)
    assert torch.equal(same, clean)
    with steered(lm, model, layer, [add(0, 3, 8.0)]):
        moved = _logits(lm, ids)
    assert torch.equal(moved[:, 0], clean[:, 0])  # BOS keeps its clean residual
    assert not torch.allclose(moved[:, 1:], clean[:, 1:])


def test_zeroing_subtracts_the_feature_contribution(lm: LanguageModel, setup: tuple[HSAE, int]):
    model, layer = setup
    ids = prompt_ids(lm, PROMPT)
    resid = _residual(lm, ids, layer)
    feature, acts = _most_active(model, resid, 1)
    assert float(acts[1:].max()) > 0
    row = model.levels[1].W_dec[feature].detach() / model.scale

    def manual(_m: Any, _i: Any, out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out
        a = model.encode_level(hidden[0], 1)[:, feature]
        a[0] = 0.0  # BOS stays clean
        new = hidden - (a[:, None] * row).unsqueeze(0)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = decoder_layers(lm.model)[layer].register_forward_hook(manual)
    try:
        expected = _logits(lm, ids)
    finally:
        handle.remove()
    with steered(lm, model, layer, [zero(1, feature)]):
        got = _logits(lm, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(got, _logits(lm, ids), atol=1e-3)


def test_clamping_to_the_current_value_changes_nothing(lm: LanguageModel, setup: tuple[HSAE, int]):
    model, layer = setup
    ids = prompt_ids(lm, PROMPT)
    clean = _logits(lm, ids)
    resid = _residual(lm, ids, layer)
    feature, acts = _most_active(model, resid, 0)
    position = int(acts[1:].argmax()) + 1
    current = float(acts[position])
    with steered(lm, model, layer, [clamp(0, feature, current)], positions=[position]):
        same = _logits(lm, ids)
    torch.testing.assert_close(same, clean, rtol=1e-5, atol=1e-4)
    silent = int((model.encode_level(resid[1:], 0) > 0).sum(0).argmin())
    assert float(model.encode_level(resid[1:], 0)[:, silent].max()) == 0.0
    with steered(lm, model, layer, [clamp(0, silent, 0.0)]):
        assert torch.equal(_logits(lm, ids), clean)
    with steered(lm, model, layer, [clamp(0, feature, current + 20.0)], positions=[position]):
        pushed = _logits(lm, ids)
    torch.testing.assert_close(pushed[:, :position], clean[:, :position])  # earlier: untouched
    assert not torch.allclose(pushed[:, position], clean[:, position], atol=1e-2)


def test_adding_a_direction_moves_logits_along_its_logit_lens(
    lm: LanguageModel, setup: tuple[HSAE, int]
):
    model, _ = setup
    last = lm.n_layers - 1  # after the last block only the final norm and the head remain
    ids = prompt_ids(lm, PROMPT)
    clean = _logits(lm, ids)[0, -1]
    for level, feature in [(0, 0), (1, 7), (2, 11)]:
        lens = logit_lens_scores(lm, (model.levels[level].W_dec[feature] / model.scale)[None])[0]
        with steered(lm, model, last, [add(level, feature, 200.0)]):
            shift = _logits(lm, ids)[0, -1] - clean
        correlation = torch.corrcoef(torch.stack([shift, lens]))[0, 1]
        assert correlation > 0.5, (level, feature, float(correlation))
        effect = logit_effect(lm, model, level, feature, k=5)
        top = lm.tokenizer.convert_tokens_to_ids(
            lm.tokenizer.tokenize(effect["promoted"][0][0], add_special_tokens=False)
        )
        assert len(effect["promoted"]) == len(effect["suppressed"]) == 5
        scores = [score for _, score in effect["promoted"]]
        assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(
            float(lens.max()), rel=1e-3
        )
        assert effect["suppressed"][0][1] == pytest.approx(float(lens.min()), rel=1e-3)
        assert shift[int(lens.argmax())] > shift[int(lens.argmin())]
        assert top  # the promoted token's text maps back to a token


def test_batched_logit_effects_match_one_feature_at_a_time(
    lm: LanguageModel, setup: tuple[HSAE, int]
):
    model, _ = setup
    rows = model.levels[1].W_dec.detach()[:7].float() / model.activation_scale
    whole = top_logit_effects(lm, rows, k=6)
    vocab = min(lm.model.get_output_embeddings().weight.shape[0], len(lm.tokenizer))
    chunked = top_logit_effects(lm, rows, k=6, max_elements=3 * vocab)  # chunks of 3 rows
    for name in ("promoted_ids", "suppressed_ids"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))
    torch.testing.assert_close(whole.promoted_scores, chunked.promoted_scores)
    assert whole.promoted_ids.shape == (7, 6) and int(whole.promoted_ids.max()) < vocab
    for n in (0, 6):
        single = logit_effect(lm, model, 1, n, k=6)
        assert [s for _, s in single["promoted"]] == pytest.approx(
            whole.promoted_scores[n].tolist(), rel=1e-4, abs=1e-4
        )
        assert [s for _, s in single["suppressed"]] == pytest.approx(
            whole.suppressed_scores[n].tolist(), rel=1e-4, abs=1e-4
        )
        assert single["promoted"][0][0] == lm.tokenizer.decode([int(whole.promoted_ids[n, 0])])
    with pytest.raises(SteeringError, match="k must be >= 1"):
        top_logit_effects(lm, rows, k=0)


def test_spliced_context_matches_the_evaluation_splice(
    lm: LanguageModel, setup: tuple[HSAE, int], small_run: Run
):
    model, layer = setup
    batches = heldout_context_batches(small_run.cache(), lm, 2, batch_size=2)
    block = decoder_layers(lm.model)[layer]
    evaluation = spliced_losses(lm.model, block, [model], batches)[0]
    for level in range(model.n_levels):
        total, count = 0.0, 0
        for ids, mask, _ in batches:
            with spliced(lm, model, level, layer), torch.no_grad():
                logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), -1)
            picked = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
            total -= float((picked * mask[:, 1:]).sum())
            count += int(mask[:, 1:].sum())
        assert total / count == pytest.approx(evaluation.ce_spliced[level], rel=1e-6)
    assert evaluation.ce_spliced[0] > evaluation.ce_clean + 1e-3  # the splice did something


def test_steered_generation_follows_cached_generate(lm: LanguageModel, setup: tuple[HSAE, int]):
    model, layer = setup
    ids = prompt_ids(lm, "My favourite animal is")
    edits = [add(0, 0, 60.0)]
    clean = greedy_continuation(lm, "My favourite animal is", 6)
    with steered(lm, model, layer, edits):
        ours = greedy_continuation(lm, "My favourite animal is", 6)
        cached = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
        )
    assert ours != clean
    text = lm.tokenizer.decode(cached[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert text == ours


def test_bad_requests_are_refused(lm: LanguageModel, setup: tuple[HSAE, int]):
    model, layer = setup
    with pytest.raises(SteeringError, match=r"feature index of level 0 must lie in \[0, 31\]"):
        steering_plan(model, 0, 32, 1.0)
    with pytest.raises(SteeringError, match=r"level must lie in \[0, 2\], got 3"):
        steering_plan(model, 3, 0, 1.0)
    with pytest.raises(SteeringError, match="last level"):
        steering_plan(model, 2, 0, 1.0, children=True)
    with pytest.raises(SteeringError, match="no strength given for feature 0:1"):
        steering_plan(model, 0, 1, {(0, 2): 1.0})
    leaves = [i for i in range(32) if model.children(0, i).numel() == 0]
    if leaves:
        with pytest.raises(SteeringError, match="has no children in level 1"):
            steering_plan(model, 0, leaves[0], 1.0, children=True)
    with pytest.raises(SteeringError, match="layer must lie"), steered(lm, model, 99, []):
        pass
    with pytest.raises(HSAEError, match="level must lie"), spliced(lm, model, 5, layer):
        pass


def test_cli_steer_prints_clean_parent_and_children(small_run: Run):
    model = small_run.load("hsae")
    parent = max(range(32), key=lambda i: model.children(0, i).numel())
    kids = model.children(0, parent).tolist()
    assert kids
    result = CliRunner().invoke(
        app,
        [
            "steer", str(small_run.folder), "--feature", f"0:{parent}", "--prompt", PROMPT,
            "--children", "--max-new-tokens", "3", "--strength", "30",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    print(result.output)
    lines = result.output[result.output.index("prompt: ") :].splitlines()
    labels = [line.split(" | ")[0].strip() for line in lines if " | " in line]
    expected = ["clean", f"0:{parent} parent"] + [f"1:{kid} child" for kid in kids]
    assert labels == ["clean"] + [f"{name} +30" for name in expected[1:]]
    bad = CliRunner().invoke(
        app, ["steer", str(small_run.folder), "--feature", "0:99", "--prompt", "x"]
    )
    assert bad.exit_code == 2
    assert "feature index of level 0 must lie in [0, 31], got 99" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    malformed = CliRunner().invoke(
        app, ["steer", str(small_run.folder), "--feature", "zero", "--prompt", "x"]
    )
    assert malformed.exit_code == 2


def test_default_strength_is_each_features_heldout_maximum(lm: LanguageModel, small_run: Run):
    model = small_run.load("hsae")
    parent = max(range(32), key=lambda i: model.children(0, i).numel())
    lines = steer_run(
        small_run.folder, 0, parent, "A cat", children=True, max_new_tokens=1, lm=lm, lens_k=2
    )
    heldout = small_run.cache().all_activations("heldout")[: small_run.config.eval_tokens]
    codes = model.encode(heldout)
    assert [line.role for line in lines] == ["clean", "feature"] + ["child"] * (len(lines) - 2)
    for line in lines[1:]:
        edit = line.edits[0]
        assert edit.value == pytest.approx(float(codes[edit.level][:, edit.feature].max()))
        assert line.lens is not None and len(line.lens["promoted"]) == 2
    assert max_activations(model, heldout, [(0, parent)], batch_size=7) == {
        (0, parent): pytest.approx(float(codes[0][:, parent].max()))
    }
