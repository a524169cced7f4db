"""The Matryoshka BatchTopK baseline: its loss against SAELens's, training, save/load, its
forest, and a run that trains it beside the HSAE and the independent baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import hsae
from hsae.cli import app
from hsae.config import ConfigError, HSAEConfig
from hsae.evaluation import evaluate
from hsae.layout import BASELINES, MODEL_NAMES
from hsae.model import HSAE, MatryoshkaSAE, load_hsae
from hsae.model.forest import UNASSIGNED
from hsae.model.hsae import LossWeights
from hsae.runs import Run, RunConfig

SIZES = [8, 16, 32, 64]
D_IN = 16
K = 4


def _config(**overrides) -> HSAEConfig:
    values = {
        "d_in": D_IN,
        "level_sizes": SIZES,
        "target_l0": K,
        "mode": "matryoshka",
        "level": "batchtopk",
        "train_tokens": 256 * 40,
        "batch_size": 256,
        "lr": 3e-3,
        "device": "cpu",
    }
    return HSAEConfig(**values | overrides)


def _random_model(seed: int = 0) -> MatryoshkaSAE:
    model = MatryoshkaSAE(_config(), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        dictionary = model.dictionary
        dictionary.W_enc.copy_(torch.randn(D_IN, SIZES[-1], generator=generator) * 0.5)
        dictionary.b_enc.copy_(torch.randn(SIZES[-1], generator=generator) * 0.1)
        dictionary.b_dec.copy_(torch.randn(D_IN, generator=generator) * 0.2)
    return model


def _saelens_twin(model: MatryoshkaSAE):
    """SAELens's MatryoshkaBatchTopKTrainingSAE with our model's weights."""
    matryoshka = pytest.importorskip("sae_lens.saes.matryoshka_batchtopk_sae")
    cfg = matryoshka.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN,
        d_sae=SIZES[-1],
        k=K,
        matryoshka_widths=list(SIZES),
        rescale_acts_by_decoder_norm=False,  # ours keeps decoder rows at unit norm instead
        decoder_init_norm=None,
        dtype="float32",
        device="cpu",
    )
    sae = matryoshka.MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(getattr(model.dictionary, name))
    return sae, matryoshka


def _saelens_loss(sae, module, x: torch.Tensor) -> torch.Tensor:
    from sae_lens.saes.sae import TrainStepInput

    step = TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=True
    )
    return sae.training_forward_pass(step).loss


def test_loss_and_gradients_equal_saelens_on_the_same_weights_and_batch() -> None:
    model = _random_model()
    sae, module = _saelens_twin(model)
    x = torch.randn(128, D_IN, generator=torch.Generator().manual_seed(5)) * 2.0
    ours = model.training_loss(x, LossWeights(torch.zeros(len(SIZES))))
    theirs = _saelens_loss(sae, module, x)
    assert ours.total.item() == pytest.approx(theirs.item(), rel=1e-5)
    # The loss is a sum over four prefixes: it must exceed the full reconstruction's error.
    assert ours.total.item() > 1.5 * ours.mse[-1].item()
    ours.total.backward()
    theirs.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        mine, reference = getattr(model.dictionary, name).grad, getattr(sae, name).grad
        assert mine is not None and reference is not None
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5, msg=name)


def test_our_dense_and_sparse_decoders_give_the_same_loss() -> None:
    model = _random_model(3)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))
    weights = LossWeights(torch.zeros(len(SIZES)))
    fused = model.training_loss(x, weights).total
    model.config = model.config.model_copy(update={"sparse_kernels": False})
    assert model.training_loss(x, weights).total.item() == pytest.approx(fused.item(), rel=1e-5)


def test_levels_are_views_of_one_dictionary_and_codes_nest() -> None:
    model = _random_model()
    assert [level.n_features for level in model.levels] == SIZES
    assert model.levels[1].W_dec.data_ptr() == model.dictionary.W_dec.data_ptr()
    assert set(model.state_dict()) == {
        "parents_0",
        "parents_1",
        "parents_2",
        "activation_scale",
        "dictionary.W_enc",
        "dictionary.W_dec",
        "dictionary.b_enc",
        "dictionary.b_dec",
        "dictionary.inference_threshold",
    }
    x = torch.randn(32, D_IN)
    codes = model.encode(x)
    for level, code in enumerate(codes):
        assert torch.equal(code, codes[-1][:, : SIZES[level]])
        torch.testing.assert_close(model.encode_level(x, level), code)
        expected = code @ model.dictionary.W_dec[: SIZES[level]] + model.dictionary.b_dec
        torch.testing.assert_close(model.decode(code, level), expected)


def test_training_reaches_its_l0_and_builds_a_forest_of_new_latents() -> None:
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(96, D_IN, generator=generator)
    mask = torch.rand(4096, 96, generator=generator) < 0.05
    x = (torch.rand(4096, 96, generator=generator) * mask) @ directions
    logs: list = []
    model = hsae.train(_config(train_tokens=256 * 120), x, progress=False, on_log=logs.append)
    assert isinstance(model, MatryoshkaSAE)
    trained = logs[-1].l0
    assert trained[-1] == pytest.approx(K)  # batch top-k over the whole dictionary
    assert trained == sorted(trained) and trained[0] < K / 2  # prefixes nest
    report = evaluate(model, x[:2048])  # inference: the learned threshold
    l0 = [level.l0 for level in report.levels]
    assert K / 2 < l0[-1] < 1.5 * K and l0 == sorted(l0)
    explained = [level.variance_explained for level in report.levels]
    assert explained[-1] > 0.35 and explained[0] > 0.05  # random weights explain < 0
    for level, links in enumerate(model.forest()):
        shared = SIZES[level]
        assert (links[:shared] == UNASSIGNED).all()  # latents already in the level above
        new_links = links[shared:]
        n_new = new_links.numel()
        assert int((new_links >= 0).sum()) == n_new - round(0.2 * n_new)  # q = 0.2 left out
        assert new_links.max() < shared


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = _random_model()
    model.set_parents(0, torch.arange(16) % 8)
    model.save(tmp_path / "m")
    loaded = load_hsae(tmp_path / "m")
    assert type(loaded) is MatryoshkaSAE and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(8, D_IN)
    assert all(torch.equal(a, b) for a, b in zip(model.encode(x), loaded.encode(x), strict=True))


def test_a_matryoshka_of_another_level_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="level must be 'batchtopk'"):
        MatryoshkaSAE(_config(level="jumprelu"))
    with pytest.raises(ConfigError, match="mode.*'matryoshka'"):
        _config(mode="nested")


def test_registry_names_agree() -> None:
    assert ("hsae", *BASELINES.values()) == MODEL_NAMES
    assert HSAE.class_for("matryoshka") is MatryoshkaSAE
    assert HSAE.class_for("independent") is HSAE


def test_run_config_baselines() -> None:
    assert RunConfig().baselines == ["independent"]
    assert RunConfig(baseline=False).baselines == []  # run.json files of earlier versions
    assert RunConfig(baseline=True).baselines == ["independent"]
    with pytest.raises(ConfigError, match="baselines.*'nested'.*'independent', 'matryoshka'"):
        RunConfig(baselines=["independent", "nested"])
    with pytest.raises(ConfigError, match="once"):
        RunConfig(baselines=["matryoshka", "matryoshka"])


def test_cli_refuses_an_unknown_baseline_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--baselines", "foo"])
    assert result.exit_code == 2
    assert "unknown baseline 'foo'" in result.output and "'matryoshka'" in result.output
    assert not out.exists()


def test_run_trains_and_evaluates_all_three_side_by_side(tmp_path: Path, small_run: Run) -> None:
    config = RunConfig(
        **small_run.config.model_dump() | {"baselines": ["independent", "matryoshka"]}
    )
    run = Run.create(tmp_path / "r", config)
    (run.folder / "activations").symlink_to(small_run.activations_dir, target_is_directory=True)
    result = CliRunner().invoke(app, ["train", "--resume", str(run.folder)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["eval", str(run.folder), "--no-lm"])
    assert result.exit_code == 0, result.output
    assert "| metric | hsae | baseline | matryoshka |" in result.output
    metrics = json.loads((run.folder / "metrics.json").read_text())
    assert len(metrics["matryoshka"]["levels"]) == 3
    assert "p_parent_given_child" in metrics["matryoshka"]["hierarchy"]
    model = hsae.load(run.folder, which="matryoshka")
    assert isinstance(model, MatryoshkaSAE) and model.config.mode == "matryoshka"
    assert model.config.level == "batchtopk"  # whatever the HSAE's level kind
    assert hsae.load(run.folder, which="hsae").config.level == small_run.load("hsae").config.level
    assert "| hsae | baseline | matryoshka |" in (run.folder / "summary.md").read_text()

    # SAELens export: each prefix is a SAELens JumpReLU SAE with the prefix's codes.
    from sae_lens import SAE

    from hsae.interop.saelens import export_saelens

    written = export_saelens(run.folder, tmp_path / "export")
    assert len(written["matryoshka"]) == 3
    x = small_run.cache().all_activations("heldout")[:64]
    for level, folder in enumerate(written["matryoshka"]):
        assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
        sae = SAE.load_from_disk(str(folder), device="cpu")
        torch.testing.assert_close(
            sae.encode(x), model.encode_level(x, level), rtol=1e-4, atol=1e-4
        )
