"""Run folders end to end on the embedded model: harvest, train both models, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import hsae
from hsae.cli import app
from hsae.runs import Run, RunConfig, RunError
from hsae.training.checkpoint import CheckpointError


@pytest.fixture
def finished_run(small_run: Run) -> Run:
    return small_run


def test_run_writes_models_metrics_and_summary(finished_run: Run) -> None:
    folder = finished_run.folder
    metrics = json.loads((folder / "metrics.json").read_text())
    for name in ("hsae", "baseline"):
        assert len(metrics[name]["levels"]) == 3
        for level in metrics[name]["levels"]:
            for key in ("l0", "variance_explained", "dead_fraction", "ce_loss_recovered"):
                assert isinstance(level[key], float), key
        for key in ("hamming_per_1k", "p_parent_given_child", "p_child_given_parent"):
            assert key in metrics[name]["hierarchy"]
    assert metrics["lm"]["ce_zero"] > metrics["lm"]["ce_clean"]
    assert "Hamming" in (folder / "summary.md").read_text()
    log = (folder / "logs" / "train_hsae.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [4, 8, 12]
    assert hsae.load(folder).config.mode == "hsae"
    assert hsae.load(folder, which="baseline").config.mode == "independent"
    assert set(json.loads((folder / "timings.json").read_text())) >= {
        "harvest",
        "train_hsae",
        "train_baseline",
        "evaluate",
    }


def test_folder_of_another_run_is_refused_untouched(finished_run: Run) -> None:
    record = (finished_run.folder / "run.json").read_bytes()
    with pytest.raises(RunError, match="layer"):
        Run.create(
            finished_run.folder, RunConfig(**(finished_run.config.model_dump() | {"layer": 2}))
        )
    assert (finished_run.folder / "run.json").read_bytes() == record


def test_cli_eval_prints_table(finished_run: Run) -> None:
    result = CliRunner().invoke(app, ["eval", str(finished_run.folder), "--no-lm"])
    assert result.exit_code == 0, result.output
    assert "P(parent given child)" in result.output


def test_cli_refuses_bad_settings_without_writing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--r", "2"])
    assert result.exit_code == 2
    assert "perturbation_rate" in result.output and "[0, 1]" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--level-sizes", "64,32"])
    assert result.exit_code == 2 and "strictly increasing" in result.output


def test_cli_resume_takes_no_other_settings(finished_run: Run) -> None:
    result = CliRunner().invoke(app, ["train", "--resume", str(finished_run.folder), "--rho", "1"])
    assert result.exit_code == 2 and "--resume takes no other settings" in result.output


def test_corrupt_checkpoint_is_refused(tmp_path: Path, finished_run: Run) -> None:
    run = Run.create(tmp_path / "r", finished_run.config)
    (run.folder / "activations").symlink_to(finished_run.activations_dir, target_is_directory=True)
    checkpoint = run.checkpoint_dir("hsae")
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        run.train("hsae", progress=False)
    assert not run.trained("hsae")


def test_eval_of_untrained_run_is_refused(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", RunConfig())
    with pytest.raises(RunError, match="no harvested activations"):
        run.evaluate()


def test_reopening_a_run_with_the_same_settings_keeps_its_stage_times(finished_run: Run) -> None:
    before = json.loads((finished_run.folder / "run.json").read_text())["timings"]
    again = Run.create(finished_run.folder, finished_run.config)
    assert again.timings == before and "train_hsae" in before
    assert again.trained("hsae") and again.trained("baseline")
