"""Level kinds (jumprelu, topk, batchtopk): the registry, training to each kind's L0, save/load,
and SAELens/SAEBench export checked with the real sae_lens. The constraint, the perturbation and
the fused paths are checked against naive references for every kind in tests/test_model.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hsae
from hsae import HSAE, HSAEConfig
from hsae.config import ConfigError
from hsae.evaluation import evaluate
from hsae.interop import InteropError
from hsae.interop.saebench import SAEBenchSAE
from hsae.interop.saelens import (
    Provenance,
    export_model_saelens,
    load_saelens_export,
    read_saelens,
)
from hsae.model import LEVEL_KINDS, BatchTopKLevel, JumpReLULevel, TopKLevel, load_hsae
from hsae.model import forest as forest_ops
from hsae.model.hsae import LossWeights
from hsae.model.levels import batchtopk
from hsae.model.levels.topk import TopKLevel as TopKLevelFromFile

KINDS = ["jumprelu", "topk", "batchtopk"]
BASE = {"d_in": 16, "level_sizes": [8, 16, 32], "target_l0": 4, "batch_size": 64}
SCALE = 0.004
TOL = 1e-4
PROVENANCE = Provenance(model_name="gpt2", layer=3, context_size=64)


def sparse_data(n: int = 20000, d: int = 16, atoms: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=generator), dim=1)
    codes = (torch.rand(n, atoms, generator=generator) < 0.06).float()
    codes *= 1 + torch.rand(n, atoms, generator=generator)
    return codes @ dictionary * 5.0


def error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max(1, max |theirs|) (as in tests/test_interop.py)."""
    return float((ours - theirs).detach().abs().max() / theirs.detach().abs().max().clamp(min=1.0))


def random_model(kind: str, seed: int = 0) -> HSAE:
    """An HSAE of ``kind`` with random weights, a realistic scale and a forest."""
    config = HSAEConfig(**BASE, level=kind, activation_scale=SCALE, seed=seed)
    model = HSAE(config)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for level in model.levels:
            level.W_enc.copy_(torch.randn(level.W_enc.shape, generator=generator) * 0.5)
            level.b_enc.copy_(torch.randn(level.b_enc.shape, generator=generator) * 0.1)
            level.b_dec.copy_(torch.randn(level.b_dec.shape, generator=generator) * 0.5)
            if isinstance(level, JumpReLULevel):
                thresholds = torch.empty(level.n_features).uniform_(0.05, 0.5, generator=generator)
                level.log_threshold.copy_(thresholds.log())
            if isinstance(level, BatchTopKLevel):
                level.inference_threshold.fill_(0.4)
        model.activation_scale.fill_(SCALE)
        links = forest_ops.rebuild_forest(list(model.levels), "encoder", 0.25, None)
        for index, level_links in enumerate(links):
            model.set_parents(index, level_links)
    return model.eval()


def raw_activations(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, BASE["d_in"], generator=torch.Generator().manual_seed(seed)) / SCALE


# --- registry and configuration ------------------------------------------------------------


def test_registry_names_each_kind_and_the_model_builds_levels_through_it(monkeypatch) -> None:
    assert list(LEVEL_KINDS) == KINDS
    assert TopKLevelFromFile is TopKLevel
    for kind, cls in LEVEL_KINDS.items():
        model = HSAE(HSAEConfig(**BASE, level=kind))
        assert all(type(level) is cls and level.kind == kind for level in model.levels)

    class WideTopK(TopKLevel):
        kind = "widetopk"

    monkeypatch.setitem(LEVEL_KINDS, "widetopk", WideTopK)  # one registration line
    model = HSAE(HSAEConfig(**BASE, level="widetopk"))
    assert all(type(level) is WideTopK for level in model.levels)


def test_unknown_level_kind_is_refused_in_one_line_naming_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        HSAEConfig(**BASE, level="relu")
    message = str(caught.value)
    assert "\n" not in message and "level" in message
    assert all(repr(kind) in message for kind in KINDS)
    assert HSAEConfig(**BASE).level == "jumprelu"


