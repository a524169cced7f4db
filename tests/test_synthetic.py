"""Synthetic forest generator and forest-recovery scores against its known truth."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from hsae import synthetic
from hsae.evaluation.recovery import (
    firing_forest_recovery,
    forest_recovery,
    match_by_f1,
    match_by_firing,
    match_latents,
)
from hsae.synthetic import SyntheticForest, SyntheticSpec, make_synthetic_forest

N_TOKENS = 60_000


@pytest.fixture(scope="module")
def forest() -> SyntheticForest:
    return make_synthetic_forest(SyntheticSpec())


@pytest.fixture(scope="module")
def sampled(forest: SyntheticForest) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return forest.sample_with_truth(N_TOKENS, torch.Generator().manual_seed(3))


def _true_forest(forest: SyntheticForest) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    decoders = [forest.level_directions(level) for level in range(forest.n_levels)]
    parents = [forest.true_parents(level) for level in range(forest.n_levels - 1)]
    return decoders, parents


def _split_parents(forest: SyntheticForest, level: int) -> torch.Tensor:
    """Cut-``level`` nodes with at least two children in the next cut."""
    counts = torch.bincount(forest.true_parents(level), minlength=forest.level_sizes()[level])
    return (counts >= 2).nonzero(as_tuple=True)[0]


# ------------------------------------------------------------------------------ structure
def test_default_sizes_fit_a_small_four_level_hsae(forest: SyntheticForest) -> None:
    sizes = forest.level_sizes()
    assert len(sizes) == 4
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert sizes[0] == 32  # 16 roots + 16 independent features
    assert 40 <= sizes[1] <= 80 and 80 <= sizes[2] <= 160 and 160 <= sizes[3] <= 320
    suggested = forest.suggested_level_sizes()
    assert all(s >= t and s % 16 == 0 and s - t < 16 for s, t in zip(suggested, sizes, strict=True))
    assert forest.atom_directions.shape == (sizes[-1], 64)


def test_level_sizes_consistent_with_true_parents(forest: SyntheticForest) -> None:
    sizes = forest.level_sizes()
    for level in range(forest.n_levels - 1):
        parents = forest.true_parents(level)
        assert parents.dtype == torch.long and parents.shape == (sizes[level + 1],)
        assert int(parents.min()) >= 0 and int(parents.max()) < sizes[level]
        # every node of a cut either splits or persists, so each one has a child below.
        assert torch.bincount(parents, minlength=sizes[level]).min() >= 1
    # the independent features persist unsplit: exactly 16 parents have a single child
    single = torch.bincount(forest.true_parents(0), minlength=sizes[0]) == 1
    assert int(single.sum()) == 16


def test_branching_respects_spec() -> None:
    spec = SyntheticSpec(n_roots=8, n_independent=0, branching=(3, 4), seed=5)
    forest = make_synthetic_forest(spec)
    for level in range(spec.depth - 1):
        counts = torch.bincount(forest.true_parents(level))
        assert counts.min() >= 3 and counts.max() <= 4
    assert forest.level_sizes()[0] == 8


def test_single_child_nodes_persist_and_rates_stay_exact() -> None:
    """branching=(1, 2): a node with one child does not split; its child is the same feature."""
    spec = SyntheticSpec(n_roots=24, n_independent=4, branching=[1, 2], spread=[0.6, 0.45, 0.3])
    assert spec.branching == (1, 2) and spec.spread == (0.6, 0.45, 0.3)
    forest = make_synthetic_forest(spec)
    _, truth = forest.sample_with_truth(20_000, torch.Generator().manual_seed(8))
    for level in range(forest.n_levels - 1):
        parents = forest.true_parents(level)
        only = torch.bincount(parents, minlength=forest.level_sizes()[level])[parents] == 1
        assert bool(only.any())
        upper, lower = forest.level_directions(level), forest.level_directions(level + 1)
        assert torch.allclose(lower[only], upper[parents[only]], atol=1e-6)
        assert torch.equal(truth[level + 1][:, only], truth[level][:, parents[only]])
    for level in range(forest.n_levels):
        expected = forest.level_firing_rates(level)
        observed = truth[level].double().mean(0)
        assert bool(((observed - expected).abs() <= 5 * (expected / 20_000).sqrt() + 1e-3).all())


def test_truth_directions_unit_and_children_near_their_parent(forest: SyntheticForest) -> None:
    for level in range(forest.n_levels):
        norms = forest.level_directions(level).norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    for level in range(forest.n_levels - 1):
        upper, lower = forest.level_directions(level), forest.level_directions(level + 1)
        parents = forest.true_parents(level)
        cos = lower @ upper.T
        rows = torch.arange(parents.numel())
        own = cos[rows, parents]
        cos[rows, parents] = -2.0
        assert bool((own > cos.max(dim=1).values).all())
        assert float(own.min()) > 0.7


def test_deeper_splits_are_finer(forest: SyntheticForest) -> None:
    """Sibling directions get closer with depth (spread 0.6 > 0.45 > 0.3)."""
    mean_sibling_cos = []
    for level in range(forest.n_levels - 1):
        lower, parents = forest.level_directions(level + 1), forest.true_parents(level)
        same = parents[:, None] == parents[None, :]
        same.fill_diagonal_(False)
        mean_sibling_cos.append(float((lower @ lower.T)[same].mean()))
    assert mean_sibling_cos[0] < mean_sibling_cos[1] < mean_sibling_cos[2]


# ------------------------------------------------------------------------------- sampling
def test_children_fire_only_with_parent_and_parent_iff_some_child(
    forest: SyntheticForest, sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = sampled
    for level in range(forest.n_levels - 1):
        parents = forest.true_parents(level)
        child_fires, parent_fires = truth[level + 1], truth[level]
        assert not bool((child_fires & ~parent_fires[:, parents]).any())
        any_child = torch.zeros_like(parent_fires, dtype=torch.int32)
        any_child.index_add_(1, parents, child_fires.to(torch.int32))
        assert torch.equal(any_child > 0, parent_fires)


def test_sibling_cofiring_close_to_overlap(forest: SyntheticForest) -> None:
    for overlap in (0.0, 0.3):
        spec = replace(forest.spec, sibling_overlap=overlap)
        local = make_synthetic_forest(spec)
        _, truth = local.sample_with_truth(30_000, torch.Generator().manual_seed(4))
        for level in range(local.n_levels - 1):
            parents = local.true_parents(level)
            split = _split_parents(local, level)
            n_children_firing = torch.zeros_like(truth[level], dtype=torch.int32)
            n_children_firing.index_add_(1, parents, truth[level + 1].to(torch.int32))
            fired = truth[level][:, split]
            several = (n_children_firing[:, split] >= 2)[fired]
            assert n_children_firing.max() <= 2  # at most two children per firing parent
            assert abs(float(several.float().mean()) - overlap) < 0.02


def test_firing_rates_match_exact_probabilities(
    forest: SyntheticForest, sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = sampled
    for level in range(forest.n_levels):
        expected = forest.level_firing_rates(level)
        observed = truth[level].double().mean(0)
        tolerance = 5 * (expected * (1 - expected) / N_TOKENS).sqrt() + 1e-4
        assert bool(((observed - expected).abs() <= tolerance).all())
    leaves_per_token = truth[-1].sum(1).double().mean()
    assert abs(float(leaves_per_token) - forest.spec.active_per_token) < 0.1
    # frequencies are heavy-tailed: the commonest leaf fires far more often than the rarest
    rates = forest.level_firing_rates(forest.n_levels - 1)
    assert float(rates.max() / rates.min()) > 10


@pytest.mark.parametrize("chunk_tokens", [None, 1024])
def test_activations_are_the_sum_of_active_leaves(
    forest: SyntheticForest, chunk_tokens: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also across token chunks: rows of x and of the truth must stay aligned."""
    quiet = make_synthetic_forest(replace(forest.spec, noise_std=0.0, magnitude_sigma=0.0))
    if chunk_tokens is not None:
        monkeypatch.setattr(synthetic, "CHUNK_ENTRIES", chunk_tokens * quiet.n_atoms)
    x, truth = quiet.sample_with_truth(4500, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (4500, 64)
    expected = truth[-1].float() @ quiet.atom_directions
    assert torch.allclose(x, expected, atol=1e-5)
    assert bool(truth[0][-100:].any())


def test_magnitudes_are_lognormal_around_one(forest: SyntheticForest) -> None:
    """One active leaf at a time: the code along it is the magnitude."""
    spec = replace(forest.spec, noise_std=0.0, active_per_token=0.05)
    single = make_synthetic_forest(spec)
    x, truth = single.sample_with_truth(40_000, torch.Generator().manual_seed(2))
    one = truth[-1].sum(1) == 1
    leaf = truth[-1][one].float().argmax(1)
    magnitude = (x[one] * single.atom_directions[leaf]).sum(1)
    log_m = magnitude.log()
    assert abs(float(log_m.median())) < 0.05
    assert abs(float(log_m.std()) - spec.magnitude_sigma) < 0.05


def test_sampling_is_deterministic_given_a_generator(forest: SyntheticForest) -> None:
    a = forest.sample(5000, torch.Generator().manual_seed(11))
    b, truth = forest.sample_with_truth(5000, torch.Generator().manual_seed(11))
    c = forest.sample(5000, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    again = make_synthetic_forest(SyntheticSpec())
    assert torch.equal(again.atom_directions, forest.atom_directions)
    assert torch.equal(again.sample(5000, torch.Generator().manual_seed(11)), a)
    other = make_synthetic_forest(SyntheticSpec(seed=1))
    assert not torch.equal(other.atom_directions, forest.atom_directions)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d": 1}, "d"),
        ({"n_roots": -1}, "n_roots"),
        ({"n_roots": 0, "n_independent": 0}, "n_roots + n_independent"),
        ({"depth": 0}, "depth"),
        ({"branching": (3, 2)}, "branching"),
        ({"branching": (0, 2)}, "branching"),
        ({"active_per_token": 0.0}, "active_per_token"),
        ({"sibling_overlap": 1.5}, "sibling_overlap"),
        ({"spread": (0.5, 0.4)}, "spread"),
        ({"spread": (0.5, -0.1, 0.3)}, "spread"),
        ({"magnitude_sigma": -0.1}, "magnitude_sigma"),
        ({"noise_std": float("nan")}, "noise_std"),
        ({"frequency_sigma": -1.0}, "frequency_sigma"),
        ({"seed": 1.5}, "seed"),
        ({"kind": "merging"}, "kind"),
        ({"parent_share": -0.5}, "parent_share"),
        ({"descend_probability": 1.2}, "descend_probability"),
        ({"exclusive_share": -0.1}, "exclusive_share"),
        ({"zipf_exponent": 0.0}, "zipf_exponent"),
    ],
)
def test_spec_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=r"^" + field.replace("+", r"\+")):
        SyntheticSpec(**changes)  # type: ignore[arg-type]


