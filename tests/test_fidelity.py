"""Method fidelity (issue 11): each test fails on a defect a review of the method found, or on a
switch that could break without any other test noticing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hsae
from hsae.config import ConfigError, HSAEConfig
from hsae.evaluation import hierarchy_metrics
from hsae.model import HSAE
from hsae.model.forest import CoactivationTracker, rebuild_forest
from hsae.model.hsae import LossWeights
from hsae.training import Trainer
from hsae.training.data import TensorBatches
from hsae.training.sparsity import AdaptiveSparsity

BASE = {"d_in": 16, "level_sizes": [8, 16, 32], "target_l0": 4, "batch_size": 64}


def sparse_data(n: int = 12000, d: int = 16, atoms: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=generator), dim=1)
    codes = (torch.rand(n, atoms, generator=generator) < 0.06).float()
    codes *= 1 + torch.rand(n, atoms, generator=generator)
    return codes @ dictionary * 5.0


# --- 1. the sparsity controller acts on the smoothed L0 ---------------------------------------


def _literal_factor(self, smoothed, point):  # noqa: ARG001 - the paper's rule, read literally
    """lambda * (1 +- adjust) by "this batch's L0 against the trajectory point": the old rule."""
    return torch.where(self._batch > point, 1.0 + self.adjust, 1.0 - self.adjust)


def _train_and_watch(monkeypatch, literal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Train 700 steps (short, as on a laptop) and record batch L0 and log lambda per step."""
    if literal:
        real_update = AdaptiveSparsity.update

        def update(self, batch_l0):
            self._batch = batch_l0.detach().float()
            real_update(self, batch_l0)

        monkeypatch.setattr(AdaptiveSparsity, "update", update)
        monkeypatch.setattr(AdaptiveSparsity, "factor", _literal_factor)
    data = sparse_data(20000, d=32, atoms=160)
    config = HSAEConfig(
        d_in=32,
        level_sizes=[32, 64],
        target_l0=8,
        train_tokens=256 * 700,
        batch_size=256,
        lr=1e-3,
        l0_ema_momentum=0.99,
        l0_decay_rate=0.005,
        update_interval=50,
    )
    trainer = Trainer(config, TensorBatches(data, 256))
    trainer.initialise()
    l0s, log_weights = [], []
    while trainer.step < config.total_steps:
        l0s.append(trainer.train_step(exact_metrics=False).l0.tolist())
        log_weights.append(trainer.sparsity.weights.log().tolist())
    return np.array(l0s), np.array(log_weights)


def test_controller_settles_on_the_target_without_chasing_batch_noise(monkeypatch) -> None:
    ours_l0, ours_log_weight = _train_and_watch(monkeypatch, literal=False)
    monkeypatch.undo()
    literal_l0, literal_log_weight = _train_and_watch(monkeypatch, literal=True)
    tail = slice(-150, None)
    # The literal rule moves lambda by the full 3% on every step, up or down with the noise.
    literal_steps = np.abs(np.diff(literal_log_weight[tail], axis=0)).mean()
    ours_steps = np.abs(np.diff(ours_log_weight[tail], axis=0)).mean()
    assert literal_steps > 0.029
    assert ours_steps < literal_steps / 5, (ours_steps, literal_steps)
    assert ours_log_weight[tail].std(0).max() < literal_log_weight[tail].std(0).min()
    # ... and L0 still settles at the target (8) within the run, as the literal rule's does.
    assert np.abs(ours_l0[tail].mean(0) / 8 - 1).max() < 0.12, ours_l0[tail].mean(0)
    assert np.abs(literal_l0[tail].mean(0) / 8 - 1).max() < 0.12


def test_controller_raises_a_dense_level_and_lowers_a_collapsing_one() -> None:
    controller = AdaptiveSparsity(2, 10.0, 1.0, momentum=0.5, decay_rate=0.01, adjust=0.1)
    controller.update(torch.tensor([50.0, 50.0]))
    controller.update(torch.tensor([50.0, 5.0]))  # level 0 stays dense, level 1 collapses
    assert controller.weights[0] > 1.0 > controller.weights[1]
    for _ in range(3000):
        controller.update(torch.tensor([50.0, 50.0]))
    assert controller.weights[0] > 100.0  # a level that stays 5x too dense keeps rising
    # With eta = 1 - m (the defaults' ratio) the trajectory point is the target itself.
    far = AdaptiveSparsity(1, 10.0, 1.0, momentum=0.9, decay_rate=0.1, adjust=0.1)
    far.update(torch.tensor([1000.0]))
    far.update(torch.tensor([1000.0]))
    assert float(far.weights[0]) == pytest.approx(math.exp(0.1))  # far off: the capped step


