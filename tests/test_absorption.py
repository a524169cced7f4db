"""Feature absorption: exact fractions on hand-built SAEs, and the pipeline on the embedded LM."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from hsae.activations import load_language_model
from hsae.config import HSAEConfig
from hsae.evaluation.absorption import (
    AbsorptionCriteria,
    AbsorptionData,
    AbsorptionError,
    AbsorptionSettings,
    absorption_metrics,
    build_absorption_data,
    first_letter_vocabulary,
    level_absorption,
    prepare_absorption,
    spelling_prompts,
    word_absorption,
)
from hsae.model import HSAE

# --- the core, on one letter -----------------------------------------------------------------

E = torch.eye(6)
# Latent 0: the letter's main latent. 1: an absorber (cosine 0.6 with the letter). 2: unrelated.
# 3: weakly aligned (cosine 0.05: too little to absorb, enough to count for full absorption).
DECODER = torch.stack(
    [E[0], 0.6 * E[0] + 0.8 * E[1], E[2], 0.05 * E[0] + math.sqrt(1 - 0.05**2) * E[3], E[4]]
)
# (codes, activation error along the letter direction, expected fraction, expected full)
WORDS = [
    ([0.5, 2.5, 0, 0, 0], 0.0, 0.75, False),  # main 0.5 + absorbed 1.5 of 2.0
    ([0.0, 2.0, 1, 0, 0], 0.0, 1.0, True),  # main silent, the absorber carries it all
    ([2.0, 0.0, 1, 0, 1], 0.0, 0.0, False),  # no absorption
    ([1.0, 0.5, 0, 0, 0], 0.0, 0.0, False),  # absorber below 40% of the projection
    ([0.0, 0.0, 0, 10, 0], 0.0, 0.0, True),  # only a weakly aligned latent: full, not fraction
    ([1.0, 2.5, 0, 0, 0], 1.0, 0.6, False),  # unexplained 1.0: absorbed 1.5 of (1.5 + 1.0)
    ([2.0, 1.0, 0, 0, 0], -1.0, 0.0, False),  # main latents already exceed the projection
    ([1.0, 2.5, 0, 0, 0], -0.4, 1.1 / 2.1, False),  # absorbed: only the unexplained 1.1
]


def _letter_words(scale: float = 1.0):
    codes = torch.tensor([w[0] for w in WORDS], dtype=torch.float32)
    errors = torch.tensor([w[1] for w in WORDS])
    x = (codes @ DECODER + errors[:, None] * E[0]) / scale
    expected = torch.tensor([w[2] for w in WORDS])
    full = torch.tensor([w[3] for w in WORDS])
    return codes, x, expected, full


def test_absorption_fraction_equals_the_constructed_share():
    codes, x, expected, full = _letter_words()
    words = word_absorption(codes, DECODER, x, 3.0 * E[0], [0])
    torch.testing.assert_close(words.fraction, expected)
    assert words.full.tolist() == full.tolist()


def test_units_of_activations_and_probe_do_not_matter():
    codes, x, expected, full = _letter_words(scale=250.0)
    words = word_absorption(codes, DECODER / 250.0, x, 0.01 * E[0], torch.tensor([0]))
    torch.testing.assert_close(words.fraction, expected)
    assert words.full.tolist() == full.tolist()


def test_main_latents_absorb_nothing_and_absorbers_are_capped():
    codes, x, _, _ = _letter_words()
    # With the absorber counted as a second main latent (feature splitting), nothing is absorbed.
    assert word_absorption(codes, DECODER, x, E[0], [0, 1]).fraction.abs().max() == 0
    # Four equal absorbers beside the main latent: only the top 3 count.
    decoder = torch.cat([E[:1], (0.5 * E[0] + math.sqrt(0.75) * E[1:5])])
    codes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    x = codes @ decoder
    fewer = AbsorptionCriteria(max_absorbers=1)
    assert word_absorption(codes, decoder, x, E[0], [0]).fraction.item() == pytest.approx(
        0.5 * 3 / (0.5 * 3 + 1.0)
    )
    # One absorber carries 0.5 of a 3.0 projection: below 40%, so no absorption at all.
    assert word_absorption(codes, decoder, x, E[0], [0], fewer).fraction.item() == 0.0


def test_shape_mismatch_is_refused():
    with pytest.raises(AbsorptionError, match="do not match"):
        word_absorption(torch.zeros(2, 3), DECODER, torch.zeros(2, 6), E[0], [0])


# --- a whole level: k-sparse probing, splitting, probe, means over letters ---------------------

D = 64
PER_LETTER = {"train": 80, "test": 40}


def _synthetic_letters(absorbed_test: int, partial_test: int, noise: float = 0.1):
    """Four letters along e0..e3. Letter b is split over latents 1 and 4. Some words of letter
    a are absorbed: their own token latent (decoder (e0 + e_k)/sqrt 2) carries the letter, with
    the main latent silent (full) or at half strength (partial). Returns codes, decoder, data."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.eye(D)
    decoder = [directions[0], directions[1], directions[2], directions[3], directions[1]]
    splits = {}
    for split, n in PER_LETTER.items():
        rows, labels = [], []
        absorbed = {"train": 16, "test": absorbed_test}[split]
        partial = {"train": 0, "test": partial_test}[split]
        for letter in range(4):
            for i in range(n):
                row = torch.zeros(5 + 64)
                latent = 4 if letter == 1 and i % 2 else letter
                strength = 3.0
                if letter == 0 and i < absorbed + partial:
                    token = len(decoder)
                    decoder.append((directions[0] + directions[4 + token % 60]) / math.sqrt(2))
                    strength = 0.0 if i < absorbed else 1.5
                    row[token] = (3.0 - strength) * math.sqrt(2)
                row[latent] = strength
                rows.append(row)
                labels.append(letter)
        splits[split] = (torch.stack(rows), torch.tensor(labels))
    decoder = torch.stack(decoder)
    codes = {split: rows[:, : len(decoder)] for split, (rows, _) in splits.items()}
    xs = {
        split: codes[split] @ decoder + noise * torch.randn(len(rows), D, generator=generator)
        for split, (rows, _) in splits.items()
    }
    data = build_absorption_data(
        layer=0,
        letters=list("abcd"),
        words=(
            [f"w{i}" for i in range(len(xs["train"]))],
            [f"w{i}" for i in range(len(xs["test"]))],
        ),
        activations=(xs["train"], xs["test"]),
        labels=(splits["train"][1], splits["test"][1]),
    )
    return codes, decoder, data