def test_unreachable_density_is_refused() -> None:
    spec = SyntheticSpec(n_roots=0, n_independent=4, depth=1, spread=(), active_per_token=5.0)
    with pytest.raises(ValueError, match="active_per_token"):
        make_synthetic_forest(spec)


def test_depth_one_forest_is_independent_features() -> None:
    spec = SyntheticSpec(n_roots=3, n_independent=2, depth=1, spread=(), active_per_token=1.0)
    forest = make_synthetic_forest(spec)
    assert forest.level_sizes() == [5]
    x, truth = forest.sample_with_truth(1000, torch.Generator().manual_seed(0))
    assert x.shape == (1000, 64) and truth[0].shape == (1000, 5)


@pytest.mark.slow
def test_sampling_one_million_tokens_is_fast(forest: SyntheticForest) -> None:
    import time

    start = time.perf_counter()
    x = forest.sample(1_000_000, torch.Generator().manual_seed(0))
    elapsed = time.perf_counter() - start
    assert x.shape == (1_000_000, 64) and bool(torch.isfinite(x).all())
    assert elapsed < 60.0, f"1M tokens took {elapsed:.1f} s"


# ------------------------------------------------------------------------------- recovery
def test_true_forest_recovers_perfectly_and_permutation_is_undone(
    forest: SyntheticForest,
) -> None:
    decoders, parents = _true_forest(forest)
    generator = torch.Generator().manual_seed(0)
    perms = [torch.randperm(d.shape[0], generator=generator) for d in decoders]
    inverse = [torch.argsort(p) for p in perms]
    # learned row i of level l is truth row perms[l][i]; remap the links accordingly.
    shuffled = [d[p] for d, p in zip(decoders, perms, strict=True)]
    links = [inverse[level][parents[level][perms[level + 1]]] for level in range(len(parents))]
    report = forest_recovery(shuffled, links, forest)
    assert report.edge_precision == 1.0 and report.edge_recall == 1.0
    assert report.node_recovery == 1.0
    for level, perm in enumerate(perms):
        matching = match_latents(shuffled[level], decoders[level])
        assert torch.equal(perm[matching.learned_idx], matching.truth_idx)
        assert matching.mean_cosine == pytest.approx(1.0, abs=1e-6)
    text = json.dumps(report.to_dict())
    assert '"edge_precision": 1.0' in text