def test_jumprelu_parameter_names_are_unchanged_and_older_saves_load(tmp_path: Path) -> None:
    model = random_model("jumprelu")
    names = {name.split(".", 2)[-1] for name in model.state_dict() if name.startswith("levels.")}
    assert names == {"W_dec", "W_enc", "b_enc", "b_dec", "log_threshold"}
    model.save(tmp_path / "m")
    # A model saved before level kinds existed has no "level" in its config.
    config_path = tmp_path / "m" / "hsae_config.json"
    payload = json.loads(config_path.read_text())
    del payload["config"]["level"]
    config_path.write_text(json.dumps(payload))
    loaded = load_hsae(tmp_path / "m")
    assert loaded.config.level == "jumprelu"
    x = raw_activations()
    for a, b in zip(model.encode(x), loaded.encode(x), strict=True):
        assert torch.equal(a, b)


def test_topk_kinds_have_no_sparsity_penalty_but_jumprelu_does() -> None:
    x = sparse_data(256)
    for kind in KINDS:
        model = HSAE(HSAEConfig(**BASE, level=kind))
        for level in model.levels:
            level.initialise_from_data(x, 4)
        low = model.training_loss(x, LossWeights(torch.zeros(3))).total
        high = model.training_loss(x, LossWeights(torch.full((3,), 100.0))).total
        assert (float(high) > float(low) + 1.0) == (kind == "jumprelu"), kind


# --- training reaches each kind's L0 ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_training_reaches_the_kinds_sparsity(kind: str) -> None:
    """TopK: at most k per token; BatchTopK: k on average. (JumpReLU: tests/test_training.py.)"""
    data = sparse_data()
    config = HSAEConfig(
        **(BASE | {"train_tokens": 64 * 300, "lr": 3e-3, "level": kind}),
        l0_ema_momentum=0.9,
        l0_decay_rate=0.01,
    )
    logs = []
    model = hsae.train(config, data[:16000], progress=False, on_log=logs.append)
    result = evaluate(model, data[16000:])
    counts = [(codes > 0).sum(1) for codes in model.encode(data[16000:])]
    k = config.target_l0
    for level in result.levels:
        assert level.variance_explained > 0.3, level
    # Neither the sparsity controller nor lambda * L0: the logged weights are 0.
    assert logs[-1].sparsity_weight == [0.0, 0.0, 0.0]
    if kind == "topk":
        for count in counts:
            assert int(count.max()) == k  # never more than k
            assert float(count.float().mean()) >= 0.9 * k
        # Fewer than k only where a token has fewer than k positive pre-activations.
        assert float((counts[-1] == k).float().mean()) >= 0.99
        assert all(k * 0.9 <= value <= k for value in logs[-1].l0)
    else:
        # Training: k x batch entries over the batch, so exactly k per token on average.
        assert logs[-1].l0 == pytest.approx([k, k, k], abs=0.05)
        assert max(int(count.max()) for count in counts) > k  # per token, it varies
        # Inference with the learned threshold lands close to k.
        for level in result.levels:
            assert 0.75 * k <= level.l0 <= 1.33 * k, level
        assert all(float(level.inference_threshold) > 0 for level in model.levels)


def test_batchtopk_threshold_is_a_running_average_of_the_smallest_selected_activation() -> None:
    model = HSAE(HSAEConfig(**BASE, level="batchtopk"))
    level = model.levels[1]
    x = sparse_data(64) * 0.5
    level.inference_threshold.fill_(0.3)
    pre = level.pre_activations(x).detach()
    n_selected = round(4 * 64)
    smallest = pre.relu().flatten().topk(n_selected).values.min()
    codes = level.encode_for_training(x, 0.3, fused=True)
    momentum = batchtopk.THRESHOLD_MOMENTUM
    expected = momentum * 0.3 + (1 - momentum) * float(smallest)
    assert float(level.inference_threshold) == pytest.approx(expected, rel=1e-6)
    assert int((codes.acts > 0).sum()) == n_selected
    level.eval()
    level.encode_for_training(x, 0.3, fused=True)
    assert float(level.inference_threshold) == pytest.approx(expected, rel=1e-6)  # eval: kept
    inference = level.encode(x)
    torch.testing.assert_close(inference, pre * (pre > expected))


