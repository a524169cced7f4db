"""Ecosystem bridges on tiny random models: SAELens export/import (checked with the real sae_lens
package), the SAEBench wrapper, run archives, malformed imports, the export CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hsae
from hsae import HSAE, HSAEConfig
from hsae.interop import InteropError
from hsae.interop.archive import export_archive, extract_archive
from hsae.interop.saebench import SAEBenchSAE, saebench_saes, table1, table1_markdown
from hsae.interop.saelens import (
    export_saelens,
    forest_from_saelens,
    import_forest,
    load_saelens_export,
    read_saelens,
)
from hsae.io import write_json
from hsae.model import forest as forest_ops
from hsae.runs import Run, RunConfig

sae_lens = pytest.importorskip("sae_lens")

SCALE = 0.004  # a realistic activation scale (raw residual norms in the thousands)
D_IN = 16
SIZES = [8, 16, 32]
# Float32 carries ~7 significant digits and raw activations here have entries of ~1/SCALE
# (hundreds), where one float32 step is ~3e-5; errors are therefore measured relative to the
# largest magnitude compared, and absolutely below magnitude 1 (see `error`).
TOL = 1e-4


def error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max(1, max |theirs|): absolute for codes, relative for raw outputs."""
    return float((ours - theirs).detach().abs().max() / theirs.detach().abs().max().clamp(min=1.0))


def random_hsae(mode: str = "hsae", seed: int = 0) -> HSAE:
    config = HSAEConfig(
        d_in=D_IN, level_sizes=SIZES, target_l0=4, activation_scale=SCALE, mode=mode, seed=seed
    )
    model = HSAE(config)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for level in model.levels:
            level.W_enc.copy_(torch.randn(level.W_enc.shape, generator=generator) * 0.5)
            level.b_enc.copy_(torch.randn(level.b_enc.shape, generator=generator) * 0.1)
            level.b_dec.copy_(torch.randn(level.b_dec.shape, generator=generator) * 0.5)
            thresholds = torch.empty(level.n_features).uniform_(0.05, 0.5, generator=generator)
            level.log_threshold.copy_(thresholds.log())
        model.activation_scale.fill_(SCALE)
        links = forest_ops.rebuild_forest(list(model.levels), "encoder", 0.25, None)
        for index, level_links in enumerate(links):
            model.set_parents(index, level_links)
    return model.eval()