def test_shuffled_links_give_low_precision(forest: SyntheticForest) -> None:
    decoders, parents = _true_forest(forest)
    generator = torch.Generator().manual_seed(1)
    shuffled = [p[torch.randperm(p.numel(), generator=generator)] for p in parents]
    report = forest_recovery(decoders, shuffled, forest)
    assert report.node_recovery == 1.0
    assert report.edge_precision < 0.2 and report.edge_recall < 0.2
    assert report.edge_precision == pytest.approx(report.edge_recall)  # one link per child


def test_missing_links_lower_recall_not_precision(forest: SyntheticForest) -> None:
    decoders, parents = _true_forest(forest)
    halved = [p.clone() for p in parents]
    for links in halved:
        links[::2] = -1
    report = forest_recovery(decoders, halved, forest)
    assert report.edge_precision == 1.0
    assert 0.45 < report.edge_recall < 0.55


def test_unrecovered_nodes_are_not_judged(forest: SyntheticForest) -> None:
    decoders, parents = _true_forest(forest)
    noisy = [d.clone() for d in decoders]
    noisy[1] = torch.randn(noisy[1].shape, generator=torch.Generator().manual_seed(2))
    report = forest_recovery(noisy, parents, forest, min_cosine=0.7)
    assert report.levels[1].recovery < 0.1 and report.levels[0].recovery == 1.0
    assert report.edges[0].n_learned_judged == report.levels[1].n_recovered
    assert report.edges[2].precision == 1.0 and report.edges[2].recall == 1.0
    assert report.levels[1].n_truth == forest.level_sizes()[1]