def test_controller_off_keeps_lambda() -> None:
    controller = AdaptiveSparsity(1, 10.0, 1.0, 0.9, 0.01, 0.1, adaptive=False)
    for value in (50.0, 1.0, 30.0):
        controller.update(torch.tensor([value]))
    assert float(controller.weights[0]) == 1.0


# --- 2. co-activation similarity: no evidence, no parent ------------------------------------


def test_coactivation_leaves_children_that_never_cofire_unassigned() -> None:
    model = HSAE(HSAEConfig(**BASE, train_tokens=64 * 10, similarity="coactivation"))
    tracker = CoactivationTracker([8, 16, 32], momentum=0.0)
    parent = torch.zeros(4, 8, dtype=torch.bool)
    child = torch.zeros(4, 16, dtype=torch.bool)
    parent[:, 3] = True
    child[:2, 5] = True  # child 5 fires with parent 3; children 0-4, 6-15 never fire
    grandchild = torch.zeros(4, 32, dtype=torch.bool)
    tracker.update([parent, child, grandchild])
    links = rebuild_forest(list(model.levels), "coactivation", 0.0, None, tracker)
    assert links[0].tolist() == [-1] * 5 + [3] + [-1] * 10
    assert (links[1] == -1).all()


# --- 3. an HSAE always gets a forest --------------------------------------------------------


def test_update_interval_past_the_run_is_refused_up_front() -> None:
    with pytest.raises(
        ConfigError,
        match="update_interval = 100 leaves the HSAE without a forest: train_tokens = 6400",
    ):
        HSAEConfig(**BASE, train_tokens=64 * 100, update_interval=100)
    HSAEConfig(**BASE, train_tokens=64 * 100, update_interval=99)
    # The baseline builds its forest post hoc, so any interval is fine there.
    HSAEConfig(**BASE, train_tokens=64 * 100, update_interval=500, mode="independent")


# --- 4. Hamming does not reward dead features -------------------------------------------------


def test_hamming_leaves_out_silent_families_and_says_how_many() -> None:
    # Parent 0 (children 0, 1) fires; parent 1 (child 2) and its child never fire.
    parent = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    child = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    metrics = hierarchy_metrics([[parent, child]], [torch.tensor([0, 0, 1])], [2, 3])
    # Parent 0: any-child [1, 0, 1, 0] vs [1, 1, 0, 0] -> 2 disagreements in 4 tokens, union 3.
    assert metrics.hamming_per_1k == pytest.approx(500.0)
    assert metrics.hamming_normalised == pytest.approx(2 / 3)
    assert metrics.n_silent_parents == 1 and metrics.n_parents == 2
    assert metrics.per_level[0]["n_silent_parents"] == 1


def test_more_dead_parents_do_not_lower_hamming() -> None:
    parent = torch.tensor([[1], [0], [1], [0]], dtype=torch.bool)
    child = torch.tensor([[0], [1], [1], [0]], dtype=torch.bool)
    alive = hierarchy_metrics([[parent, child]], [torch.tensor([0])], [1, 1])
    dead = torch.zeros(4, 5, dtype=torch.bool)
    with_dead = hierarchy_metrics(
        [[torch.cat([parent, dead], 1), torch.cat([child, dead], 1)]],
        [torch.tensor([0, 1, 2, 3, 4, 5])],
        [6, 6],
    )
    assert with_dead.hamming_per_1k == pytest.approx(alive.hamming_per_1k)
    assert with_dead.hamming_normalised == pytest.approx(alive.hamming_normalised)
    assert with_dead.n_silent_parents == 5


# --- 5. the activation scale comes from training rows only ------------------------------------


