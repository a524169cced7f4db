"""Reusing a harvest: ``hsae train --activations CACHE`` trains on an existing cache and refuses
one of another model, layer or context length (in one line, before writing anything), and a run
refuses a cache of other settings placed in its own folder. Tiny random Llama, built offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsae.activations.cache import CacheError  # noqa: E402
from hsae.cli import app  # noqa: E402
from hsae.runs import Run, RunConfig, RunError  # noqa: E402
from tiny_models import save_tiny  # noqa: E402

TRAIN = [
    "--level-sizes", "16,32", "--target-l0", "2", "--train-tokens", "512", "--batch-size", "128",
    "--no-baseline", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, a corpus and two complete caches of it: layer 1 and layer 0."""
    root = tmp_path_factory.mktemp("reuse")
    model = save_tiny("llama", root / "llama")
    other = save_tiny("gpt2", root / "gpt2")
    docs = [f"the cat {i} sat on the mat; a dog ran in the park at dawn." for i in range(300)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    folders = {"root": root, "model": model, "other": other, "corpus": root / "corpus.txt"}
    for layer in (1, 0):
        out = root / f"cache-l{layer}"
        result = CliRunner().invoke(app, [
            "harvest", "--model", str(model), "--layer", str(layer), "--dataset",
            str(root / "corpus.txt"), "--tokens", "2048", "--context-length", "16",
            "--batch-size", "8", "--heldout-fraction", "0.25", "--out", str(out),
            "--device", "cpu",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        folders[f"l{layer}"] = out
    return folders


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _train(world: dict[str, Path], out: Path, *extra: str) -> object:
    args = ["train", "--out", str(out), "--model", str(world["model"]), *extra, *TRAIN]
    return CliRunner().invoke(app, args)


def test_train_reuses_an_existing_cache_without_touching_it(world, tmp_path):
    before = _digests(world["l1"])
    out = tmp_path / "run"
    result = _train(
        world, out, "--activations", str(world["l1"]), "--layer", "1", "--context-length", "16"
    )
    assert result.exit_code == 0, result.output
    assert not (out / "activations").exists()  # nothing harvested into the run folder
    run = Run.open(out)
    assert run.config.activations == str(world["l1"]) and run.config.context_length == 16
    assert run.cache().root.resolve() == world["l1"].resolve()
    assert run.trained("hsae") and run.load("hsae").config.d_in == 32
    assert _digests(world["l1"]) == before
    result = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["eval", str(out), "--no-lm"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["run"]["layer"] == 1
    assert f"activations: the existing cache {world['l1']}" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--layer", "2", "--context-length", "16"], "layer 1 (cache) vs 2 (run)"),
        (["--layer", "1"], "context_length 16 (cache) vs 128 (run)"),
        (["--layer", "0"], "layer 1 (cache) vs 0 (run); context_length 16 (cache) vs 128 (run)"),
    ],
)
def test_train_refuses_a_cache_of_another_layer_or_context_length(world, tmp_path, extra, names):
    out = tmp_path / "run"
    result = _train(world, out, "--activations", str(world["l1"]), *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], lines
    assert "does not match this run" in lines[0]
    assert not out.exists()


def test_default_layer_is_the_middle_block_of_the_caches_model(world, tmp_path):
    result = _train(world, tmp_path / "run", "--activations", str(world["l1"]),
                    "--context-length", "16")  # fmt: skip
    assert result.exit_code == 0, result.output  # 3 blocks: the middle one is block 1
    result = _train(world, tmp_path / "run0", "--activations", str(world["l0"]),
                    "--context-length", "16")  # fmt: skip
    assert result.exit_code == 2 and "layer 0 (cache) vs 1 (run)" in result.output


def test_train_refuses_a_cache_of_another_model(world, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--model", str(world["other"]), "--layer", "1"]
    result = CliRunner().invoke(
        app, [*args, "--context-length", "16", "--activations", str(world["l1"]), *TRAIN]
    )
    assert result.exit_code == 2 and "model" in result.output and "(cache) vs" in result.output
    assert "gpt2" in result.output and not out.exists()


def test_train_refuses_an_incomplete_or_missing_cache(world, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(world["l1"], partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps(manifest | {"status": "in_progress"}))
    out = tmp_path / "run"
    common = ["--layer", "1", "--context-length", "16"]
    result = _train(world, out, "--activations", str(partial), *common)
    assert result.exit_code == 2 and "is incomplete" in result.output and not out.exists()
    result = _train(world, out, "--activations", str(tmp_path / "nothing"), *common)
    assert result.exit_code == 2 and "not an activation cache" in result.output
    assert not out.exists()
    result = _train(world, out, "--activations", str(world["l1"]), "--tokens", "4096", *common)
    assert result.exit_code == 2 and "--tokens, --dataset and --text-field do not apply" in (
        result.output
    )


def test_a_cache_of_another_layer_in_the_run_folder_is_refused_at_train_time(world, tmp_path):
    config = RunConfig(
        model=str(world["model"]),
        layer=0,
        dataset=str(world["corpus"]),
        harvest_tokens=2048,
        context_length=16,
        harvest_batch_size=8,
        heldout_fraction=0.25,
        baseline=False,
        device="cpu",
        hsae={"level_sizes": [16, 32], "target_l0": 2, "train_tokens": 512, "batch_size": 128},
    )
    run = Run.create(tmp_path / "run", config)
    shutil.copytree(world["l1"], run.activations_dir)  # a layer-1 cache in a layer-0 run
    with pytest.raises(CacheError, match=r"layer: 1 -> 0.*not this run's cache"):
        run.train("hsae", progress=False)
    result = CliRunner().invoke(app, ["train", "--resume", str(run.folder)])
    assert result.exit_code == 2 and "layer: 1 -> 0" in result.output
    assert not run.trained("hsae") and not run.checkpoint_dir("hsae").exists()
    shutil.rmtree(run.activations_dir)
    shutil.copytree(world["l0"], run.activations_dir)  # its own settings' cache: accepted
    assert run.train("hsae", progress=False).config.d_in == 32


def test_harvest_and_train_take_a_text_field(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = [f"a bird {i} sang at dawn in the park." for i in range(200)]
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "acts"
    args = ["harvest", "--model", str(world["model"]), "--layer", "0", "--dataset"]
    args += [str(tmp_path / "saved"), "--tokens", "256", "--context-length", "16"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "no column 'text'" in result.output and "body" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--text-field", "body"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == {"spec": str(tmp_path / "saved"), "kind": "hf_disk",
                                   "text_field": "body"}  # fmt: skip
    assert manifest["config"]["text_field"] == "body"
    run = tmp_path / "run"
    result = _train(world, run, "--dataset", str(tmp_path / "saved"), "--layer", "0")
    assert result.exit_code == 2 and "no column 'text'" in result.output and not run.exists()


def test_a_run_recorded_before_the_new_settings_existed_continues(world, tmp_path):
    """run.json written before text_field/activations existed: the same settings continue."""
    config = RunConfig(model=str(world["model"]), layer=1, context_length=16, device="cpu")
    run = Run.create(tmp_path / "run", config)
    record = json.loads((run.folder / "run.json").read_text())
    for added in ("text_field", "activations"):
        del record["config"][added]
    (run.folder / "run.json").write_text(json.dumps(record))
    (run.folder / "checkpoints").mkdir()  # work done: the saved settings are binding
    assert Run.create(run.folder, config).config == config
    with pytest.raises(RunError, match="text_field: 'text' vs 'body'"):
        Run.create(run.folder, RunConfig(**(config.model_dump() | {"text_field": "body"})))