def raw_activations(n: int = 256, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=generator) / SCALE


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder as `hsae train` leaves it, with random models and no activation shards."""
    settings = {"model": "gpt2", "layer": 3, "context_length": 64}
    settings["hsae"] = {"level_sizes": SIZES, "target_l0": 4}
    run = Run.create(tmp_path / "run", RunConfig(**settings))
    manifest = {
        "format": "hsae-activation-cache",
        "model": {"name": "gpt2", "d_model": D_IN},
        "layer": 3,
        "context_length": 64,
        "bos_prepended": True,
        "dataset": {"spec": "NeelNanda/pile-10k", "kind": "hf"},
        "d_model": D_IN,
        "scale": SCALE,
        "shards": [{"file": "shards/train_00000.npy"}],
    }
    write_json(run.folder / "activations" / "manifest.json", manifest)
    random_hsae("hsae", seed=0).save(run.folder / "hsae")
    random_hsae("independent", seed=1).save(run.folder / "baseline")
    write_json(run.folder / "metrics.json", {"hsae": {"levels": []}})
    (run.folder / "summary.md").write_text("# Run\n")
    return run.folder


# --- SAELens export ------------------------------------------------------------------------


def test_every_exported_level_loads_in_sae_lens_and_reproduces_reconstructions(
    run_dir: Path, tmp_path: Path
) -> None:
    written = export_saelens(run_dir, tmp_path / "out")
    assert sorted(written) == ["baseline", "hsae"]
    x = raw_activations()
    for which, folders in written.items():
        model = hsae.load(run_dir, which=which)
        assert len(folders) == len(SIZES)
        for level, folder in enumerate(folders):
            sae = sae_lens.SAE.load_from_disk(folder)
            assert isinstance(sae, sae_lens.JumpReLUSAE)
            assert set(load_file(str(folder / "sae_weights.safetensors"))) == {
                "W_enc",
                "b_enc",
                "W_dec",
                "b_dec",
                "threshold",
            }
            ours = model.encode_level(x, level)
            theirs = sae.encode(x)
            assert 0.1 < float((ours > 0).float().mean()) < 0.9  # a nontrivial active set
            assert torch.equal(theirs > 0, ours > 0)
            assert error(theirs, ours) < TOL
            assert error(sae.decode(theirs), model.decode(ours, level)) < TOL
            assert error(sae(x), model.reconstruct(x)[level]) < TOL


def test_exported_cfg_carries_hook_and_run_metadata(run_dir: Path, tmp_path: Path) -> None:
    export_saelens(run_dir, tmp_path / "out", model_name="openai-community/gpt2")
    cfg = json.loads((tmp_path / "out" / "hsae" / "level_1" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, SIZES[1])
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    meta = cfg["metadata"]
    assert meta["model_name"] == "openai-community/gpt2"
    assert (meta["hook_name"], meta["hook_layer"]) == ("blocks.3.hook_resid_post", 3)
    assert (meta["context_size"], meta["prepend_bos"]) == (64, True)
    assert meta["dataset_path"] == "NeelNanda/pile-10k"
    sae = sae_lens.SAE.load_from_disk(tmp_path / "out" / "hsae" / "level_1")
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"


def test_forest_sidecar_matches_the_model_and_round_trips(run_dir: Path, tmp_path: Path) -> None:
    export_saelens(run_dir, tmp_path / "out")
    original = hsae.load(run_dir)
    sidecar = json.loads((tmp_path / "out" / "hsae" / "forest.json").read_text())
    assert sidecar["levels"] == ["level_0", "level_1", "level_2"]
    assert sidecar["parents"] == [links.tolist() for links in original.forest()]
    assert any(-1 in links for links in sidecar["parents"])  # partial tree: some unassigned
    restored = load_saelens_export(tmp_path / "out" / "hsae")
    x = raw_activations()
    for a, b in zip(restored.forest(), original.forest(), strict=True):
        assert torch.equal(a, b)
    for ours, theirs in zip(restored.encode(x), original.encode(x), strict=True):
        assert error(ours, theirs) < TOL


# --- SAELens import ------------------------------------------------------------------------


def saelens_jumprelu(d_sae: int, seed: int, unit_decoder: bool = False) -> object:
    """A JumpReLU SAE made and randomised with sae_lens itself."""
    torch.manual_seed(seed)
    sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.4)
        sae.W_dec.normal_(0, 0.4)
        if unit_decoder:
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.threshold.uniform_(0.05, 0.6)
    return sae


@pytest.mark.parametrize("scale", [1.0, SCALE])
def test_imported_saelens_sae_encodes_and_decodes_the_same(tmp_path: Path, scale: float) -> None:
    sae = saelens_jumprelu(SIZES[0], seed=3)
    sae.save_model(tmp_path / "sae")
    model = forest_from_saelens(
        [tmp_path / "sae"], activation_scale=scale, fold_decoder_norms=False
    )
    x = torch.randn(200, D_IN) * 3 / scale
    theirs = sae.encode(x)
    ours = model.encode_level(x, 0)
    assert 0.1 < float((theirs > 0).float().mean()) < 0.9
    assert error(ours, theirs) < TOL
    assert error(model.decode(theirs, 0), sae.decode(theirs)) < TOL


def test_import_folds_decoder_norms_keeping_reconstructions(tmp_path: Path) -> None:
    sae = saelens_jumprelu(SIZES[0], seed=4)
    sae.save_model(tmp_path / "sae")
    model = forest_from_saelens([tmp_path / "sae"], activation_scale=SCALE)
    norms = model.levels[0].W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    x = torch.randn(200, D_IN) / SCALE
    ours = model.encode_level(x, 0)
    theirs = sae.encode(x)
    assert torch.equal(ours > 0, theirs > 0)
    row_norms = (sae.W_dec * SCALE).norm(dim=1)
    assert error(ours, theirs * row_norms) < TOL
    assert error(model.decode(ours, 0), sae.decode(theirs)) < TOL


def test_forest_from_saelens_builds_a_post_hoc_forest(tmp_path: Path) -> None:
    folders = []
    for index, size in enumerate(SIZES):
        saelens_jumprelu(size, seed=10 + index, unit_decoder=True).save_model(
            tmp_path / f"l{index}"
        )
        folders.append(tmp_path / f"l{index}")
    model = forest_from_saelens(folders, similarity="decoder", unassigned_quantile=0.25)
    assert model.config.level_sizes == SIZES
    expected = forest_ops.rebuild_forest(list(model.levels), "decoder", 0.25, None)
    for links, wanted in zip(model.forest(), expected, strict=True):
        assert torch.equal(links, wanted)
        assert int((links == -1).sum()) == round(0.25 * links.numel())
    binary = forest_from_saelens(folders, tree="binary")
    counts = forest_ops.children_count(binary.parents(0), SIZES[0])
    assert int(counts.max()) <= 2


def test_exported_level_imports_back_exactly(run_dir: Path, tmp_path: Path) -> None:
    export_saelens(run_dir, tmp_path / "out")
    original = hsae.load(run_dir)
    folders = [tmp_path / "out" / "hsae" / f"level_{i}" for i in range(len(SIZES))]
    model = forest_from_saelens(folders, activation_scale=SCALE)
    for ours, theirs in zip(model.levels, original.levels, strict=True):
        for name, tensor in theirs.state_dict().items():
            assert (ours.state_dict()[name] - tensor).abs().max() < 1e-5, name


# --- malformed imports ---------------------------------------------------------------------


def test_malformed_saelens_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good"
    saelens_jumprelu(SIZES[0], seed=5).save_model(good)
    weights = load_file(str(good / "sae_weights.safetensors"))
    cfg = json.loads((good / "cfg.json").read_text())

    def variant(name: str, tensors: dict, config: dict) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(config))
        return folder

    no_threshold = {k: v for k, v in weights.items() if k != "threshold"}
    wrong_shape = weights | {"W_dec": torch.zeros(SIZES[0] + 1, D_IN)}
    cases = {
        variant("missing", no_threshold, cfg): "lacks tensor(s) threshold",
        variant("shape", wrong_shape, cfg): "W_dec has shape (9, 16), expected (8, 16)",
        variant("topk", weights, cfg | {"architecture": "topk"}): "only 'jumprelu'",
        variant("norm", weights, cfg | {"normalize_activations": "layer_norm"}): "layer_norm",
        variant("extra", weights | {"b_mag": torch.zeros(8)}, cfg): "b_mag",
        tmp_path / "nowhere": "is not a folder",
    }
    for folder, message in cases.items():
        with pytest.raises(
            InteropError, match=message.replace("(", r"\(").replace(")", r"\)")
        ) as e:
            read_saelens(folder)
        assert "\n" not in str(e.value)
    broken = variant("broken", weights, cfg)
    (broken / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InteropError, match="not a readable safetensors file"):
        read_saelens(broken)
    (broken / "cfg.json").write_text("{architecture: jumprelu")
    with pytest.raises(InteropError, match="is not valid JSON"):
        read_saelens(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InteropError, match="missing cfg.json"):
        forest_from_saelens([tmp_path / "empty"])
    with pytest.raises(InteropError, match="smallest to largest"):
        forest_from_saelens([good, good])


# --- run archives --------------------------------------------------------------------------


def test_archive_carries_models_and_results_but_not_activations(
    run_dir: Path, tmp_path: Path
) -> None:
    (run_dir / "checkpoints" / "hsae").mkdir(parents=True)
    (run_dir / "checkpoints" / "hsae" / "trainer.json").write_text("{}")
    archive = export_archive(run_dir, tmp_path / "shared" / "run.tar.gz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "run/hsae/hsae.safetensors" in names and "run/baseline/hsae_config.json" in names
    assert {"run/run.json", "run/metrics.json", "run/summary.md", "run/archive.json"} <= names
    assert not any("activations" in name or "checkpoints" in name for name in names)

    root = extract_archive(archive, tmp_path / "other_machine")
    x = raw_activations()
    for which in ("hsae", "baseline"):
        loaded, original = hsae.load(root, which=which), hsae.load(run_dir, which=which)
        assert loaded.config == original.config
        for a, b in zip(loaded.encode(x), original.encode(x), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(loaded.forest(), original.forest(), strict=True):
            assert torch.equal(a, b)
    described = json.loads((root / "archive.json").read_text())
    assert described["provenance"]["model_name"] == "gpt2"
    assert described["provenance"]["activation_scale"] == pytest.approx(SCALE)
    written = export_saelens(root, tmp_path / "from_archive")  # provenance from archive.json
    cfg = json.loads((written["hsae"][0] / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    with pytest.raises(InteropError, match="already exists"):
        extract_archive(archive, tmp_path / "other_machine")


def test_tampered_or_foreign_archives_are_refused(run_dir: Path, tmp_path: Path) -> None:
    archive = export_archive(run_dir, tmp_path / "run.tar.gz")
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    def repack(name: str, files: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in files.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    corrupt = members | {"run/summary.md": b"# edited\n"}
    extra = members | {"run/activations/manifest.json": b"{}"}
    no_manifest = {k: v for k, v in members.items() if not k.endswith("archive.json")}
    cases = {
        repack("corrupt.tar.gz", corrupt): "summary.md is corrupt",
        repack("extra.tar.gz", extra): "disagree",
        repack("plain.tar.gz", no_manifest): "not an hsae run archive",
        repack("escape.tar.gz", {"../evil.txt": b"x"}): "unsafe member path",
    }
    for path, message in cases.items():
        with pytest.raises(InteropError, match=message):
            extract_archive(path, tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(InteropError, match="no trained model"):
        export_archive(tmp_path, tmp_path / "x.tar.gz")


# --- SAEBench ------------------------------------------------------------------------------

# SAEBench's CustomSAEConfig fields (sae_bench/custom_saes/custom_sae_config.py, v0.6.0) and the
# SAE attributes its README and BaseSAE require; checked here even without sae_bench installed.
SAEBENCH_CFG_FIELDS = [
    "model_name",
    "d_in",
    "d_sae",
    "hook_layer",
    "hook_name",
    "context_size",
    "hook_head_index",
    "architecture",
    "apply_b_dec_to_input",
    "finetuning_scaling_factor",
    "activation_fn_str",
    "activation_fn_kwargs",
    "prepend_bos",
    "normalize_activations",
    "dtype",
    "device",
    "model_from_pretrained_kwargs",
    "dataset_path",
    "dataset_trust_remote_code",
    "seqpos_slice",
    "training_tokens",
    "sae_lens_training_version",
    "neuronpedia_id",
]


def test_saebench_wrapper_follows_the_documented_interface_and_the_model(run_dir: Path) -> None:
    selected = saebench_saes(run_dir)
    names = [name for name, _ in selected]
    assert names == [
        f"{w}_level_{i}_{s}" for w in ("hsae", "baseline") for i, s in enumerate(SIZES)
    ]
    x = raw_activations()
    for (name, sae), level in zip(selected, [0, 1, 2] * 2, strict=True):
        model = hsae.load(run_dir, which=name.split("_level_")[0])
        d_sae = SIZES[level]
        assert isinstance(sae.W_enc, torch.nn.Parameter) and sae.W_enc.shape == (D_IN, d_sae)
        assert isinstance(sae.W_dec, torch.nn.Parameter) and sae.W_dec.shape == (d_sae, D_IN)
        assert sae.b_enc.shape == (d_sae,) and sae.b_dec.shape == (D_IN,)
        assert sae.check_decoder_norms()
        assert (sae.device, sae.dtype) == (torch.device("cpu"), torch.float32)
        for key in SAEBENCH_CFG_FIELDS:
            assert hasattr(sae.cfg, key), key
        assert (sae.cfg.model_name, sae.cfg.hook_layer) == ("gpt2", 3)
        assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.d_sae == d_sae
        json.dumps(sae.cfg.to_dict())
        codes = sae.encode(x)
        ours = model.encode_level(x, level)
        assert torch.equal(codes > 0, ours > 0)
        assert error(codes * SCALE, ours) < TOL  # codes in raw units
        assert error(sae(x), model.reconstruct(x)[level]) < TOL
        assert torch.equal(sae(x), sae.decode(sae.encode(x)))
    moved = selected[0][1].to(dtype=torch.float64)
    assert moved.dtype == torch.float64 and moved.cfg.dtype == "float64"


@pytest.mark.saebench
def test_saebench_wrapper_passes_saebench_own_checks(run_dir: Path) -> None:
    from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig
    from sae_bench.custom_saes.jumprelu_sae import JumpReluSAE
    from sae_bench.evals.core import main as core
    from sae_bench.sae_bench_utils import general_utils

    x = raw_activations()
    for name, sae in saebench_saes(run_dir):
        assert general_utils.check_decoder_norms(sae.W_dec.data)
        sae_id, formatted, sparsity = general_utils.load_and_format_sae(name, sae, "cpu")
        assert (sae_id, sparsity) == ("custom_sae", None) and formatted is sae
        assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
        assert sae.cfg.architecture_str == "jumprelu"
        metrics = core.get_featurewise_weight_based_metrics(sae)
        assert len(metrics["encoder_bias"]) == sae.cfg.d_sae
        reference = JumpReluSAE(D_IN, sae.cfg.d_sae, "gpt2", 3, torch.device("cpu"), torch.float32)
        reference.load_state_dict(sae.state_dict())  # strict: same parameter names and shapes
        assert reference.check_decoder_norms()
        assert torch.equal(reference.encode(x) > 0, sae.encode(x) > 0)
        assert error(reference.encode(x), sae.encode(x)) < TOL
        assert error(reference(x), sae(x)) < TOL
    wanted = {f.name for f in dataclasses.fields(CustomSAEConfig)}
    wanted |= {"activation_fn_kwargs", "model_from_pretrained_kwargs"}
    assert wanted <= set(SAEBENCH_CFG_FIELDS)


def test_table1_reads_saebench_result_files(tmp_path: Path) -> None:
    def result(eval_name: str, sae: str, metrics: dict) -> None:
        path = tmp_path / eval_name / f"{sae}_custom_sae_eval_results.json"
        write_json(path, {"eval_result_metrics": metrics})

    for sae, ev in (("hsae_level_2_32", 0.71), ("baseline_level_2_32", 0.70)):
        result("core", sae, {"reconstruction_quality": {"explained_variance_legacy": ev}})
        result("absorption", sae, {"mean": {"mean_absorption_fraction_score": 0.08}})
        result("sparse_probing", sae, {"sae": {"sae_top_5_test_accuracy": 0.87}})
    table = table1(tmp_path)
    row = table["hsae"]["hsae_level_2_32"]
    assert row["explained_variance_legacy"] == pytest.approx(0.71)
    assert row["absorption"] == pytest.approx(0.92)
    assert row["sparse_probing_top5"] == pytest.approx(0.87)
    assert row["autointerp"] is None and row["ravel"] is None and row["scr_20"] is None
    assert table["baseline"]["baseline_level_2_32"]["explained_variance_legacy"] == 0.70
    lines = table1_markdown(table).splitlines()
    assert lines[2].startswith("| hsae_level_2_32 | 0.710 | 0.920 | n/a")
    assert lines[3].startswith("| baseline_level_2_32 | 0.700 |")
    result("ravel", "hsae_level_2_32", {"wrong": {}})
    with pytest.raises(InteropError, match="not a SAEBench result file"):
        table1(tmp_path)


@pytest.mark.saebench
def test_saebench_core_eval_runs_on_the_wrapper_and_agrees_with_the_model() -> None:
    """SAEBench's own core evaluation, on CPU, with a tiny random TransformerLens model."""
    from datasets import Dataset
    from sae_bench.evals.core import main as core
    from sae_bench.sae_bench_utils import general_utils
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from hsae.interop.saelens import Provenance

    torch.manual_seed(0)
    lm_config = HookedTransformerConfig(
        n_layers=2, d_model=D_IN, d_head=4, n_heads=4, d_mlp=32, n_ctx=32, d_vocab=64,
        act_fn="gelu", normalization_type="LN",
    )  # fmt: skip
    lm = HookedTransformer(lm_config)
    tokens = torch.randint(1, 64, (1, 16))
    _, cache = lm.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"])
    x = cache["blocks.0.hook_resid_post"][0]
    model = random_hsae()
    model.activation_scale.fill_(D_IN**0.5 / float(x.norm(dim=1).mean()))
    sae = SAEBenchSAE.from_hsae(model, 1, Provenance("tiny-random", 0, 16, True, ""))
    general_utils.load_and_format_sae("hsae_level_1_16", sae, "cpu")
    # Every context is the same, so whichever contexts SAEBench draws it sees exactly `x`.
    dataset = Dataset.from_dict({"input_ids": tokens.tolist() * 32})
    store = core.ActivationsStore.from_sae(
        lm, sae, dataset=dataset, context_size=16, streaming=False, store_batch_size_prompts=4,
        n_batches_in_buffer=2, train_batch_size_tokens=64, device="cpu",
    )  # fmt: skip
    config = core.CoreEvalConfig(
        model_name="tiny-random", batch_size_prompts=4, n_eval_reconstruction_batches=1,
        n_eval_sparsity_variance_batches=2, context_size=16, compute_kl=True,
        compute_ce_loss=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_weight_based_metrics=True,
    )  # fmt: skip
    metrics, features = core.run_evals(sae, store, lm, config)
    codes = model.encode_level(x, 1)
    residual = (x - model.reconstruct(x)[1]).pow(2).sum(1)
    legacy = float((1 - residual / (x - x.mean(0)).pow(2).sum(1)).mean())
    assert 0 < metrics["sparsity"]["l0"] < SIZES[1]
    assert metrics["sparsity"]["l0"] == pytest.approx(float((codes > 0).sum(1).float().mean()))
    ev = metrics["reconstruction_quality"]["explained_variance_legacy"]
    assert ev == pytest.approx(legacy, abs=1e-4)
    assert len(features["encoder_bias"]) == SIZES[1]