def test_cache_scale_ignores_heldout_rows() -> None:
    from hsae.activations.cache import scale_for, training_mean_norm

    shards = [
        {"split": "train", "n_tokens": 10, "norm_sum": 40.0},
        {"split": "heldout", "n_tokens": 10, "norm_sum": 400.0},
        {"split": "train", "n_tokens": 30, "norm_sum": 120.0},
    ]
    assert training_mean_norm(shards) == pytest.approx(4.0)
    assert scale_for(16, training_mean_norm(shards)) == pytest.approx(1.0)


def test_harvested_cache_scale_matches_the_training_split(tmp_path) -> None:
    from hsae.activations import ActivationCache
    from hsae.activations.cache import FORMAT, FORMAT_VERSION, ResumePoint, ShardWriter

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": "synthetic"},
        "layer": 0,
        "d_model": 4,
        "dtype": "float32",
        "shard_tokens": 8,
        "context_length": 4,
        "config": {},
    }
    writer = ShardWriter.create(tmp_path / "c", manifest)
    meta = np.zeros((16, 4), dtype=np.int64)
    train = np.full((16, 4), 1.0, dtype=np.float32)  # norm 2
    heldout = np.full((16, 4), 10.0, dtype=np.float32)  # norm 20
    writer.append("train", train, meta, batch=0, first_row=0)
    writer.append("heldout", heldout, meta, batch=0, first_row=16)
    writer.finish(ResumePoint(0, 32))
    cache = ActivationCache(tmp_path / "c")
    assert cache.scale == pytest.approx(1.0)  # sqrt(4) / 2: the held-out rows do not count
    assert cache.manifest["scale"] == pytest.approx(1.0)


# --- 6. logged variance explained is the model's own -------------------------------------------


def test_reported_variance_explained_is_unperturbed() -> None:
    config = HSAEConfig(**BASE, train_tokens=64 * 10, perturbation_rate=1.0)
    model = HSAE(config)
    x = sparse_data(64)
    for level in model.levels:
        level.initialise_from_data(x, 4)
    model.set_parents(0, torch.arange(16) % 8)
    model.set_parents(1, torch.arange(32) % 16)
    substituted = [torch.ones(8, dtype=torch.bool), torch.ones(16, dtype=torch.bool)]
    substituted.append(torch.zeros(32, dtype=torch.bool))
    weights = LossWeights(torch.ones(3), rho=config.rho, aux=config.aux_coefficient)
    plain = model.training_loss(x, weights)
    perturbed = model.training_loss(x, weights, substituted)
    torch.testing.assert_close(perturbed.variance_explained, plain.variance_explained)
    torch.testing.assert_close(perturbed.mse, plain.mse)
    assert perturbed.total != plain.total  # the loss itself is perturbed
    cheap = model.training_loss(x, weights, substituted, exact_metrics=False)
    assert not torch.allclose(cheap.variance_explained[:2], plain.variance_explained[:2])


# --- independent mode is truly independent ----------------------------------------------------


def test_independent_mode_has_no_constraint_perturbation_or_rebuild(monkeypatch) -> None:
    import hsae.model.forest as forest_module

    rebuilds: list[int] = []
    real_rebuild = forest_module.rebuild_forest

    def counting_rebuild(*args, **kwargs):
        rebuilds.append(1)
        return real_rebuild(*args, **kwargs)

    # Every forest (the HSAE's rebuilds, the post-hoc one) comes from this one function.
    monkeypatch.setattr(forest_module, "rebuild_forest", counting_rebuild)
    config = HSAEConfig(
        **BASE, train_tokens=64 * 60, update_interval=5, mode="independent", rho=1.0
    )
    trainer = Trainer(config, TensorBatches(sparse_data(), 64))
    trainer.initialise()
    constraints, perturbations = [], []
    for _ in range(30):
        perturbations.append(trainer._draw_perturbation())
        constraints.append(float(trainer.train_step().constraint))
    assert set(constraints) == {0.0}
    assert perturbations == [None] * 30
    assert rebuilds == []  # no rebuild while training ...
    model = trainer.fit(progress=False)
    assert rebuilds == [1]  # ... only the post-hoc forest at the end
    assert any((links >= 0).any() for links in model.forest())


def test_hsae_mode_constrains_perturbs_and_rebuilds() -> None:
    config = HSAEConfig(**BASE, train_tokens=64 * 60, update_interval=5, perturbation_rate=0.5)
    trainer = Trainer(config, TensorBatches(sparse_data(), 64))
    trainer.initialise()
    outs = [trainer.train_step() for _ in range(12)]
    assert trainer.forest_updates == 2
    assert any(float(out.constraint) > 0 for out in outs[5:])
    draw = trainer._draw_perturbation()
    assert draw is not None and any(bool(d.any()) for d in draw.substituted)


