"""hsae eval --suite full: every part that can run here runs, the rest is skipped with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hsae.cli import app
from hsae.runs import Run
from openai_stub_server import StubServer

JUDGE_VARIABLES = (
    "HSAE_JUDGE_BASE_URL",
    "HSAE_JUDGE_MODEL",
    "HSAE_JUDGE_API_KEY",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "HSAE_JUDGE_CACHE_DIR",
)


@pytest.fixture
def run_copy(small_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in JUDGE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    target = tmp_path / "run"
    shutil.copytree(small_run.folder, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


def _eval(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.output


def test_without_the_language_model_every_part_says_why_it_was_skipped(run_copy: Path) -> None:
    code, output = _eval(str(run_copy), "--suite", "full", "--no-lm")
    assert code == 0, output
    status = json.loads((run_copy / "metrics.json").read_text())["suite"]
    assert status["ran"] == [] and status["failed"] == {}
    skipped = status["skipped"]
    for part in ("absorption", "sparse_probing", "taxonomy", "sparse_probing_hf"):
        assert "--no-lm" in skipped[part]
    assert "HSAE_JUDGE_MODEL" in skipped["judges"] or "HSAE_JUDGE_BASE_URL" in skipped["judges"]
    assert "saebench" in skipped
    summary = (run_copy / "summary.md").read_text()
    assert "skipped judges:" in summary and "skipped absorption:" in output


def test_an_unknown_part_is_refused_before_any_work(run_copy: Path) -> None:
    code, output = _eval(str(run_copy), "--suite", "full", "--parts", "absorption,vibes")
    assert code == 2 and "unknown suite part(s) ['vibes']" in output
    code, output = _eval(str(run_copy), "--suite", "everything")
    assert code == 2 and "suite must be one of" in output


def test_the_judges_run_when_an_endpoint_is_configured(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer(body: dict, n: int) -> str:
        prompt = body["messages"][-1]["content"]
        if "HaveRelationship" in prompt:
            return "HaveRelationship: Yes\nConfidence: High" if n % 2 else "no idea"
        if "'Answer:'" in prompt:
            return "Answer: 1, 2"
        return "Explanation: the letter e"

    with StubServer(answer) as server:
        monkeypatch.setenv("HSAE_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("HSAE_JUDGE_MODEL", "stub-judge")
        monkeypatch.setenv("HSAE_JUDGE_CACHE_DIR", str(tmp_path / "judge-cache"))
        args = ["--suite", "full", "--no-lm", "--parts", "judges", "--judge-pairs", "4"]
        code, output = _eval(str(run_copy), *args, "--judge-features", "3")
        assert server.hits > 0
    assert code == 0, output
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["suite"]["ran"] == ["judges"]
    for which in ("hsae", "baseline"):
        hierarchy = metrics["judges"][which]["hierarchy"]
        assert hierarchy["n_pairs"] == 4
        assert hierarchy["n_parsed"] + hierarchy["n_unparsable"] == 4
        assert metrics["judges"][which]["autointerp"]["n_features"] == 3
    assert "hierarchy judge: Yes rate" in output


@pytest.mark.slow
def test_the_language_model_parts_on_a_small_run(run_copy: Path) -> None:
    parts = "absorption,sparse_probing,taxonomy"
    args = ["--suite", "full", "--parts", parts, "--absorption-words", "400"]
    code, output = _eval(str(run_copy), *args, "--contexts-per-category", "40")
    assert code == 0, output
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["suite"]["ran"] == parts.split(",")
    for which in ("hsae", "baseline"):
        scores = [level["score"] for level in metrics["absorption"][which]["levels"]]
        assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
        probing = metrics["sparse_probing"][which]["levels"]
        assert all(0.4 <= level["top_5_accuracy"] <= 1.0 for level in probing)
        assert len(metrics["taxonomy"][which]["pairs"]) == 2
    assert metrics["sparse_probing"]["raw"]["all_accuracy"] > 0.7
    assert "taxonomy: all links" in output and "absorption" in output

    # the language-model side was saved: a rerun without the language model gives the same
    cached = sorted(p.name.split("-")[0] for p in (run_copy / "eval_cache").iterdir())
    assert cached == ["absorption", "lexicon"]
    code, output = _eval(str(run_copy), *args, "--contexts-per-category", "40", "--no-lm")
    assert code == 0, output
    again = json.loads((run_copy / "metrics.json").read_text())
    assert again["suite"]["ran"] == parts.split(",")
    for part in parts.split(","):
        assert again[part] == metrics[part]

    from hsae.report.explorer import ReportSettings, build_report_data
    from hsae.report.plots import write_plots

    page = build_report_data(Run.open(run_copy), ReportSettings(projection="none"))
    charts = {chart["key"]: chart for chart in page["metrics"]["hsae"]["suite"]}
    assert list(charts) == ["absorption", "probing_top5", "taxonomy"]
    assert charts["absorption"]["values"] == [
        level["score"] for level in metrics["absorption"]["hsae"]["levels"]
    ]
    assert len(charts["probing_top5"]["values"]) == 3 and len(charts["taxonomy"]["values"]) == 2
    assert charts["taxonomy"]["per_pair"] and not charts["absorption"]["per_pair"]
    assert run_copy / "plots" / "suite.png" in write_plots(page, run_copy / "plots")


def test_probing_on_a_labelled_dataset_folder(run_copy: Path, tmp_path: Path) -> None:
    """The Hugging Face probing part reads any `datasets` source: here a local JSONL folder."""
    pytest.importorskip("datasets")
    subjects = {
        "animal": ["cat", "dog", "horse", "sparrow", "tiger", "rabbit", "whale", "frog"],
        "finance": ["bond", "loan", "stock", "dividend", "mortgage", "budget", "tax", "invoice"],
    }
    verbs = ["saw", "liked", "talked about", "wrote about", "asked about", "remembered"]
    folder = tmp_path / "labelled"
    folder.mkdir()
    lines = [
        json.dumps({"sentence": f"My neighbour {verb} the {word} again.", "topic": topic})
        for topic, words in subjects.items()
        for word in words
        for verb in verbs[:4]
    ]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--parts", "sparse_probing_hf", "--hf-probing-dataset", str(folder)]
    fields = ["--hf-text-field", "sentence", "--hf-label-field", "topic"]
    code, output = _eval(str(run_copy), "--suite", "full", *args, *fields)
    assert code == 0, output
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["suite"]["ran"] == ["sparse_probing_hf"]
    part = metrics["sparse_probing_hf"]
    assert part["dataset"] == str(folder)
    assert part["raw"]["all_accuracy"] >= 0.9  # the topic word is the object of every sentence
    assert len(part["hsae"]["levels"]) == 3
    assert f"sparse probing ({folder})" in output
