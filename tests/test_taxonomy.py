"""Taxonomy alignment scores a planted forest (parents fire on the hypernyms of their children's
synsets) at precision 1, a shuffled one at 0 and random pairs at chance, with honest intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hsae.activations.corpora import NounSynset
from hsae.config import HSAEConfig
from hsae.evaluation.lexicon import LabelledContext, LexiconData
from hsae.evaluation.taxonomy import (
    TaxonomyError,
    TaxonomySettings,
    alignment_from_codes,
    assign_synsets,
    link_agreement,
    synset_index,
    taxonomy_alignment,
    wilson_interval,
)
from hsae.model import HSAE

CATEGORIES = ["noun.animal", "noun.plant", "noun.food", "noun.artifact"]
SUBS, LEAVES, PER_LEAF = 3, 2, 5


def _node(synset_id: str, lexname: str, parents: tuple[str, ...]) -> NounSynset:
    return NounSynset(synset_id, lexname, (synset_id,), parents, ())


def _planted() -> tuple[dict[str, NounSynset], list[str], list[str], list[str]]:
    """Root -> 4 categories (the last through a one-child chain) -> 3 subs each -> 2 leaves each,
    5 contexts per leaf. Returns the taxonomy, context synsets, categories and subs."""
    taxonomy = {"root": _node("root", "noun.Tops", ())}
    categories, subs, contexts = [], [], []
    for c, lexname in enumerate(CATEGORIES):
        top = f"cat{c}"
        taxonomy[top] = _node(top, lexname, ("root",))
        if c == len(CATEGORIES) - 1:  # a chain: same contexts as its parent, one level deeper
            taxonomy[f"{top}chain"] = _node(f"{top}chain", lexname, (top,))
            top = f"{top}chain"
        categories.append(top)
        for s in range(SUBS):
            sub = f"{top}.sub{s}"
            taxonomy[sub] = _node(sub, lexname, (top,))
            subs.append(sub)
            for leaf in range(LEAVES):
                taxonomy[f"{sub}.{leaf}"] = _node(f"{sub}.{leaf}", lexname, (sub,))
                contexts += [f"{sub}.{leaf}"] * PER_LEAF
    return taxonomy, contexts, categories, subs


def _codes(contexts: list[str], groups: list[str], taxonomy) -> torch.Tensor:
    """Feature j fires (value 1 to 2) exactly on the contexts under groups[j]."""
    under = torch.tensor([[_is_under(c, g, taxonomy) for g in groups] for c in contexts])
    g = torch.Generator().manual_seed(0)
    return under.float() * (1 + torch.rand(under.shape, generator=g))


def _is_under(synset_id: str, ancestor: str, taxonomy) -> bool:
    while synset_id != ancestor:
        parents = taxonomy[synset_id].parents
        if not parents:
            return False
        synset_id = parents[0]
    return True


def _planted_forest():
    taxonomy, contexts, categories, subs = _planted()
    index = synset_index(contexts, taxonomy)
    codes = [_codes(contexts, categories, taxonomy), _codes(contexts, subs, taxonomy)]
    true_parents = torch.arange(len(subs)) // SUBS
    return taxonomy, contexts, index, codes, true_parents, categories, subs


def test_index_keeps_supported_synsets_and_merges_identical_ones():
    taxonomy, contexts, categories, subs = _planted()
    index = synset_index(contexts, taxonomy)
    assert set(index.synset_ids) == set(categories + subs) | {
        f"{s}.{leaf}" for s in subs for leaf in range(LEAVES)
    }  # "root" covers every context (> max_share); "cat3" merged into "cat3chain"
    assert index.support[index.synset_ids.index("cat0")] == SUBS * LEAVES * PER_LEAF
    assert index.members.to_dense().sum(1).tolist() == index.support.tolist()
    few = synset_index(contexts, taxonomy, TaxonomySettings(min_support=PER_LEAF + 1))
    assert not any(s.count(".") == 2 for s in few.synset_ids)  # leaves have 5 contexts


def test_features_land_on_the_synset_they_fire_on():
    taxonomy, contexts, index, codes, _, categories, subs = _planted_forest()
    for level_codes, names in zip(codes, (categories, subs), strict=True):
        best, f1 = assign_synsets(level_codes, index)
        assert [index.synset_ids[i] for i in best] == names
        assert torch.allclose(f1, torch.ones_like(f1))
    noisy = torch.zeros(len(contexts), 3)
    noisy[::7, 0] = 1  # spread thinly over every category: no synset matches well
    noisy[:3, 1] = 1  # too few contexts
    noisy[:30, 2] = 1  # exactly cat0
    best, _ = assign_synsets(noisy, index, TaxonomySettings(min_fires=5, min_f1=0.3))
    assert best.tolist()[:2] == [-1, -1] and index.synset_ids[best[2]] == "cat0"


def test_link_agreement_follows_hypernymy_not_the_reverse():
    _, _, index, *_ = _planted_forest()
    ids = {s: i for i, s in enumerate(index.synset_ids)}
    parent = torch.tensor([ids["cat0"], ids["cat0.sub1"], ids["cat0.sub1"], ids["cat1"]])
    child = torch.tensor([ids["cat0.sub1.0"], ids["cat0"], ids["cat0.sub1"], ids["cat0.sub1"]])
    hypernym, lexname = link_agreement(parent, child, index)
    assert hypernym.tolist() == [True, False, True, False]
    assert lexname.tolist() == [True, True, True, False]


def test_planted_forest_is_exact_and_shuffled_links_are_not():
    _, _, index, codes, true_parents, *_ = _planted_forest()
    planted = alignment_from_codes(codes, [true_parents], index)
    json.dumps(planted)
    pair = planted["pairs"][0]
    assert pair["links"] == pair["evaluated"] == len(true_parents)
    assert pair["hypernym"]["precision"] == 1.0 and pair["lexname"]["precision"] == 1.0
    assert pair["hypernym"]["high"] == 1.0 and pair["hypernym"]["low"] > 0.7
    assert pair["same_synset_fraction"] == 0.0
    # Random pairs: one category in four is the right one.
    assert pair["random_hypernym"]["precision"] == pytest.approx(0.25, abs=0.03)
    assert pair["random_hypernym"]["low"] <= 0.25 <= pair["random_hypernym"]["high"]
    shuffled = alignment_from_codes(codes, [(true_parents + 1) % 4], index)["pairs"][0]
    assert shuffled["hypernym"]["precision"] == 0.0 and shuffled["lexname"]["precision"] == 0.0
    assert planted["levels"][1]["assigned"] == 12 and planted["levels"][0]["distinct_synsets"] == 4


def test_strict_agreement_leaves_out_same_synset_links():
    _, _, index, codes, true_parents, *_ = _planted_forest()
    planted = alignment_from_codes(codes, [true_parents], index)["pairs"][0]
    assert planted["strict"]["precision"] == 1.0  # every parent is a proper ancestor
    # Both levels read the categories: every link joins a feature to its own synset.
    same = alignment_from_codes([codes[0], codes[0]], [torch.arange(4)], index)["pairs"][0]
    assert same["hypernym"]["precision"] == 1.0 and same["same_synset_fraction"] == 1.0
    assert same["strict"]["precision"] == 0.0 and same["strict"]["high"] < 0.5
    assert same["random_strict"]["precision"] == 0.0  # a category has no category ancestor


def test_partly_wrong_forest_scores_its_true_share_within_the_interval():
    _, _, index, codes, true_parents, *_ = _planted_forest()
    links = true_parents.clone()
    links[:3] = (links[:3] + 1) % 4  # 3 of 12 wrong
    links[3] = -1  # unassigned: not evaluated
    pair = alignment_from_codes(codes, [links], index)["pairs"][0]
    assert pair["links"] == pair["evaluated"] == 11
    assert pair["hypernym"]["precision"] == pytest.approx(8 / 11)
    assert pair["hypernym"]["low"] < 8 / 11 < pair["hypernym"]["high"]


def test_wilson_interval_values_and_coverage():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    rng = np.random.default_rng(0)
    for p, n in ((0.3, 40), (0.8, 120)):
        hits = rng.binomial(n, p, size=2000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(k, n) for k in hits)])
        assert 0.92 <= covered <= 0.98


def test_taxonomy_alignment_through_models():
    """Level 0 reads the category dims and level 1 the sub dims of the raw activations; the
    forest is planted in one model and shuffled in the other."""
    taxonomy, contexts, _, codes, true_parents, *_ = _planted_forest()
    raw = torch.cat(codes, 1)
    models = {}
    for name, links in (("planted", true_parents), ("shuffled", (true_parents + 2) % 4)):
        model = HSAE(HSAEConfig(d_in=raw.shape[1], level_sizes=[4, 12], target_l0=1))
        with torch.no_grad():
            for level, dims in zip(model.levels, (range(4), range(4, 16)), strict=True):
                level.W_enc.copy_(torch.eye(raw.shape[1])[:, list(dims)])
                level.b_enc.zero_()
                level.b_dec.zero_()
                level.log_threshold.fill_(math.log(0.5))
            model.activation_scale.fill_(1.0)
        model.set_parents(0, links)
        models[name] = model
    labelled = tuple(LabelledContext("t", "t", taxonomy[s].lexname, s) for s in contexts)
    names = tuple(sorted(CATEGORIES))
    labels = torch.tensor([names.index(c.label) for c in labelled])
    data = LexiconData(raw, labels, names, labelled, layer=0)
    result = taxonomy_alignment(models, data, taxonomy=taxonomy, progress=False)
    json.dumps(result)
    assert result["planted"]["all_pairs"]["hypernym"]["precision"] == 1.0
    assert result["shuffled"]["all_pairs"]["hypernym"]["precision"] == 0.0
    unlabelled = LexiconData(
        raw, labels, names, tuple(LabelledContext("t", "t", "x") for _ in contexts), 0
    )
    with pytest.raises(TaxonomyError, match="WordNet contexts"):
        taxonomy_alignment(models, unlabelled, taxonomy=taxonomy, progress=False)