# --- the dead-feature loss and the default (decoder) rebuild ---------------------------------


def test_dead_feature_loss_moves_only_dead_features_towards_the_residual() -> None:
    config = HSAEConfig(**BASE, train_tokens=64 * 10, aux_coefficient=1.0)
    model = HSAE(config)
    x = sparse_data(64)
    for level in model.levels:
        level.initialise_from_data(x, 4)
    dead = [torch.zeros(n, dtype=torch.bool) for n in config.level_sizes]
    dead[1][[2, 7]] = True
    weights = LossWeights(torch.ones(3), rho=config.rho, aux=config.aux_coefficient)
    alive_only = model.training_loss(x, weights, dead=None)
    with_dead = model.training_loss(x, weights, dead=dead)
    assert float(alive_only.aux) == 0.0 and float(with_dead.aux) > 0.0
    (with_dead.total - alive_only.total).backward()
    grad = model.levels[1].W_dec.grad
    assert grad is not None
    moved = grad.abs().sum(1) > 0
    assert moved.nonzero(as_tuple=True)[0].tolist() == [2, 7]
    assert model.levels[0].W_dec.grad is None or model.levels[0].W_dec.grad.abs().sum() == 0


def test_rebuild_with_decoder_similarity_picks_the_most_similar_decoder_row() -> None:
    model = HSAE(HSAEConfig(**BASE, train_tokens=64 * 10))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for level in model.levels:
            level.W_dec.copy_(torch.randn(level.W_dec.shape, generator=generator))
        model.normalise_decoders()
        # Child 3 is a copy of parent 6, up to scale and a little noise: it must pick it.
        model.levels[1].W_dec[3] = model.levels[0].W_dec[6] + 0.01
    links = rebuild_forest(list(model.levels), "decoder", 0.0, None)
    cosine = model.levels[1].W_dec @ model.levels[0].W_dec.t()
    assert torch.equal(links[0], cosine.argmax(1))
    assert int(links[0][3]) == 6
    encoder_links = rebuild_forest(list(model.levels), "encoder", 0.0, None)
    assert not torch.equal(encoder_links[0], links[0])  # the switch changes the answer


def test_trained_hsae_links_exist_at_defaults() -> None:
    config = HSAEConfig(**BASE, train_tokens=64 * 100, lr=3e-3)
    model = hsae.train(config, sparse_data(), progress=False)
    assert config.similarity == "decoder"
    assert all(int((links >= 0).sum()) > 0 for links in model.forest())


# --- option: a warm-up before the first rebuild -----------------------------------------------


def test_forest_warmup_delays_the_first_rebuild_then_keeps_the_interval() -> None:
    config = HSAEConfig(**BASE, train_tokens=64 * 60, update_interval=5, forest_warmup=0.25)
    assert config.first_rebuild_step == 15
    trainer = Trainer(config, TensorBatches(sparse_data(), 64))
    trainer.initialise()
    updates = []
    outs = []
    for _ in range(26):
        outs.append(trainer.train_step())
        updates.append(trainer.forest_updates)
    # No forest before step 15: the levels train as independent SAEs (no constraint).
    assert updates[13] == 0 and updates[14] == 1
    assert all(float(out.constraint) == 0 for out in outs[:15])
    assert any(float(out.constraint) > 0 for out in outs[15:])
    assert updates[19] == 2 and updates[24] == 3  # then every update_interval steps
    # The default is the paper's schedule: first rebuild after update_interval steps.
    assert HSAEConfig(**BASE, train_tokens=64 * 60, update_interval=5).first_rebuild_step == 5


def test_forest_warmup_is_validated_up_front() -> None:
    with pytest.raises(ConfigError, match=r"forest_warmup.*must lie in \[0, 1\), got 1.0"):
        HSAEConfig(**BASE, train_tokens=64 * 60, forest_warmup=1.0)
    # The last allowed share still leaves steps after the first rebuild.
    assert HSAEConfig(**BASE, train_tokens=64 * 60, forest_warmup=0.99).first_rebuild_step == 59