def test_level_absorption_recovers_the_absorbed_share():
    codes, decoder, data = _synthetic_letters(absorbed_test=8, partial_test=4)
    assert min(data.probe_f1) > 0.95
    result = level_absorption(codes["train"], codes["test"], decoder, data)
    letters = result["per_letter"]
    assert letters["a"]["main_latents"] == [0]
    assert sorted(letters["b"]["main_latents"]) == [1, 4]  # feature splitting, not absorption
    assert letters["a"]["true_positives"] == 40
    # 8 words fully absorbed (fraction 1), 4 half absorbed (0.5), 28 not: (8 + 2) / 40.
    assert letters["a"]["absorption_fraction"] == pytest.approx(0.25, abs=0.02)
    assert letters["a"]["full_absorption_rate"] == pytest.approx(0.2)
    for other in "bcd":
        assert letters[other]["absorption_fraction"] < 0.01
    assert result["mean_absorption_fraction"] == pytest.approx(
        sum(e["absorption_fraction"] for e in letters.values()) / 4
    )
    assert result["score"] == pytest.approx(1 - result["mean_absorption_fraction"])


def test_level_without_absorption_scores_one():
    codes, decoder, data = _synthetic_letters(absorbed_test=0, partial_test=0)
    result = level_absorption(codes["train"], codes["test"], decoder, data)
    assert result["mean_absorption_fraction"] < 0.005
    assert result["full_absorption_rate"] == 0.0


def test_decoder_bias_is_taken_off_only_when_asked():
    codes, decoder, data = _synthetic_letters(absorbed_test=8, partial_test=0)
    offset = 5.0 * torch.eye(D)[0]
    shifted = dataclasses.replace(
        data,
        train_x=data.train_x + offset,
        test_x=data.test_x + offset,
        probe_bias=data.probe_bias - data.probe_weight @ offset,
    )
    plain = level_absorption(codes["train"], codes["test"], decoder, data)
    taken_off = level_absorption(
        codes["train"], codes["test"], decoder, shifted, AbsorptionCriteria(), offset
    )
    for key in ("absorption_fraction", "full_absorption_rate"):
        assert taken_off["per_letter"]["a"][key] == pytest.approx(plain["per_letter"]["a"][key])
    assert plain["per_letter"]["a"]["absorption_fraction"] == pytest.approx(0.2, abs=0.01)
    # Left in (SAEBench), the offset inflates the probe projection past the absorber's 40%.
    raw = level_absorption(codes["train"], codes["test"], decoder, shifted)
    assert raw["per_letter"]["a"]["absorption_fraction"] < 0.05