# --- training from imported SAEs -----------------------------------------------------------


def test_training_can_start_from_imported_saes(tmp_path: Path) -> None:
    from hsae.training import Trainer
    from hsae.training.data import as_batches

    folders = []
    for index, size in enumerate(SIZES):
        saelens_jumprelu(size, seed=20 + index, unit_decoder=True).save_model(
            tmp_path / f"l{index}"
        )
        folders.append(tmp_path / f"l{index}")
    data = raw_activations(512)
    settings = {"train_tokens": 64, "batch_size": 32, "lr": 1e-9, "device": "cpu"}

    def fit(initialise_from_data: bool) -> tuple[HSAE, HSAE]:
        imported = forest_from_saelens(folders, activation_scale=SCALE, **settings)
        before = forest_from_saelens(folders, activation_scale=SCALE, **settings)
        batches = as_batches(data, 32, seed=0)
        trainer = Trainer(imported.training_config, batches, imported, initialise_from_data)
        return trainer.fit(progress=False), before

    kept, before = fit(initialise_from_data=False)
    assert kept.scale == pytest.approx(SCALE)
    for ours, theirs in zip(kept.levels, before.levels, strict=True):
        assert (ours.b_dec - theirs.b_dec).abs().max() < 1e-5
        assert (ours.log_threshold - theirs.log_threshold).abs().max() < 1e-5
    reset, before = fit(initialise_from_data=True)  # the default re-initialises from data
    assert (reset.levels[0].b_dec - before.levels[0].b_dec).abs().max() > 1e-2
    with pytest.raises(ValueError, match="needs a model"):
        Trainer(before.config, iter([]), None, initialise_from_data=False)


