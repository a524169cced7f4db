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


def _run_on_shared_cache(tmp_path: Path, small_run: Run, **changes: object) -> Run:
    """A fresh run folder using the small run's activations (linked, not copied)."""
    config = RunConfig(**(small_run.config.model_dump() | changes))
    run = Run.create(tmp_path / "r", config)
    (run.folder / "activations").symlink_to(small_run.activations_dir, target_is_directory=True)
    return run


LOCK_HOLDER = """
import sys, time
from hsae.locking import folder_lock
with folder_lock(sys.argv[1], "train hsae"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path, finished_run: Run) -> None:
    import subprocess
    import sys

    run = _run_on_shared_cache(tmp_path, finished_run)
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run.folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"in use by another hsae process \\(pid {holder.pid}"):
            run.train("hsae", progress=False)
        result = CliRunner().invoke(app, ["train", "--resume", str(run.folder)])
        assert result.exit_code == 2 and f"pid {holder.pid}: train hsae" in result.output
        assert len(result.output.strip().splitlines()) == 1
        result = CliRunner().invoke(app, ["eval", str(run.folder), "--no-lm"])
        assert result.exit_code == 2, result.output
        assert "hsae: not trained yet; baseline: not trained yet" in result.output
        assert not run.log_path("hsae").exists() and not (run.folder / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: the run can be written again.
    run.train("hsae", progress=False)
    assert run.trained("hsae")


def test_eval_refuses_a_model_still_training(tmp_path: Path, finished_run: Run) -> None:
    run = _run_on_shared_cache(tmp_path, finished_run)
    run.train("hsae", progress=False)
    checkpoint = run.checkpoint_dir("baseline")
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer.json").write_text('{"step": 5}')
    with pytest.raises(RunError, match=r"baseline is still training \(checkpoint at step 5\)"):
        run.evaluate(splice=False)
    assert not (run.folder / "metrics.json").exists()


def test_a_restart_without_checkpoint_never_logs_a_step_twice(
    tmp_path: Path, finished_run: Run
) -> None:
    run = _run_on_shared_cache(tmp_path, finished_run)
    # A launch killed before its first checkpoint (step 5) left steps 4 of its log behind.
    log = run.log_path("hsae")
    log.parent.mkdir(parents=True)
    log.write_text('{"step": 4, "loss": 1.0}\n{"step": 8, "lo')
    run.train("hsae", progress=False)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [4, 8, 12]


def test_a_cache_of_another_layer_in_the_run_folder_is_refused(
    tmp_path: Path, finished_run: Run
) -> None:
    from hsae.activations import CacheError

    run = _run_on_shared_cache(tmp_path, finished_run, layer=3)
    with pytest.raises(CacheError, match=r"layer: 9 -> 3"):
        run.train("hsae", progress=False)
    with pytest.raises(CacheError, match=r"layer: 9 -> 3"):
        run.harvest(progress=False)
    assert not run.checkpoint_dir("hsae").exists()


def test_a_refused_start_leaves_nothing_and_the_corrected_command_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--device", "banana"])
    assert result.exit_code == 2 and "device: unknown device 'banana'" in result.output
    assert not out.exists()
    # A run recorded but not started yet (nothing harvested) takes corrected settings.
    Run.create(out, RunConfig(seed=1))
    assert Run.create(out, RunConfig(seed=2)).config.seed == 2
    assert Run.open(out).config.seed == 2


def test_out_into_a_folder_of_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="holds other files"):
        Run.create(tmp_path, RunConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_error_starts_on_a_fresh_line_after_a_progress_bar() -> None:
    import io

    from tqdm import tqdm

    from hsae.cli import _fail

    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, mininterval=0)
    bar.update(3)
    assert not stream.getvalue().endswith("\n")
    _fail(RunError("boom"))
    assert stream.getvalue().endswith("\n")
