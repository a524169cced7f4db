"""Sparse probing finds the one latent that carries a label and scores chance without one; the
WordNet contexts are exact and read at the right token."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hsae.activations import load_language_model
from hsae.activations.corpora import NounSynset
from hsae.activations.prompts import activations_at, encode_prompts
from hsae.config import HSAEConfig
from hsae.evaluation.lexicon import (
    LabelledContext,
    LexiconData,
    LexiconError,
    LexiconSettings,
    exact_noun_lines,
    locate,
    prepare_contexts,
    render,
    text_contexts,
    wordnet_contexts,
)
from hsae.evaluation.probing import (
    ProbeSettings,
    binary_tasks,
    probe_features,
    sparse_probing,
    split_by_class,
    top_k_by_mean_difference,
)
from hsae.evaluation.taxonomy import TaxonomySettings, taxonomy_alignment
from hsae.model import HSAE

N_CLASSES, PER_CLASS, N_LATENTS = 3, 200, 40


def _labels() -> torch.Tensor:
    return torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)


def _noise(n: int, width: int, seed: int) -> torch.Tensor:
    """Sparse non-negative latents unrelated to any label."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, width, generator=g) * (torch.rand(n, width, generator=g) < 0.3)


def _carriers(labels: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Latent c fires (1 to 2) exactly on class c; the rest is noise."""
    g = torch.Generator().manual_seed(seed)
    codes = _noise(labels.numel(), N_LATENTS, seed)
    codes[:, :N_CLASSES] = 0
    codes[torch.arange(labels.numel()), labels] = 1 + torch.rand(labels.numel(), generator=g)
    return codes


def test_top_k_ranks_by_absolute_mean_difference():
    targets = torch.tensor([1, 1, 0, 0])
    features = torch.tensor([[1.0, 0, 0.5], [1.0, 0, 0.5], [0.0, 3, 0.0], [0.0, 3, 0.0]])
    assert top_k_by_mean_difference(features, targets, 2).tolist() == [1, 0]
    assert top_k_by_mean_difference(features, targets, 10).numel() == 3


def test_split_and_tasks_are_balanced_and_disjoint():
    labels = _labels()
    test = split_by_class(labels, 0.2, torch.Generator().manual_seed(3))
    assert torch.bincount(labels[test]).tolist() == [40] * N_CLASSES
    tasks = binary_tasks(labels, ["a", "b", "c"], 0.2, seed=3)
    assert [t.name for t in tasks] == ["a", "b", "c"]
    for c, task in enumerate(tasks):
        assert not set(task.train.tolist()) & set(task.test.tolist())
        assert test[task.test].all() and not test[task.train].any()
        for idx, targets in ((task.train, task.train_targets), (task.test, task.test_targets)):
            assert targets.sum() * 2 == targets.numel()
            assert ((labels[idx] == c) == targets.bool()).all()


def test_one_carrying_latent_gives_top1_accuracy_one():
    labels = _labels()
    codes = _carriers(labels)
    tasks = binary_tasks(labels, ["a", "b", "c"])
    for c, task in enumerate(tasks):
        assert top_k_by_mean_difference(codes[task.train], task.train_targets, 1).item() == c
    result = probe_features(codes, tasks)
    assert result["top_1_accuracy"] > 0.99
    assert result["top_5_accuracy"] > 0.99
    assert result["all_accuracy"] > 0.97


def test_a_latent_silent_on_the_class_counts_as_carrier():
    labels = _labels()
    codes = _noise(labels.numel(), N_LATENTS, 2)
    codes[:, 0] = (labels != 0).float() * 2  # fires on everything except class 0
    task = binary_tasks(labels, ["a", "b", "c"])[0]
    assert probe_features(codes, [task], ProbeSettings(ks=(1,)))["top_1_accuracy"] > 0.99


def test_latents_without_signal_score_chance():
    labels = _labels()
    result = probe_features(
        _noise(labels.numel(), N_LATENTS, 5), binary_tasks(labels, ["a", "b", "c"])
    )
    for key in ("top_1_accuracy", "top_2_accuracy", "top_5_accuracy"):
        assert abs(result[key] - 0.5) < 0.12, result


def _reader(d_in: int, sizes: list[int], dims: list[list[int]]) -> HSAE:
    """An HSAE whose feature i of level l reads raw dimension dims[l][i] (threshold 0.5)."""
    model = HSAE(HSAEConfig(d_in=d_in, level_sizes=sizes, target_l0=1))
    with torch.no_grad():
        for level, chosen in zip(model.levels, dims, strict=True):
            level.W_enc.copy_(torch.eye(d_in)[:, chosen])
            level.b_enc.zero_()
            level.b_dec.zero_()
            level.log_threshold.fill_(math.log(0.5))
        model.activation_scale.fill_(1.0)
    return model


def _data(activations: torch.Tensor, labels: torch.Tensor, names: list[str]) -> LexiconData:
    contexts = tuple(LabelledContext("t", "t", names[y]) for y in labels.tolist())
    return LexiconData(activations, labels, tuple(names), contexts, layer=0)


def test_sparse_probing_through_a_model_with_one_informative_level():
    labels = _labels()
    signal = _carriers(labels)[:, :N_CLASSES] * 2  # above the 0.5 threshold when firing
    raw = torch.cat([signal, _noise(labels.numel(), 8, 7) * 0.4], 1)
    raw = raw + 0.01 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))
    model = _reader(raw.shape[1], [3, 8], [[0, 1, 2], list(range(3, 11))])
    result = sparse_probing({"m": model}, _data(raw, labels, ["a", "b", "c"]), progress=False)
    json.dumps(result)
    assert result["tasks"] == ["a", "b", "c"]
    assert result["raw"]["all_accuracy"] > 0.97 and result["raw"]["top_1_accuracy"] > 0.97
    informative, blind = result["m"]["levels"]
    assert informative["top_1_accuracy"] > 0.99
    assert abs(blind["top_1_accuracy"] - 0.5) < 0.12
    assert set(informative["per_task"]["a"]) == {"top_1", "top_2", "top_5", "all"}


# --------------------------------------------------------------------------- WordNet contexts


def _synset(synset_id: str, lemma: str, lexname: str = "noun.food") -> NounSynset:
    return NounSynset(synset_id, lexname, (lemma,), (), ())


def test_only_lines_that_name_one_noun_synset_are_kept():
    taxonomy = {
        "n1": _synset("n1", "apple"),
        "n2": _synset("n2", "bank"),
        "n3": _synset("n3", "mole"),
        "n4": _synset("n4", "mole"),
        "n5": _synset("n5", "ice_cream"),
    }
    corpus = [
        "apple: fruit with red or yellow skin",
        "bank: a financial institution",
        "bank: tip laterally",  # a verb line with the same lemma
        "mole: a spot on the skin",
        "ice cream: frozen dessert",
        "run: move fast",
    ]
    lines = exact_noun_lines(corpus, taxonomy)
    assert lines == {"n1": ("apple", corpus[0][7:]), "n5": ("ice cream", "frozen dessert")}


def test_render_reads_the_last_lemma_and_drops_usage_examples():
    text, prefix = render("{lemma} is {gloss}; {lemma} again", "dog", 'a pet; "the dog barked"')
    assert text == "dog is a pet; dog again"
    assert prefix == "dog is a pet; dog"
    assert render("{gloss}: {lemma}", "dog", "a pet") == ("a pet: dog", "a pet: dog")


def test_wordnet_contexts_are_capped_seeded_and_labelled():
    settings = LexiconSettings(per_class=5, lexnames=("noun.animal", "noun.food"), seed=1)
    first, again = wordnet_contexts(settings), wordnet_contexts(settings)
    assert first == again and len(first) == 10
    assert [c.label for c in first] == ["noun.animal"] * 5 + ["noun.food"] * 5
    assert all(c.text.endswith(": " + c.lemma) and c.synset_id.startswith("n") for c in first)
    other = wordnet_contexts(LexiconSettings(per_class=5, lexnames=("noun.animal",), seed=2))
    assert {c.synset_id for c in other} != {c.synset_id for c in first[:5]}


@pytest.fixture(scope="module")
def lm():
    return load_language_model(device="cpu", dtype="float32")


def test_lexicon_and_both_metrics_on_the_language_model(lm):
    settings = LexiconSettings(
        per_class=6, lexnames=("noun.animal", "noun.artifact", "noun.food"), template="{lemma}."
    )
    contexts = wordnet_contexts(settings) + text_contexts(["a small cat"], ["noun.animal"])
    contexts[-1] = LabelledContext("a small cat", "a small", "noun.animal", "n02121620", "cat")
    data = prepare_contexts(lm, 3, contexts, batch_size=8, progress=False)
    assert len(data) == 19 and data.dropped == 0
    assert data.describe()["per_class"] == {"noun.animal": 7, "noun.artifact": 6, "noun.food": 6}
    # The row of the last context is the residual stream at "small", not at "cat".
    prompts, positions, _ = locate(lm, [data.contexts[-1]])
    alone = activations_at(lm, 3, encode_prompts(lm, ["a small"]), [-1])
    torch.testing.assert_close(data.activations[-1], alone[0], rtol=1e-4, atol=1e-3)
    assert positions == [len(prompts[0]) - 2]
    model = HSAE(HSAEConfig(d_in=lm.d_model, level_sizes=[16, 32], target_l0=4))
    model.set_parents(0, torch.arange(32) % 16)
    probing = sparse_probing({"m": model}, data, settings=ProbeSettings(ks=(1,)), progress=False)
    loose = TaxonomySettings(min_support=2, min_fires=1, min_f1=0.0, random_draws=5)
    alignment = taxonomy_alignment({"m": model}, data, settings=loose, progress=False)
    json.dumps([probing, alignment])
    assert len(probing["m"]["levels"]) == 2 and len(probing["tasks"]) == 3
    assert alignment["contexts"] == 19 and len(alignment["m"]["pairs"]) == 1
    # The same products in row blocks of another size. In float64, so that the CPU's matmul
    # blocking a 5-row and a 19-row product differently (float32: 2.8e-5 apart on a value near
    # 2, on one CI run) stays far below the tolerance, while a wrong row or block does not.
    model64, activations64 = model.double(), data.activations.double()
    batched = model64.encode_in_batches(activations64, batch_size=5)
    for level, codes in enumerate(model64.encode(activations64)):
        torch.testing.assert_close(batched[level], codes, rtol=1e-5, atol=1e-5)


def test_lexicon_data_round_trips_through_its_files(tmp_path) -> None:
    contexts = tuple(
        LabelledContext(f"gloss {i}: word{i}", f"gloss {i}: word{i}", label, f"n{i:08d}", "w")
        for i, label in enumerate(["noun.animal", "noun.food", "noun.animal"])
    )
    data = LexiconData(torch.randn(3, 8), torch.tensor([0, 1, 0]), ("a", "b"), contexts, 4, 2)
    loaded = LexiconData.load(data.save(tmp_path / "lexicon"))
    assert torch.equal(loaded.activations, data.activations)
    assert torch.equal(loaded.labels, data.labels)
    assert (loaded.class_names, loaded.contexts, loaded.layer, loaded.dropped) == (
        data.class_names,
        data.contexts,
        4,
        2,
    )
    with pytest.raises(LexiconError, match="no lexicon_data.json"):
        LexiconData.load(tmp_path / "missing")