def test_fewer_learned_latents_than_truth(forest: SyntheticForest) -> None:
    decoders, parents = _true_forest(forest)
    keep = torch.arange(0, decoders[3].shape[0], 2)
    report = forest_recovery(
        decoders[:3] + [decoders[3][keep]], parents[:2] + [parents[2][keep]], forest
    )
    assert report.levels[3].n_recovered == keep.numel()
    assert report.edges[2].precision == 1.0 and report.edges[2].recall == 1.0
    assert report.levels[3].recovery == pytest.approx(keep.numel() / decoders[3].shape[0])


def test_recovery_rejects_bad_forest(forest: SyntheticForest) -> None:
    decoders, parents = _true_forest(forest)
    with pytest.raises(ValueError, match="decoders"):
        forest_recovery(decoders[:3], parents[:2], forest)
    bad = [p.clone() for p in parents]
    bad[0][0] = forest.level_sizes()[0]
    with pytest.raises(ValueError, match=r"parents\[0\]"):
        forest_recovery(decoders, bad, forest)


def test_hungarian_beats_greedy() -> None:
    truth = torch.eye(4)[:2]
    learned = torch.tensor([[0.7, 0.65, 0.296, 0.0], [0.6, 0.1, 0.0, 0.794]])
    cos = torch.nn.functional.normalize(learned, dim=1) @ truth.T
    # greedy: take the single best pair (row 0, truth 0), then row 1 gets truth 1 (0.1)
    greedy_total = float(cos[0, 0] + cos[1, 1])
    matching = match_latents(learned, truth)
    assert matching.learned_idx.tolist() == [1, 0] and matching.truth_idx.tolist() == [0, 1]
    assert 2 * matching.mean_cosine > greedy_total + 0.4
    assert bool((matching.cosine > 0.59).all())