def test_absorption_metrics_through_a_built_jumprelu_sae():
    """An HSAE whose single level encodes the synthetic words exactly (main latent silenced by
    the token directions), fed raw activations 1/scale larger than its own units."""
    codes, decoder, data = _synthetic_letters(absorbed_test=8, partial_test=0, noise=0.02)
    scale = 0.02
    model = HSAE(HSAEConfig(d_in=D, level_sizes=[len(decoder)], target_l0=2))
    token_dims = decoder[5:, 4:].argmax(1) + 4
    encoder = decoder.T.clone()
    encoder[:, 0] = torch.eye(D)[0] - torch.eye(D)[token_dims].sum(0)  # silenced by tokens
    encoder[:, 5:] = math.sqrt(2) * torch.eye(D)[token_dims].T  # code 3 sqrt 2 on its word
    level = model.levels[0]
    with torch.no_grad():
        level.W_dec.copy_(decoder)
        level.W_enc.copy_(encoder)
        level.b_enc.zero_()
        level.b_dec.zero_()
        level.log_threshold.fill_(math.log(1.0))
        model.activation_scale.fill_(scale)
    raw = dataclasses.replace(
        data,
        train_x=data.train_x / scale,
        test_x=data.test_x / scale,
        probe_weight=data.probe_weight * scale,
    )
    result = absorption_metrics(model, raw)
    json.dumps(result)
    letters = result["levels"][0]["per_letter"]
    assert letters["a"]["absorption_fraction"] == pytest.approx(0.2, abs=0.01)
    assert letters["a"]["full_absorption_rate"] == pytest.approx(0.2)
    assert result["summary"]["score"][0] == pytest.approx(1 - 0.2 / 4, abs=0.01)


# --- vocabulary, prompts, settings, and the embedded language model -------------------------------


@pytest.fixture(scope="module")
def lm():
    return load_language_model(device="cpu", dtype="float32")


def test_vocabulary_is_single_token_words_of_frequent_letters(lm):
    settings = AbsorptionSettings(n_words=300, vocab_pool=5000, min_words_per_letter=10)
    vocabulary = first_letter_vocabulary(lm.tokenizer, settings)
    assert vocabulary == first_letter_vocabulary(lm.tokenizer, settings)
    letters = [word[0] for _, word in vocabulary]
    assert all(letters.count(letter) >= 10 for letter in letters)
    for token_id, word in vocabulary[:50]:
        assert word.isalpha() and word.islower() and len(word) >= 2
        assert lm.tokenizer.decode([token_id]) == " " + word


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"template": "spell it:"}, "exactly once"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"n_words": 1}, "n_words"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(AbsorptionError, match=message):
        AbsorptionSettings(**changes)


def test_prompts_put_the_word_at_the_read_position(lm):
    vocabulary = [(lm.tokenizer.convert_tokens_to_ids(f"\u2581{w}"), w) for w in ("dog", "cat")]
    prompts, position = spelling_prompts(lm, vocabulary, AbsorptionSettings(icl_examples=1), 0)
    assert lm.tokenizer.decode(prompts[0]) == (
        "\n cat has the first letter: C\n dog has the first letter:"
    )
    assert [p[position] for p in prompts] == [v[0] for v in vocabulary]


def test_prepare_and_metrics_on_the_embedded_model(lm, tmp_path):
    settings = AbsorptionSettings(
        n_words=250, vocab_pool=1500, min_words_per_letter=15, icl_examples=3, batch_size=32
    )
    data = prepare_absorption(lm, 6, settings=settings)
    n_words = len(data.train_words) + len(data.test_words)
    assert data.train_x.shape == (len(data.train_words), lm.d_model)
    assert data.test_x.shape[0] == len(data.test_words) and n_words <= 250
    assert data.probe_accuracy > 1.0 / len(data.letters)
    again = AbsorptionData.load(data.save(tmp_path))
    torch.testing.assert_close(again.probe_weight, data.probe_weight)
    assert again.settings == settings and again.test_words == data.test_words

    model = HSAE(HSAEConfig(d_in=lm.d_model, level_sizes=[32, 64], target_l0=4))
    result = absorption_metrics(model, data, AbsorptionCriteria(min_probe_f1=0.0, max_k=3))
    json.dumps(result)
    assert [level["level"] for level in result["levels"]] == [0, 1]
    for level in result["levels"]:
        assert 0.0 <= level["mean_absorption_fraction"] <= 1.0
        assert level["score"] == pytest.approx(1 - level["mean_absorption_fraction"])
        assert not level["reliable"]