# --- command line --------------------------------------------------------------------------


def test_cli_exports_saelens_and_archive_and_imports_saelens(run_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hsae.cli import app

    runner = CliRunner()
    out = tmp_path / "saelens"
    result = runner.invoke(app, ["export", str(run_dir), "--format", "saelens", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "baseline" / "level_2" / "cfg.json").is_file()
    assert (out / "hsae" / "forest.json").is_file()
    archive = tmp_path / "run.tar.gz"
    result = runner.invoke(app, ["export", str(run_dir), str(archive), "--format", "archive"])
    assert result.exit_code == 0 and archive.is_file(), result.output
    levels = [str(out / "hsae" / f"level_{i}") for i in range(len(SIZES))]
    model_dir = tmp_path / "imported"
    args = ["import-saelens", *levels, "--out", str(model_dir), "--scale", str(SCALE)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert hsae.load(model_dir).config.level_sizes == SIZES
    refusals = [
        (["export", str(run_dir), str(out), "--format", "onnx"], "--format must be"),
        (["export", str(tmp_path / "missing"), str(out)], "does not exist"),
        (["import-saelens", str(tmp_path), "--out", str(tmp_path / "m")], "missing cfg.json"),
        (args, "already holds a saved model"),
        (["saebench", str(run_dir), "--evals", "core,bogus"], "unknown SAEBench eval(s) ['bogus']"),
    ]
    for command, message in refusals:
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("\n") == 1


@pytest.mark.saebench
def test_run_saebench_calls_each_eval_with_its_own_config_and_collects_table1(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The glue to SAEBench's evaluations, with the evaluations replaced by recorders (they need
    a GPU, the Hub and the real language model); configs are SAEBench's own classes."""
    import importlib

    from hsae.interop.saebench import run_saebench

    calls: dict[str, tuple] = {}

    def recorder(eval_name: str, metrics: dict, subfolder: str | None = None):
        def run(*args, **kwargs):
            calls[eval_name] = (args, kwargs)
            selected = kwargs.get("selected_saes") or args[1]
            folder = Path(kwargs.get("output_folder") or args[3])
            for name, sae in selected:
                assert isinstance(sae, SAEBenchSAE) and sae.dtype == torch.float32
                path = folder / (subfolder or "") / f"{name}_custom_sae_eval_results.json"
                write_json(path, {"eval_result_metrics": metrics})

        return run

    modules = {
        name: importlib.import_module(f"sae_bench.evals.{name}.main")
        for name in ("core", "absorption", "ravel", "scr_and_tpp", "sparse_probing")
    }
    ev = {"reconstruction_quality": {"explained_variance_legacy": 0.6}}
    monkeypatch.setattr(modules["core"], "multiple_evals", recorder("core", ev))
    absorbed = {"mean": {"mean_absorption_fraction_score": 0.25}}
    monkeypatch.setattr(modules["absorption"], "run_eval", recorder("absorption", absorbed))
    ravel = {"ravel": {"disentanglement_score": 0.5}}
    monkeypatch.setattr(modules["ravel"], "run_eval", recorder("ravel", ravel))
    scr = {"scr_metrics": {"scr_metric_threshold_20": 0.1}}
    monkeypatch.setattr(modules["scr_and_tpp"], "run_eval", recorder("scr", scr, "scr"))
    probing = {"sae": {"sae_top_5_test_accuracy": 0.8}}
    monkeypatch.setattr(modules["sparse_probing"], "run_eval", recorder("probing", probing))

    out = tmp_path / "saebench"
    with pytest.raises(InteropError, match="TransformerLens does not know the model 'gemma-9x'"):
        run_saebench(run_dir, out, model_name="gemma-9x", device="cpu")
    assert calls == {} and not out.exists()  # refused before any evaluation started
    table = run_saebench(run_dir, out, levels=[2], device="cpu", llm_dtype="float32")
    assert sorted(calls) == [
        "absorption",
        "core",
        "probing",
        "ravel",
        "scr",
    ]  # no key: no autointerp
    config = calls["absorption"][0][0]
    assert isinstance(config, modules["absorption"].AbsorptionEvalConfig)
    assert (config.model_name, config.llm_dtype) == ("gpt2", "float32")
    assert calls["scr"][0][0].perform_scr is True
    row = table["hsae"]["hsae_level_2_32"]
    assert row == {
        "explained_variance_legacy": 0.6,
        "absorption": 0.75,
        "autointerp": None,
        "ravel": 0.5,
        "scr_20": 0.1,
        "sparse_probing_top5": 0.8,
    }
    assert sorted(table["baseline"]) == ["baseline_level_2_32"]
    assert json.loads((out / "table1.json").read_text()) == table


def test_saebench_refuses_a_model_transformerlens_does_not_know_in_one_line(
    run_dir: Path, tmp_path: Path
) -> None:
    """Checked against TransformerLens's own names before SAEBench (or the Hub) is touched."""
    from typer.testing import CliRunner

    from hsae.cli import app
    from hsae.interop.saebench import check_transformerlens_name

    pytest.importorskip("transformer_lens")
    check_transformerlens_name("gpt2")  # the run's own model: known, no error
    out = tmp_path / "results"
    args = ["saebench", str(run_dir), "--out", str(out), "--model-name", "no-such-model-7b"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        "error: TransformerLens does not know the model 'no-such-model-7b'"
    )
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not out.exists()


# --- sharing: the SAELens Hub layout, parent links, sparsity, provenance, upload -------------

REPO_ID = "hsae-tests/tiny-forest"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """Stands in for the Hub's storage only (the Hub cannot be reached here): what an upload
    sends lands in a local Hugging Face cache snapshot (``models--OWNER--NAME/snapshots/<commit>``
    + ``refs/main``), where ``hf_hub_download`` finds files when offline, so SAELens' real
    ``SAE.from_pretrained`` reads the repository exactly as the Hub serves it. Which files an
    upload keeps follows ``huggingface_hub``'s own ``filter_repo_objects``."""

    def __init__(self, cache: Path, repo_id: str = REPO_ID) -> None:
        self.repo = cache / f"models--{repo_id.replace('/', '--')}"
        self.snapshot = self.repo / "snapshots" / COMMIT
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        self.snapshot.mkdir(parents=True, exist_ok=True)
        (self.repo / "refs").mkdir(exist_ok=True)
        (self.repo / "refs" / "main").write_text(COMMIT)

    def repo_info(self, repo_id: str, **kwargs: object) -> None:
        self.create_repo(repo_id)

    def create_branch(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path, path_in_repo=None, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", {"path_in_repo": path_in_repo, **kwargs}))
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            target = self.snapshot / (path_in_repo or "") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((folder / name).read_bytes())
        return f"https://hub.invalid/{kwargs.get('repo_id')}/commit/{COMMIT}"

    def upload_file(self, *, path_or_fileobj, path_in_repo, **kwargs) -> None:
        (self.snapshot / path_in_repo).write_bytes(path_or_fileobj.read())

    def serve(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make hf_hub_download (and so SAE.from_pretrained) read this cache, offline."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.repo.parent))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def same_forest(a: HSAE, b: HSAE) -> bool:
    first, second = a.forest(), b.forest()
    return len(first) == len(second) and all(
        torch.equal(x, y) for x, y in zip(first, second, strict=True)
    )


def as_served(export: Path, cache: Path) -> LocalHub:
    """The export folder laid out in a local cache exactly as the Hub would serve it."""
    hub = LocalHub(cache)
    hub.create_repo(REPO_ID)
    hub.upload_folder(folder_path=export, repo_id=REPO_ID)
    return hub


def heldout_run(tmp_path: Path, run_dir: Path, n_heldout: int = 300) -> tuple[Path, torch.Tensor]:
    """``run_dir`` with a real activation cache (train + held-out shards) in place of its
    manifest-only one, from a model with a recorded revision; returns the held-out rows."""
    import shutil

    import numpy as np

    from hsae.activations.cache import (
        FORMAT,
        FORMAT_VERSION,
        TOKEN_COLUMNS,
        ResumePoint,
        ShardWriter,
    )

    shutil.rmtree(run_dir / "activations")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": "openai-community/gpt2", "revision": "607a30d", "d_model": D_IN},
        "layer": 3,
        "d_model": D_IN,
        "dtype": "float32",
        "context_length": 64,
        "bos_prepended": True,
        "dataset": {"spec": "NeelNanda/pile-10k", "kind": "hf"},
        "shard_tokens": 128,
        "token_columns": list(TOKEN_COLUMNS),
        "config": {},
    }
    writer = ShardWriter.create(run_dir / "activations", manifest)
    heldout = raw_activations(n_heldout, seed=7)
    for split, acts in (("train", raw_activations(200, seed=8)), ("heldout", heldout)):
        meta = np.zeros((acts.shape[0], len(TOKEN_COLUMNS)), dtype=np.int64)
        writer.append(split, acts.numpy(), meta, 0, 0)
    writer.finish(ResumePoint(1, 0))
    return run_dir, heldout


def test_reimport_recovers_every_parent_link(run_dir: Path, tmp_path: Path) -> None:
    """The CLI and the library read the links the export carries: 100% recovery, where a
    post-hoc rebuild (the old default) recovers only part of them."""
    from typer.testing import CliRunner

    from hsae.cli import app

    export_saelens(run_dir, tmp_path / "out")
    original = hsae.load(run_dir)
    levels = [str(tmp_path / "out" / "hsae" / f"level_{i}") for i in range(len(SIZES))]
    runner = CliRunner()
    result = runner.invoke(app, ["import-saelens", *levels, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "read from the export" in result.output
    imported = hsae.load(tmp_path / "m")
    total = sum(links.numel() for links in original.forest())
    same = sum(
        int((a == b).sum()) for a, b in zip(imported.forest(), original.forest(), strict=True)
    )
    assert same == total
    assert imported.config.similarity == original.config.similarity
    assert imported.scale == pytest.approx(SCALE)  # the export's c: the trained weights back
    for ours, theirs in zip(imported.levels, original.levels, strict=True):
        for name, tensor in theirs.state_dict().items():
            assert (ours.state_dict()[name] - tensor).abs().max() < 1e-5, name

    baseline = [tmp_path / "out" / "baseline" / f"level_{i}" for i in range(len(SIZES))]
    imported_baseline = forest_from_saelens(baseline)
    assert imported_baseline.config.mode == "independent"
    assert same_forest(imported_baseline, hsae.load(run_dir, which="baseline"))

    rebuilt = forest_from_saelens(levels, similarity="encoder")  # asked for: post hoc
    pairs = zip(rebuilt.forest(), original.forest(), strict=True)
    agree = sum(int((a == b).sum()) for a, b in pairs)
    assert agree < total
    # Links are used only when they point into exactly the SAE given before: another export's
    # level 0 gives a post-hoc forest (decoder similarity, the HSAEConfig default) and says why.
    other = random_hsae(seed=5)
    other.save(tmp_path / "other_run_model")
    export_saelens(tmp_path / "other_run_model", tmp_path / "other", layer=3)
    mixed = [str(tmp_path / "other" / "hsae" / "level_0"), *levels[1:]]
    model, source = import_forest(mixed)
    assert "decoder similarity" in source and "are not into" in source
    for needs_firing in forest_ops.FIRING_SIMILARITIES:  # nothing fired here to count
        with pytest.raises(InteropError, match="needs firing statistics"):
            import_forest(levels, similarity=needs_firing)
    expected = forest_ops.rebuild_forest(list(model.levels), "decoder", 0.2, None)
    assert all(torch.equal(a, b) for a, b in zip(model.forest(), expected, strict=True))
    broken = json.loads((Path(levels[1]) / "cfg.json").read_text())
    broken["metadata"]["hsae"]["parents"][0] = SIZES[0]  # out of range
    (Path(levels[1]) / "cfg.json").write_text(json.dumps(broken))
    with pytest.raises(InteropError, match="malformed metadata.hsae.parents"):
        forest_from_saelens(levels)


def test_hub_layout_loads_with_sae_lens_from_pretrained(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, heldout = heldout_run(tmp_path, run_dir)
    export_saelens(run_dir, tmp_path / "out")
    hub = as_served(tmp_path / "out", tmp_path / "hf_cache")
    hub.serve(monkeypatch)
    original = hsae.load(run_dir)
    x = raw_activations()
    for level in range(len(SIZES)):
        sae, cfg, log_sparsity = sae_lens.SAE.from_pretrained_with_cfg_and_sparsity(
            REPO_ID, f"hsae/level_{level}"
        )
        assert isinstance(sae, sae_lens.JumpReLUSAE)
        assert error(sae.encode(x), original.encode_level(x, level)) < TOL
        assert error(sae(x), original.reconstruct(x)[level]) < TOL
        # sparsity.safetensors: SAELens' log10 feature frequency, on the run's held-out rows
        fired = (sae.encode(heldout) > 0).double().mean(0)
        assert torch.allclose(log_sparsity.double(), (fired + 1e-10).log10(), atol=1e-5)
        assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
        links = sae.cfg.metadata.hsae.get("parents")
        if level == 0:
            assert links is None
        else:
            assert links == original.parents(level - 1).tolist()
            assert cfg["metadata"]["hsae"]["parent_sae_id"] == f"hsae/level_{level - 1}"
    # The whole forest straight from the served snapshot.
    served = [hub.snapshot / "hsae" / f"level_{i}" for i in range(len(SIZES))]
    restored = forest_from_saelens(served, activation_scale=SCALE)
    assert same_forest(restored, original)
    card = (hub.snapshot / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n") and "hsae/level_2" in card
    assert "base_model: openai-community/gpt2" in card


def test_sae_lens_own_uploader_keeps_the_parent_links(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAELens' real ``upload_saes_to_huggingface`` (its Hub client replaced by LocalHub)
    keeps only cfg.json, the weights and sparsity of each SAE: forest.json is dropped, yet the
    forest comes back whole from the levels' cfg.json."""
    uploader = pytest.importorskip("sae_lens.training.upload_saes_to_huggingface")
    run_dir, _ = heldout_run(tmp_path, run_dir)
    written = export_saelens(run_dir, tmp_path / "out")
    hub = LocalHub(tmp_path / "hf_cache")
    monkeypatch.setattr(uploader, "HfApi", lambda: hub)
    monkeypatch.setattr(uploader, "create_repo", hub.create_repo)
    monkeypatch.setattr(
        uploader, "_repo_file_exists", lambda repo, name, rev: (hub.snapshot / name).exists()
    )
    saes = {f"hsae/{folder.name}": folder for folder in written["hsae"]}
    uploader.upload_saes_to_huggingface(saes, REPO_ID, show_progress=False)
    kept = sorted(p.relative_to(hub.snapshot).as_posix() for p in hub.snapshot.rglob("*.*"))
    assert "hsae/forest.json" not in kept
    assert "hsae/level_1/sparsity.safetensors" in kept and "README.md" in kept
    hub.serve(monkeypatch)
    sae = sae_lens.SAE.from_pretrained(REPO_ID, "hsae/level_2")
    assert sae.cfg.d_sae == SIZES[2]
    restored = load_saelens_export(hub.snapshot / "hsae")  # no forest.json: cfg.json links
    original = hsae.load(run_dir)
    assert same_forest(restored, original)
    x = raw_activations()
    pairs = zip(restored.encode(x), original.encode(x), strict=True)
    assert all(error(a, b) < TOL for a, b in pairs)


def test_export_records_provenance_and_the_real_sae_lens_version(
    run_dir: Path, tmp_path: Path
) -> None:
    import importlib.metadata

    run_dir, _ = heldout_run(tmp_path, run_dir)
    trained = hsae.load(run_dir)
    trained.training_config = HSAEConfig(
        d_in=D_IN, level_sizes=SIZES, target_l0=4, train_tokens=1_234_567
    )
    trained.save(run_dir / "hsae")
    export_saelens(run_dir, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "hsae" / "level_1" / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == importlib.metadata.version("sae-lens")
    assert meta["model_from_pretrained_kwargs"] == {"revision": "607a30d"}
    assert meta["training_tokens"] == 1_234_567
    provenance = meta["hsae"]["provenance"]
    assert provenance["model_name"] == "openai-community/gpt2"
    assert provenance["model_revision"] == "607a30d"
    assert provenance["model_origin"] == "hub:openai-community/gpt2"
    assert provenance["hook_name"] == "blocks.3.hook_resid_post" and provenance["layer"] == 3
    assert provenance["dataset_path"] == "NeelNanda/pile-10k"
    assert provenance["harvested_tokens"] == {"train": 200, "heldout": 300}
    assert meta["hsae"]["hsae_version"] == hsae.__version__
    assert meta["hsae"]["sparsity_tokens"] == 300
    export_saelens(run_dir, tmp_path / "fewer", sparsity_tokens=100)
    cfg = json.loads((tmp_path / "fewer" / "hsae" / "level_0" / "cfg.json").read_text())
    assert cfg["metadata"]["hsae"]["sparsity_tokens"] == 100
    export_saelens(run_dir, tmp_path / "none", sparsity_tokens=0)
    assert not list((tmp_path / "none").rglob("sparsity.safetensors"))


def test_export_accepts_a_bare_model_folder(run_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hsae.cli import app

    runner = CliRunner()
    bare = tmp_path / "shared_model"
    hsae.load(run_dir, which="baseline").save(bare)
    result = runner.invoke(app, ["export", str(bare), str(tmp_path / "a")])
    assert result.exit_code == 2 and "pass --layer" in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "a").exists()
    args = ["export", str(bare), str(tmp_path / "a"), "--layer", "5", "--model-name", "gpt2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "no sparsity.safetensors" in result.output
    cfg = json.loads((tmp_path / "a" / "baseline" / "level_0" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.5.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "gpt2"
    assert not (tmp_path / "a" / "hsae").exists()  # an independent baseline is named so
    # A model folder inside a run: the run's provenance, the folder's own name.
    result = runner.invoke(app, ["export", str(run_dir / "hsae"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "b" / "hsae" / "level_2" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["README.md", "hsae"]
    model = forest_from_saelens([tmp_path / "b" / "hsae" / f"level_{i}" for i in range(len(SIZES))])
    assert same_forest(model, hsae.load(run_dir))


def test_upload_refuses_offline_in_one_line_before_any_work(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import tempfile

    from huggingface_hub import constants
    from typer.testing import CliRunner

    from hsae.cli import app

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    runner = CliRunner()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["upload", str(run_dir), REPO_ID])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "HF_HUB_OFFLINE is set" in result.output and "hsae export" in result.output
    # Not offline by setting, but nothing answers at the endpoint (a closed local port).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    result = runner.invoke(app, ["upload", str(run_dir), REPO_ID])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "cannot reach the Hugging Face Hub" in result.output and "offline" in result.output
    # Reachable (a local socket listens there), but no token is set.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        result = runner.invoke(app, ["upload", str(run_dir), REPO_ID])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "no Hugging Face token" in result.output and "hf auth login" in result.output
    for args, message in (
        ([str(run_dir), "no-owner"], "owner/name"),
        ([str(run_dir), "bad id/x y"], "not a Hub repository id"),
        ([str(tmp_path / "missing"), REPO_ID], "does not exist"),
    ):
        result = runner.invoke(app, ["upload", *args])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert message in result.output
    assert not any(scratch.iterdir())  # no export was staged


def test_upload_pushes_the_staged_export_in_one_commit(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thin Hub call: create the repository (private, branch) and upload the staged
    export; LocalHub stands in for the Hub, and the reachability check (a socket to the real
    endpoint) is skipped."""
    from hsae.interop import hub as hub_module

    hub = LocalHub(tmp_path / "hf_cache")
    monkeypatch.setattr(hub_module, "check_hub_reachable", lambda: None)
    monkeypatch.setattr(hub_module, "_api", lambda: hub)
    url = hub_module.upload(run_dir, REPO_ID, private=True, revision="v1")
    assert url.endswith(COMMIT)
    assert [name for name, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1]["private"] is True and hub.calls[2][1]["revision"] == "v1"
    card = (hub.snapshot / "README.md").read_text()
    assert f'SAE.from_pretrained("{REPO_ID}", "hsae/level_0")' in card
    hub.serve(monkeypatch)
    for which in ("hsae", "baseline"):
        sae = sae_lens.SAE.from_pretrained(REPO_ID, f"{which}/level_1")
        assert sae.cfg.d_sae == SIZES[1]