def test_match_by_firing_finds_the_truth_firing_patterns(
    forest: SyntheticForest, sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = sampled
    fires = truth[2]
    perm = torch.randperm(fires.shape[1], generator=torch.Generator().manual_seed(0))
    codes = fires[:, perm].float() * 2.5
    matching = match_by_firing(codes, fires)
    assert torch.equal(perm[matching.learned_idx], matching.truth_idx)
    assert matching.mean_jaccard == pytest.approx(1.0)
    assert matching.mean_f1 == pytest.approx(1.0)
    # dropping half of a latent's firings: Jaccard 0.5, F1 2/3
    thinned = codes.clone()
    thinned[::2, :] = 0.0
    half = match_by_firing(thinned, fires)
    assert torch.equal(perm[half.learned_idx], half.truth_idx)
    assert half.mean_jaccard == pytest.approx(0.5, abs=0.03)
    assert half.mean_f1 == pytest.approx(2 / 3, abs=0.03)


def test_to_dict_maps_undefined_ratios_to_none(forest: SyntheticForest) -> None:
    decoders, parents = _true_forest(forest)
    nothing = [torch.full_like(p, -1) for p in parents]
    report = forest_recovery(decoders, nothing, forest)
    assert math.isnan(report.edge_precision) and report.edge_recall == 0.0
    summary = report.to_dict()
    assert summary["edge_precision"] is None and summary["edge_recall"] == 0.0
    json.dumps(summary, allow_nan=False)


# ---------------------------------------------------------------------- absorption family
@pytest.fixture(scope="module")
def absorbing() -> SyntheticForest:
    return make_synthetic_forest(SyntheticSpec.absorption())


@pytest.fixture(scope="module")
def absorbing_sampled(absorbing: SyntheticForest) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return absorbing.sample_with_truth(N_TOKENS, torch.Generator().manual_seed(5))


def _new_at(forest: SyntheticForest, level: int) -> torch.Tensor:
    """Cut-``level + 1`` nodes that are not in cut ``level`` (their true parent is another)."""
    parents = forest.true_parents(level)
    sizes = forest.level_sizes()
    lower, upper = forest.level_directions(level + 1), forest.level_directions(level)
    same = (lower[:, None, :] == upper[None, :, :]).all(-1)  # a persisting node keeps its row
    persisting = same[torch.arange(sizes[level + 1]), parents]
    return ~persisting


def test_absorption_preset_and_cumulative_truth(absorbing: SyntheticForest) -> None:
    spec = absorbing.spec
    assert spec.kind == "absorption" and SyntheticSpec.absorption(seed=3).seed == 3
    sizes = absorbing.level_sizes()
    assert sizes[0] == spec.n_roots + spec.n_independent
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert absorbing.n_atoms == sizes[-1]  # every node is an atom; the last cut holds them all
    for level in range(absorbing.n_levels - 1):
        parents, new = absorbing.true_parents(level), _new_at(absorbing, level)
        # the persisting nodes of the wider level are the whole coarser level, in order
        assert int((~new).sum()) == sizes[level]
        assert torch.equal(parents[~new], torch.arange(sizes[level]))
        # every new node has a parent that is itself new at the level above (or a root)
        assert int(new.sum()) == sizes[level + 1] - sizes[level]
        if level > 0:
            assert bool(_new_at(absorbing, level - 1)[parents[new]].all())


def test_absorption_children_point_their_own_way(absorbing: SyntheticForest) -> None:
    share = absorbing.spec.parent_share
    expected = share / math.sqrt(1 + share**2)
    for level in range(absorbing.n_levels - 1):
        upper, lower = absorbing.level_directions(level), absorbing.level_directions(level + 1)
        parents, new = absorbing.true_parents(level), _new_at(absorbing, level)
        cos = (lower[new] * upper[parents[new]]).sum(1)
        assert abs(float(cos.mean()) - expected) < 0.08
        assert float(cos.max()) < 0.75  # far from the splitting family's > 0.7 for every child
        norms = lower.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_absorption_children_fire_only_with_parent_which_can_fire_alone(
    absorbing: SyntheticForest, absorbing_sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = absorbing_sampled
    for level in range(absorbing.n_levels - 1):
        parents, new = absorbing.true_parents(level), _new_at(absorbing, level)
        child_fires, parent_fires = truth[level + 1], truth[level]
        assert not bool((child_fires & ~parent_fires[:, parents]).any())
        # a persisting node fires exactly as at the coarser level
        assert torch.equal(child_fires[:, ~new], parent_fires)
        new_children = new.nonzero(as_tuple=True)[0]
        hits = torch.zeros_like(parent_fires, dtype=torch.int32)
        hits.index_add_(1, parents[new_children], child_fires[:, new_children].to(torch.int32))
        has_children = torch.bincount(parents[new_children], minlength=parent_fires.shape[1]) > 0
        fired = parent_fires[:, has_children]
        alone = (hits[:, has_children] == 0)[fired]
        assert abs(float(alone.float().mean()) - (1 - absorbing.spec.descend_probability)) < 0.02


def test_absorption_exclusive_siblings_never_cofire(
    absorbing: SyntheticForest, absorbing_sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = absorbing_sampled
    seen_exclusive = seen_overlapping = 0
    for level in range(absorbing.n_levels - 1):
        parents, new = absorbing.true_parents(level), _new_at(absorbing, level)
        new_children = new.nonzero(as_tuple=True)[0]
        counts = torch.bincount(parents[new_children], minlength=truth[level].shape[1])
        hits = torch.zeros_like(truth[level], dtype=torch.int32)
        hits.index_add_(1, parents[new_children], truth[level + 1][:, new_children].to(torch.int32))
        # nodes whose children are new at the next level (the others split higher up)
        exclusive = absorbing.exclusive_parents(level) & (counts >= 1)
        assert not bool((hits[:, exclusive] > 1).any())
        overlapping = ~absorbing.exclusive_parents(level) & (counts >= 2)
        descended = hits[:, overlapping] >= 1
        several = (hits[:, overlapping] >= 2)[descended]
        if several.numel():
            assert abs(float(several.float().mean()) - absorbing.spec.sibling_overlap) < 0.03
        seen_exclusive += int((exclusive & (counts >= 2)).sum())
        seen_overlapping += int(overlapping.sum())
    assert seen_exclusive >= 5 and seen_overlapping >= 5


def test_absorption_rates_exact_and_zipf(
    absorbing: SyntheticForest, absorbing_sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = absorbing_sampled
    for level in range(absorbing.n_levels):
        expected = absorbing.level_firing_rates(level)
        observed = truth[level].double().mean(0)
        tolerance = 5 * (expected * (1 - expected) / N_TOKENS).sqrt() + 1e-4
        assert bool(((observed - expected).abs() <= tolerance).all())
    atoms_per_token = truth[-1].sum(1).double().mean()
    assert abs(float(atoms_per_token) - absorbing.spec.active_per_token) < 0.05
    units = absorbing.unit_probability  # Zipf: sorted rates are rank ** -s, scaled
    ranked = units.sort(descending=True).values
    ranks = torch.arange(1, units.numel() + 1, dtype=torch.float64)
    assert torch.allclose(ranked / ranked[0], ranks**-absorbing.spec.zipf_exponent)
    rates = absorbing.level_firing_rates(absorbing.n_levels - 1)
    assert float(rates.max() / rates.min()) > 100


def test_absorption_activations_include_every_firing_node(absorbing: SyntheticForest) -> None:
    quiet = make_synthetic_forest(replace(absorbing.spec, noise_std=0.0, magnitude_sigma=0.0))
    x, truth = quiet.sample_with_truth(3000, torch.Generator().manual_seed(0))
    assert torch.allclose(x, truth[-1].float() @ quiet.atom_directions, atol=1e-5)
    # a token where a child fires carries its parent's direction too
    parents, new = quiet.true_parents(0), _new_at(quiet, 0)
    child = new.nonzero(as_tuple=True)[0][0]
    token = truth[1][:, child].nonzero(as_tuple=True)[0][0]
    assert bool(truth[0][token, parents[child]])


def test_ancestor_or_self(forest: SyntheticForest, absorbing: SyntheticForest) -> None:
    for level in range(forest.n_levels - 1):  # splitting: exactly the true parent
        expected = torch.nn.functional.one_hot(
            forest.true_parents(level), forest.level_sizes()[level]
        ).bool()
        assert torch.equal(forest.ancestor_or_self(level), expected)
        # only the independent features persist unsplit at every level
        assert int(forest.same_as_parent(level).sum()) == forest.spec.n_independent
    for level in range(absorbing.n_levels - 1):
        mask, parents = absorbing.ancestor_or_self(level), absorbing.true_parents(level)
        assert torch.equal(absorbing.same_as_parent(level), ~_new_at(absorbing, level))
        rows = torch.arange(parents.numel())
        assert bool(mask[rows, parents].all())
        grandparents = parents[_new_at(absorbing, level)]
        n_ancestors = mask.sum(1)
        assert int(n_ancestors.min()) >= 1
        if level == 0:
            assert int(n_ancestors.max()) == 1  # roots have no ancestor
        else:  # new nodes of depth level + 2 also reach their grandparent (and higher)
            assert int(n_ancestors[_new_at(absorbing, level)].min()) == level + 1
            assert grandparents.numel() > 0


# ------------------------------------------------------------------ firing-F1 recovery
def _planted(
    forest: SyntheticForest, truth: list[torch.Tensor], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Truth firing as codes with latents permuted, the true links remapped; and the perms."""
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(fired.shape[1], generator=generator) for fired in truth]
    inverse = [torch.argsort(p) for p in perms]
    codes = [fired[:, p].float() * 1.7 for fired, p in zip(truth, perms, strict=True)]
    links = [
        inverse[level][forest.true_parents(level)[perms[level + 1]]]
        for level in range(forest.n_levels - 1)
    ]
    return codes, links, perms


@pytest.mark.parametrize("family", ["splitting", "absorption"])
def test_firing_recovery_of_a_planted_forest_is_perfect(
    family: str,
    forest: SyntheticForest,
    sampled: tuple[torch.Tensor, list[torch.Tensor]],
    absorbing: SyntheticForest,
    absorbing_sampled: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    local, (_, truth) = (
        (forest, sampled) if family == "splitting" else (absorbing, absorbing_sampled)
    )
    codes, links, perms = _planted(local, truth, 0)
    report = firing_forest_recovery(codes, links, truth, local)
    assert report.node_recovery == 1.0
    assert report.edge_precision_strict == 1.0 and report.edge_precision_lenient == 1.0
    assert report.edge_recall == 1.0 and report.edge_recall_lenient == 1.0
    assert report.edge_recall_overall == 1.0
    assert report.split_edge_precision == 1.0 and report.split_edge_recall == 1.0
    matching = match_by_f1(codes[2], truth[2])
    assert torch.equal(perms[2][matching.learned_idx], matching.truth_idx)
    summary = report.to_dict()
    json.dumps(summary, allow_nan=False)
    assert summary["edge_precision_strict"] == 1.0


@pytest.mark.parametrize("family", ["splitting", "absorption"])
def test_firing_recovery_of_shuffled_links_is_low(
    family: str,
    forest: SyntheticForest,
    sampled: tuple[torch.Tensor, list[torch.Tensor]],
    absorbing: SyntheticForest,
    absorbing_sampled: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    local, (_, truth) = (
        (forest, sampled) if family == "splitting" else (absorbing, absorbing_sampled)
    )
    codes, links, _ = _planted(local, truth, 1)
    generator = torch.Generator().manual_seed(2)
    shuffled = [p[torch.randperm(p.numel(), generator=generator)] for p in links]
    report = firing_forest_recovery(codes, shuffled, truth, local)
    assert report.node_recovery == 1.0
    assert report.edge_precision_strict < 0.2 and report.edge_recall < 0.2
    assert report.edge_precision_lenient < 0.35


def test_firing_recovery_lenient_accepts_a_grandparent(
    absorbing: SyntheticForest, absorbing_sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    """Linking new depth-3 nodes to their grandparent: strictly wrong, leniently right."""
    _, truth = absorbing_sampled
    links = [absorbing.true_parents(level).clone() for level in range(absorbing.n_levels - 1)]
    new = _new_at(absorbing, 1)
    # the parent's parent in cut 0, then that root's (persisting) row in cut 1
    root_in_cut0 = links[0][links[1][new]]
    root_rows_in_cut1 = (~_new_at(absorbing, 0)).nonzero(as_tuple=True)[0]
    links[1][new] = root_rows_in_cut1[root_in_cut0]
    report = firing_forest_recovery(truth, links, truth, absorbing)
    edge = report.edges[1]
    assert edge.n_learned_judged == links[1].numel()
    assert edge.n_strict_correct == int((~new).sum())
    assert edge.n_lenient_correct == links[1].numel()
    assert edge.recall == pytest.approx(float((~new).float().mean()))
    assert edge.recall_lenient == 1.0
    # the split links (new nodes) are all strictly wrong, the persisting ones all right
    assert edge.n_split_learned_judged == int(new.sum()) and edge.n_split_strict_correct == 0
    assert edge.n_split_true_judged == int(new.sum()) and edge.n_split_true_found == 0
    assert report.edges[2].n_split_strict_correct == report.edges[2].n_split_learned_judged > 0
    assert report.edges[0].precision_strict == 1.0 and report.edges[2].precision_strict == 1.0


def test_firing_recovery_threshold_and_unmatched_latents(
    forest: SyntheticForest, sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = sampled
    codes = [fired.float() for fired in truth]
    parents = [forest.true_parents(level) for level in range(forest.n_levels - 1)]
    thinned = [c.clone() for c in codes]
    thinned[1][::2] = 0.0  # level 1 fires on half of its truth tokens: F1 = 2/3
    kept = firing_forest_recovery(thinned, parents, truth, forest, min_f1=0.5)
    dropped = firing_forest_recovery(thinned, parents, truth, forest, min_f1=0.7)
    assert kept.levels[1].recovery == 1.0
    assert kept.levels[1].mean_matched_f1 == pytest.approx(2 / 3, abs=0.02)
    assert dropped.levels[1].n_matched == 0 and dropped.levels[0].recovery == 1.0
    assert dropped.edges[0].n_learned_judged == 0 and dropped.edges[1].n_true_judged == 0
    assert math.isnan(dropped.edges[0].precision_strict)
    assert dropped.edge_recall_overall == pytest.approx(
        parents[2].numel() / sum(p.numel() for p in parents)
    )
    # latents firing at random match nothing
    noise = [torch.rand(c.shape, generator=torch.Generator().manual_seed(9)) < 0.3 for c in codes]
    report = firing_forest_recovery(noise, parents, truth, forest)
    assert report.node_recovery < 0.05


def test_firing_recovery_rejects_bad_input(
    forest: SyntheticForest, sampled: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    _, truth = sampled
    parents = [forest.true_parents(level) for level in range(forest.n_levels - 1)]
    with pytest.raises(ValueError, match="min_f1"):
        firing_forest_recovery(truth, parents, truth, forest, min_f1=0.0)
    with pytest.raises(ValueError, match="truth_fire"):
        firing_forest_recovery(truth, parents, truth[:3], forest)
    with pytest.raises(ValueError, match="same tokens"):
        firing_forest_recovery([t[:100] for t in truth], parents, truth, forest)
    bad = [p.clone() for p in parents]
    bad[1][0] = forest.level_sizes()[1]
    with pytest.raises(ValueError, match=r"parents\[1\]"):
        firing_forest_recovery(truth, bad, truth, forest)