# --- save/load and export ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind: str, tmp_path: Path) -> None:
    model = random_model(kind)
    model.save(tmp_path / "m")
    loaded = load_hsae(tmp_path / "m")
    assert loaded.config == model.config and loaded.config.level == kind
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = raw_activations()
    for a, b in zip(model.encode(x), loaded.encode(x), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_levels_load_in_sae_lens_and_encode_and_decode_the_same(
    kind: str, tmp_path: Path
) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    model = random_model(kind)
    folders = export_model_saelens(model, tmp_path / "out", PROVENANCE)
    x = raw_activations()
    expected_class = sae_lens.TopKSAE if kind == "topk" else sae_lens.JumpReLUSAE
    for level, folder in enumerate(folders):
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["metadata"]["hsae"]["level_kind"] == kind
        sae = sae_lens.SAE.load_from_disk(folder)
        assert type(sae) is expected_class
        ours = model.encode_level(x, level)
        theirs = sae.encode(x)
        assert 0.05 < float((ours > 0).float().mean()) < 0.9  # a nontrivial active set
        assert torch.equal(theirs > 0, ours > 0)
        assert error(theirs, ours) < TOL
        assert error(sae.decode(theirs), model.decode(ours, level)) < TOL
        assert error(sae(x), model.reconstruct(x)[level]) < TOL
        if kind == "topk":
            assert sae.cfg.k == 4 and not sae.cfg.rescale_acts_by_decoder_norm
        if kind == "batchtopk":
            threshold = float(model.levels[level].inference_threshold)
            assert torch.equal(sae.threshold, torch.full((sae.cfg.d_sae,), threshold))


@pytest.mark.parametrize("kind", KINDS)
def test_exports_import_back_as_jumprelu_or_are_refused_for_topk(kind: str, tmp_path: Path) -> None:
    model = random_model(kind)
    export_model_saelens(model, tmp_path / "out", PROVENANCE)
    if kind == "topk":
        with pytest.raises(InteropError, match="architecture is 'topk'"):
            read_saelens(tmp_path / "out" / "level_0")
        return
    imported = load_saelens_export(tmp_path / "out")
    assert imported.config.level == "jumprelu"
    x = raw_activations()
    for ours, theirs in zip(model.encode(x), imported.encode(x), strict=True):
        assert torch.equal(ours > 0, theirs > 0)
        assert error(theirs, ours) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_saebench_wrapper_encodes_each_kind_like_the_model(kind: str) -> None:
    model = random_model(kind)
    x = raw_activations()
    for level in range(model.n_levels):
        sae = SAEBenchSAE.from_hsae(model, level, PROVENANCE)
        assert sae.cfg.architecture == ("topk" if kind == "topk" else "jumprelu")
        codes = sae.encode(x)
        ours = model.encode_level(x, level)
        assert torch.equal(codes > 0, ours > 0)
        assert error(codes * SCALE, ours) < TOL
        assert error(sae(x), model.reconstruct(x)[level]) < TOL


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_resumed_run_matches_uninterrupted_run(kind: str, tmp_path: Path) -> None:
    from hsae.training import Trainer
    from hsae.training.checkpoint import save_checkpoint
    from hsae.training.data import TensorBatches

    config = HSAEConfig(
        **(BASE | {"train_tokens": 64 * 60, "level": kind, "update_interval": 15}),
        perturbation_rate=0.3,
    )
    data = sparse_data(4000)
    reference = Trainer(config, TensorBatches(data, 64, seed=1)).fit(progress=False)
    first = Trainer(config, TensorBatches(data, 64, seed=1))
    first.initialise()
    while first.step < 37 or first._replay:
        first.train_step()
    save_checkpoint(first.state_dict(), tmp_path / "ckpt")
    resumed = Trainer(config, TensorBatches(data, 64, seed=1))
    resumed.resume(tmp_path / "ckpt")
    model = resumed.fit(progress=False)
    for (name, a), b in zip(
        reference.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_run_settings_and_cli_take_the_level_kind(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hsae.cli import app
    from hsae.runs import RunConfig

    run = RunConfig(hsae={"level_sizes": [8, 16], "target_l0": 4, "level": "batchtopk"})
    assert run.hsae_config(d_in=16).level == "batchtopk"
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "r"), "--level", "relu"])
    assert result.exit_code == 2
    assert "level" in result.output and "'topk'" in result.output
    assert not (tmp_path / "r").exists()
