"""hsae ablate: variant selection, deduplication, reuse of the run's models, outputs, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from hsae.ablations import AblationSettings, plan, select_variants
from hsae.cli import app
from hsae.config import ConfigError, Similarity
from hsae.io import read_json
from hsae.runs import Run

# The shared small run trains 256-token batches and rebuilds its forest every 4 steps.
SHORT = 256 * 6


def test_selection_expands_groups_and_names_in_table_order() -> None:
    settings = AblationSettings(variants=("rho", "tree=binary", "core"), rho_sweep=(1.0, 0.1))
    names = [variant.name for variant in select_variants(settings)]
    assert names == [
        "baseline",
        "hsae",
        "no_constraint",
        "no_perturbation",
        "tree=binary",
        "rho=1",
        "rho=0.1",
    ]
    everything = select_variants(AblationSettings())
    assert len(everything) == 4 + 4 + 5 + 4 + 5
    # Every forest similarity the config accepts is a variant (one place lists them).
    similarities = {v.overrides["similarity"] for v in everything if v.group == "similarity"}
    assert similarities == set(get_args(Similarity))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"variants": ("tree=bushy",)}, "variants: unknown variant 'tree=bushy'; allowed: all"),
        ({"variants": ()}, "variants: nothing selected"),
        ({"rho_sweep": (0.1, -1.0)}, "rho_sweep: every value must be a finite number >= 0"),
        ({"r_sweep": (1.5,)}, r"r_sweep: every value must lie in \[0, 1\], got 1.5"),
        ({"train_tokens": 0}, "train_tokens: must be >= 1"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AblationSettings(**values)


def test_coinciding_variants_share_one_model_and_the_runs_models_are_reused(
    small_run: Run,
) -> None:
    by_name = {entry.variant.name: entry for entry in plan(small_run, AblationSettings())}
    # The run uses the partial tree, decoder similarity, rho 0.3 and r 0.05.
    for name in ("tree=partial", "similarity=decoder", "rho=0.3", "r=0.05"):
        assert by_name[name].folder == "hsae", name
    assert by_name["r=0"].folder == "no_perturbation"
    assert by_name["rho=1"].folder == "rho=1"
    assert by_name["hsae"].reused == small_run.model_dir("hsae")
    assert by_name["baseline"].reused == small_run.model_dir("baseline")
    assert by_name["tree=full"].reused is None
    assert by_name["tree=binary"].config.tree == "binary"
    assert by_name["baseline"].config.mode == "independent"

    shorter = plan(small_run, AblationSettings(variants=("core",), train_tokens=SHORT))
    assert all(entry.reused is None for entry in shorter)
    assert {entry.config.train_tokens for entry in shorter} == {SHORT}


def test_too_short_for_one_forest_rebuild_is_refused(small_run: Run) -> None:
    with pytest.raises(ConfigError, match="train_tokens = 1024 gives 4 steps"):
        plan(small_run, AblationSettings(variants=("hsae",), train_tokens=1024))


def _ablate(run: Run, out: Path, *extra: str) -> object:
    return CliRunner().invoke(app, ["ablate", str(run.folder), "--out", str(out), *extra])


def test_ablate_writes_table_json_figure_and_skips_finished_variants(
    small_run: Run, tmp_path: Path
) -> None:
    out = tmp_path / "ablations"
    args = ("--train-tokens", str(SHORT), "--variants", "core,tree=binary,rho")
    result = _ablate(small_run, out, *args, "--rho-sweep", "0.3,1")
    assert result.exit_code == 0, result.output
    assert "| rho=0.3 (= hsae) |" in result.output

    results = read_json(out / "ablations.json")
    records = {record["name"]: record for record in results["variants"]}
    assert list(records) == [
        "baseline",
        "hsae",
        "no_constraint",
        "no_perturbation",
        "tree=binary",
        "rho=0.3",
        "rho=1",
    ]
    assert records["baseline"]["differs"] == {"mode": "independent"}
    assert records["no_constraint"]["differs"] == {"rho": 0.0}
    assert records["tree=binary"]["differs"] == {"tree": "binary"}
    assert records["rho=0.3"]["differs"] == {} and records["rho=0.3"]["trained_as"] == "hsae"
    assert results["heldout_tokens"] == small_run.config.eval_tokens
    for record in records.values():
        assert len(record["levels"]) == 3
        assert record["train_seconds"] > 0 and not record["reused_from_run"]
        assert record["hierarchy"]["n_parents"] > 0
        assert 0 <= record["hierarchy"]["p_parent_given_child"] <= 1
    saved = read_json(out / "variants" / "tree=binary" / "hsae" / "hsae_config.json")["training"]
    assert saved["tree"] == "binary" and saved["train_tokens"] == SHORT
    table = (out / "ablations.md").read_text()
    assert table.startswith("| variant | Hamming/1k |") and table.count("\n| ") == 8
    assert (out / "figure8.png").read_bytes()[:4] == b"\x89PNG"
    assert not (small_run.folder / "ablations").exists()

    weights = sorted(out.glob("variants/*/*/hsae.safetensors"))
    assert len(weights) == 6  # seven rows, rho=0.3 is the reference
    stamps = [path.stat().st_mtime_ns for path in weights]
    again = _ablate(small_run, out, *args, "--rho-sweep", "0.3,1")
    assert again.exit_code == 0, again.output
    assert [path.stat().st_mtime_ns for path in weights] == stamps
    assert read_json(out / "ablations.json")["variants"] == results["variants"]

    # (3072 tokens would be the run's own settings: its trained baseline would be reused)
    other = _ablate(small_run, out, "--train-tokens", "2048", "--variants", "baseline")
    assert other.exit_code == 2
    assert "other settings (train_tokens: 1536 vs 2048)" in other.output


def test_cli_refuses_unknown_variant_and_bad_sweep(small_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = _ablate(small_run, out, "--variants", "tree=bushy")
    assert result.exit_code == 2 and "unknown variant 'tree=bushy'" in result.output
    result = _ablate(small_run, out, "--r-sweep", "0,x")
    assert result.exit_code == 2 and "--r-sweep" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_killed_ablation_continues_where_it_stopped(small_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "ablations"
    command = [sys.executable, "-m", "hsae.cli", "ablate", str(small_run.folder)]
    command += ["--out", str(out), "--variants", "baseline,hsae", "--train-tokens", "102400"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    checkpoint = out / "variants" / "hsae" / "checkpoints" / "hsae" / "trainer.json"
    baseline = out / "variants" / "baseline" / "baseline" / "hsae.safetensors"
    while not checkpoint.exists() and victim.poll() is None:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert baseline.is_file() and not (out / "variants" / "hsae" / "hsae").exists()
    stamp = baseline.stat().st_mtime_ns

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert baseline.stat().st_mtime_ns == stamp
    log = (out / "variants" / "hsae" / "logs" / "train_hsae.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == sorted(set(steps)) and steps[-1] == 400
