"""The feature-forest explorer on a small real run: numbers against brute force, truncation,
labels, escaping of corpus text, the CLI, and the page itself in headless Chromium."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hsae.activations import load_language_model
from hsae.activations.models import LanguageModel
from hsae.cli import app
from hsae.evaluation.contexts import LevelStats, RowSource
from hsae.report import (
    LabelsError,
    ReportError,
    ReportSettings,
    build_report_data,
    load_labels,
    render_html,
    save_labels,
)
from hsae.report.explorer import forest_view
from hsae.report.html import embed_json
from hsae.runs import Run
from hsae.steering import logit_effect

REPORT = ReportSettings(projection="pca", max_features=80, chunk_size=500)
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = '"><img src=x onerror="window.__pwned=1">'


def _chromium() -> str | None:
    for candidate in (os.environ.get("HSAE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def run(small_run: Run) -> Run:
    save_labels(
        small_run.folder,
        {
            "hsae": {"0:0": "first root"},
            "auto": {"hsae": {f"0:{i}": {"label": f"judged {i}"} for i in range(32)}},
        },
    )
    return small_run


@pytest.fixture(scope="module")
def tokenizer(run: Run) -> Any:
    return run.cache()._load_tokenizer()


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return load_language_model(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def data(run: Run, tokenizer: Any, lm: LanguageModel) -> dict[str, Any]:
    return build_report_data(run, REPORT, tokenizer=tokenizer, lm=lm)


# --------------------------------------------------------------------------- numbers


def _dense_codes(run: Run, rows: int) -> list[torch.Tensor]:
    model = run.load("hsae")
    source = RowSource(run.cache(), "train")
    return model.encode(source.gather(np.arange(rows)))


def test_top_contexts_frequencies_and_p_parent_match_brute_force(
    run: Run, data: dict, tokenizer: Any
) -> None:
    scanned = data["meta"]["tokens_scanned"]
    assert scanned == run.cache().n_tokens("train")
    codes = _dense_codes(run, scanned)
    model = run.load("hsae")
    info = run.cache().token_info("train")
    strings = {t: tokenizer.decode([int(t)]) for t in np.unique(info.token_ids)}
    checked = 0
    for key, feature in data["features"].items():
        level, index = feature["level"], feature["index"]
        column = codes[level][:, index]
        assert feature["fires"] == int((column > 0).sum()), key
        expected = column.topk(REPORT.top_k).values
        expected = expected[expected > 0]
        shown = [data["contexts"][i] for i in feature["top"]]
        got = torch.tensor([ctx["a"][ctx["at"]] for ctx in shown])
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
        for ctx in shown:  # the shaded window is the feature's activation on each token
            window = np.arange(len(ctx["t"])) + ctx["row"] - ctx["at"]
            assert len(set(info.context_ids[window])) == 1  # never crosses a context
            tokens = [data["tokens"][t] for t in ctx["t"]]
            assert tokens == [strings[t] for t in info.token_ids[window]]
            torch.testing.assert_close(torch.tensor(ctx["a"]), column[window], atol=2e-3, rtol=1e-3)
        if feature["parent"] is not None:
            parent = int(model.parents(level - 1)[index])
            both = ((column > 0) & (codes[level - 1][:, parent] > 0)).sum()
            assert feature["p_parent"] == pytest.approx(float(both) / feature["fires"], abs=1e-3)
        checked += 1
    assert checked == data["meta"]["shown_features"] > 0


def test_weighted_samples_are_proportional_to_activation() -> None:
    stats = LevelStats(n_features=20_000, top_k=1, n_samples=1)
    acts = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).repeat(20_000, 1).T.contiguous()
    tokens = torch.zeros(5, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    stats.add(acts, torch.arange(5), tokens, 1, generator, None, None)
    share = torch.bincount(stats.sample_rows[0], minlength=5).double() / 20_000
    torch.testing.assert_close(
        share, torch.tensor([0, 0.1, 0.2, 0.3, 0.4]).double(), atol=0.015, rtol=0
    )
    assert (stats.top_rows[0] == 4).all() and (stats.fires == 4).all()


class _ShardedCache:
    """Three shards of 5, 1 and 7 rows; row r holds the value r in every column."""

    d_model = 3

    def __init__(self) -> None:
        self.rows = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 13)]

    def shards(self, split: str) -> list[dict[str, Any]]:
        return [{"index": i, "n_tokens": len(r)} for i, r in enumerate(self.rows)]

    def open_shard(self, shard: dict[str, Any]) -> tuple[np.ndarray, None]:
        return np.repeat(self.rows[shard["index"]][:, None], 3, 1).astype(np.float16), None


def test_rows_are_read_and_gathered_across_shards() -> None:
    source = RowSource(_ShardedCache(), "train")
    chunks = list(source.chunks(limit=11, size=4))
    assert [start for start, _ in chunks] == [0, 4, 5, 6, 10]
    assert torch.cat([block[:, 0] for _, block in chunks]).tolist() == list(range(11))
    wanted = np.array([12, 0, 5, 4, 6, 5])
    assert source.gather(wanted)[:, 2].tolist() == wanted.tolist()


def test_top_tokens_and_sampled_contexts(run: Run, data: dict) -> None:
    scanned = data["meta"]["tokens_scanned"]
    codes = _dense_codes(run, scanned)
    token_ids = run.cache().token_info("train").token_ids[:scanned]
    key = max(data["features"], key=lambda k: data["features"][k]["fires"])
    feature = data["features"][key]
    fired = token_ids[(codes[feature["level"]][:, feature["index"]] > 0).numpy()]
    ids, counts = np.unique(fired, return_counts=True)
    assert feature["top_tokens"][0][1] == counts.max()
    shown_counts = [count for _, count in feature["top_tokens"]]
    assert shown_counts == sorted(counts, reverse=True)[: len(shown_counts)]
    assert len(feature["sampled"]) == min(REPORT.n_sampled, feature["fires"])
    for i in feature["sampled"]:
        ctx = data["contexts"][i]
        assert ctx["a"][ctx["at"]] > 0  # sampled in proportion to activation: never a zero


def test_forest_is_truncated_to_whole_largest_trees(run: Run, data: dict) -> None:
    meta, features = data["meta"], data["features"]
    assert meta["truncated"] and meta["shown_features"] <= REPORT.max_features
    assert meta["shown_trees"] < meta["total_trees"]
    for key, feature in features.items():
        if feature["parent"] is not None:
            assert feature["parent"] in features, key  # every shown node hangs from its tree
            assert key in features[feature["parent"]]["children"]
    sizes = [features[root]["descendants"] for root in data["roots"]]
    assert sizes == sorted(sizes, reverse=True)
    deepest = max(f["level"] for f in features.values())
    assert deepest == len(meta["level_sizes"]) - 1
    groups = data["projection"]["groups"]
    siblings = [features[g["feature"]] for g in groups if g["role"] == "sibling"]
    unrelated = [features[g["feature"]] for g in groups if g["role"] == "unrelated"]
    assert len(siblings) >= 2 and len({f["parent"] for f in siblings}) == 1
    assert len(unrelated) == 1 and unrelated[0]["level"] == siblings[0]["level"]
    assert _root(features, unrelated[0]) != _root(features, siblings[0])
    model = run.load("hsae")
    freq = [np.ones(size) for size in model.config.level_sizes]
    whole = forest_view(model, freq, max_features=10**6, max_children=10**6)
    assert not whole.truncated and len(whole.shown) == meta["total_features"]


def test_baseline_without_metrics_or_projection(
    run: Run, tokenizer: Any, lm: LanguageModel, tmp_path: Path
) -> None:
    bare = Run.create(tmp_path / "bare", run.config)
    for part in ("activations", "hsae", "baseline"):
        (bare.folder / part).symlink_to(run.folder / part, target_is_directory=True)
    settings = ReportSettings(which="baseline", projection="none", max_features=30)
    data = build_report_data(bare, settings, tokenizer=tokenizer, lm=lm)
    assert data["metrics"] is None and data["projection"] is None
    assert data["meta"]["which"] == "baseline" and 0 < data["meta"]["shown_features"] <= 30
    baseline = run.load("baseline")
    for key, feature in data["features"].items():
        if feature["parent"] is not None:
            parent = int(baseline.parents(feature["level"] - 1)[feature["index"]])
            assert feature["parent"] == f"{feature['level'] - 1}:{parent}", key
    with pytest.raises(ReportError, match="no trained baseline"):
        (bare.folder / "baseline").unlink()
        build_report_data(bare, settings, tokenizer=tokenizer)


def _same_tokens(got: list, expected: list) -> None:
    """Same (token, score) lists, up to the order of tokens whose scores tie within 1e-3."""
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], rel=1e-4, abs=1e-4)
    for n, ((token, score), (want, _)) in enumerate(zip(got, expected, strict=True)):
        gaps = [abs(score - other) for m, (_, other) in enumerate(expected) if m != n]
        if not gaps or min(gaps) > 1e-3:
            assert token == want, (n, got, expected)


def test_logit_lens_of_each_shown_feature_matches_steering(
    run: Run, data: dict, lm: LanguageModel
) -> None:
    model = run.load("hsae")
    k = REPORT.logit_lens
    assert data["meta"]["logit_lens"] == {"k": k, "model": "gemma-3-270m", "note": ""}
    features = data["features"]
    by_level: dict[int, list[str]] = {}
    for key, feature in features.items():
        up, down = feature["lens"]["promoted"], feature["lens"]["suppressed"]
        assert len(up) == len(down) == k
        assert [s for _, s in up] == sorted((s for _, s in up), reverse=True)
        assert [s for _, s in down] == sorted(s for _, s in down)
        assert up[0][1] > 0 > down[0][1]
        by_level.setdefault(feature["level"], []).append(key)
    assert sorted(by_level) == list(range(len(model.config.level_sizes)))
    for key in [key for keys in by_level.values() for key in keys[:3]]:
        feature = features[key]
        expected = logit_effect(lm, model, feature["level"], feature["index"], k=k)
        for side in ("promoted", "suppressed"):
            got = [(data["tokens"][t], s) for t, s in feature["lens"][side]]
            _same_tokens(got, expected[side])


def test_report_without_its_language_model_says_why(
    run: Run, tokenizer: Any, tmp_path: Path
) -> None:
    moved = Run.create(tmp_path / "moved", run.config)
    (moved.folder / "hsae").symlink_to(run.folder / "hsae", target_is_directory=True)
    activations = moved.folder / "activations"
    activations.mkdir()
    for entry in (run.folder / "activations").iterdir():
        if entry.name != "manifest.json":
            (activations / entry.name).symlink_to(entry)
    manifest = json.loads((run.folder / "activations" / "manifest.json").read_text())
    manifest["model"]["name"] = str(tmp_path / "no-such-model")
    (activations / "manifest.json").write_text(json.dumps(manifest))
    settings = ReportSettings(projection="none", max_features=20)
    data = build_report_data(moved, settings, tokenizer=tokenizer)
    note = data["meta"]["logit_lens"]["note"]
    assert "could not be loaded here" in note and "no-such-model" in note
    assert data["features"] and all(f["lens"] is None for f in data["features"].values())
    assert data["meta"]["shown_features"] == len(data["features"]) > 0
    quiet = ReportSettings(projection="none", max_features=20, logit_lens=0)
    off = build_report_data(moved, quiet, tokenizer=tokenizer)
    assert off["meta"]["logit_lens"]["note"] == "the logit lens is off (logit_lens=0)"
    with pytest.raises(ReportError, match="logit_lens must be an integer >= 0"):
        ReportSettings(logit_lens=-1)


def _root(features: dict[str, Any], feature: dict[str, Any]) -> dict[str, Any]:
    while feature["parent"] is not None:
        feature = features[feature["parent"]]
    return feature


def test_labels_are_shown_and_bad_labels_refused(run: Run, data: dict, tmp_path: Path) -> None:
    assert data["features"]["0:0"]["label"] == "first root"
    roots = [data["features"][key] for key in data["roots"] if key != "0:0"]
    assert roots and all(f["auto_label"] == f"judged {f['index']}" for f in roots)
    assert load_labels(run.folder)["hsae"] == {"0:0": "first root"}
    with pytest.raises(LabelsError, match="level:index"):
        save_labels(tmp_path, {"hsae": {"twelve": "x"}})
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(LabelsError, match="not valid JSON"):
        load_labels(tmp_path)
    with pytest.raises(ReportError, match="max_features"):
        ReportSettings(max_features=0)


def test_json_block_cannot_close_the_script() -> None:
    text = embed_json({"t": [XSS_SCRIPT, XSS_IMG, "a & b", "\u2028"], "x": float("nan")})
    assert "<" not in text and ">" not in text and "&" not in text
    decoded = json.loads(text)
    assert decoded["t"][:2] == [XSS_SCRIPT, XSS_IMG] and decoded["x"] is None
    page = render_html({"meta": {}, "tokens": [XSS_SCRIPT]})
    assert XSS_SCRIPT not in page and page.count("<script") == 2


# --------------------------------------------------------------------------- CLI


def test_cli_writes_report_and_plots(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "page.html"
    args = ["report", str(run.folder), "--out", str(out), "--max-features", "40"]
    result = CliRunner().invoke(app, [*args, "--projection", "pca"])
    assert result.exit_code == 0, result.output
    assert "of 224 features" in result.output
    html = out.read_text(encoding="utf-8")
    embedded = _embedded(html)
    assert embedded["projection"]["method"] == "pca"
    assert embedded["meta"]["logit_lens"]["note"] == ""  # the run's model, loaded by its name
    assert all(len(f["lens"]["promoted"]) == 8 for f in embedded["features"].values())
    assert embedded["meta"]["shown_features"] <= 40
    assert 'type="application/json"' in html and "http://" not in html.replace(
        "http://www.w3.org/2000/svg", ""
    )
    for name in ("hierarchy.png", "levels.png", "projection.png"):
        assert (run.folder / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # numba compiles UMAP on first use: about 30 s
def test_default_projection_is_umap(run: Run, tokenizer: Any) -> None:
    data = build_report_data(run, ReportSettings(max_features=40), tokenizer=tokenizer)
    projection = data["projection"]
    assert projection["method"] == "umap" and projection["note"] == ""
    groups = {g for _, _, g in projection["points"]}
    assert groups == set(range(len(projection["groups"])))


def _embedded(html: str) -> dict[str, Any]:
    block = html.split('<script id="report-data" type="application/json">')[1]
    return json.loads(block.split("</script>")[0])


def test_cli_errors_are_one_line(tmp_path: Path, run: Run) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is not a run folder" in result.output
    result = CliRunner().invoke(app, ["report", str(run.folder), "--projection", "tsne"])
    assert result.exit_code == 2 and "projection must be" in result.output
    assert len(result.output.strip().splitlines()) == 1
    bad = Run.create(tmp_path / "bad", run.config)
    for part in ("activations", "hsae"):
        (bad.folder / part).symlink_to(run.folder / part, target_is_directory=True)
    (bad.folder / "labels.json").write_text('{"hsae": {"0:1": 5}}')
    result = CliRunner().invoke(app, ["report", str(bad.folder)])
    assert result.exit_code == 2 and "label of 0:1 must be a string" in result.output
    assert not (bad.folder / "report.html").exists()


# --------------------------------------------------------------------------- the browser


def _open(page_path: Path, actions) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    dialogs: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("requestfailed", lambda r: problems.append(f"request {r.url}"))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(page_path.as_uri())
            outcome = actions(page)
        finally:
            browser.close()
    return {"problems": problems, "dialogs": dialogs, "outcome": outcome}


@needs_chromium
def test_browser_expands_to_the_deepest_level_and_searches(
    run: Run, data: dict, tmp_path: Path
) -> None:
    path = run.folder / "report.html"
    path.write_text(render_html(data), encoding="utf-8")
    levels = len(data["meta"]["level_sizes"])
    deepest = next(k for k, f in data["features"].items() if f["level"] == levels - 1)
    chain, key = [], deepest
    while data["features"][key]["parent"]:
        key = data["features"][key]["parent"]
        chain.insert(0, key)
    root = data["features"][chain[0]]
    ctx = data["contexts"][root["top"][0]]
    query = data["tokens"][ctx["t"][ctx["at"]]].strip()
    shot = tmp_path / "report.png"

    def actions(page):
        assert "Truncated" in page.inner_text("#truncation")
        for key in chain:
            page.click(f'li[data-feature="{key}"] > .row > .toggle')
        leaf = page.locator(f'li[data-feature="{deepest}"]')
        leaf.wait_for(state="visible")
        leaf.locator(":scope > .row > .name").click()
        leaf_level = leaf.get_attribute("data-level")
        lens = [
            page.locator(f"#detail .lens-{kind} .chip").all_inner_texts() for kind in ("up", "down")
        ]
        page.fill("#search", query)
        page.locator("#results .result").first.wait_for()
        n_results = page.locator("#results .result").count()
        page.locator("#results .result").first.click()
        hot = page.locator("#detail .ctx .tok.hot").count()
        label = page.inner_text('li[data-feature="0:0"] > .row')
        page.fill("#search", "1:0" if "1:0" in data["features"] else deepest)
        searched = page.get_attribute("#detail", "data-feature")
        charts = page.locator("#charts svg").count()
        points = page.locator("#projection circle").count()
        page.screenshot(path=str(shot), full_page=True)
        return leaf_level, lens, n_results, hot, label, searched, charts, points

    result = _open(path, actions)
    leaf_level, lens, n_results, hot, label, searched, charts, points = result["outcome"]
    assert result["problems"] == [] and result["dialogs"] == []
    assert leaf_level == str(levels - 1)
    for shown, side in zip(lens, ("promoted", "suppressed"), strict=True):
        expected = [data["tokens"][t] for t, _ in data["features"][deepest]["lens"][side]]
        assert len(shown) == REPORT.logit_lens  # the leaf's own tokens, as the page shows text
        assert [t.strip() for t in shown] == [t.replace("\n", "\u23ce").strip() for t in expected]
    assert n_results >= 1 and hot >= 1
    assert "first root" in label
    assert searched in ("1:0", deepest)
    assert charts == 5 and points == len(data["projection"]["points"]) > 0
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, run.folder / "report.png")


@needs_chromium
def test_browser_shows_hostile_corpus_text_as_text(data: dict, tmp_path: Path) -> None:
    hostile = copy.deepcopy(data)
    root = hostile["features"][hostile["roots"][0]]
    ctx = hostile["contexts"][root["top"][0]]
    hostile["tokens"].extend([XSS_SCRIPT, XSS_IMG])
    ctx["t"][0], ctx["t"][-1] = len(hostile["tokens"]) - 2, len(hostile["tokens"]) - 1
    root["label"] = XSS_IMG
    root["lens"] = None  # as when the language model did not load: the node view says why
    hostile["meta"]["logit_lens"]["note"] = "no model " + XSS_IMG
    hostile["metrics"], hostile["projection"] = None, None  # the page copes without both
    path = tmp_path / "hostile.html"
    path.write_text(render_html(hostile), encoding="utf-8")

    def actions(page):
        text = page.inner_text("#detail")
        notes = page.inner_text("#metrics-note") + page.inner_text("#projection-note")
        return text, page.evaluate("window.__pwned"), page.locator("img").count(), notes

    result = _open(path, actions)
    text, pwned, images, notes = result["outcome"]
    assert "No metrics.json" in notes and "Projection disabled" in notes
    assert XSS_SCRIPT in text and XSS_IMG in text
    assert "Next-token effect (logit lens)" in text
    assert "Not in this report: no model " + XSS_IMG in text
    assert pwned is None and images == 0
    assert result["dialogs"] == [] and result["problems"] == []


def test_docs_list_every_setting_with_its_default() -> None:
    from dataclasses import fields

    text = (Path(__file__).resolve().parents[1] / "docs/report.md").read_text(encoding="utf-8")
    for field in fields(ReportSettings):
        assert f"| `{field.name}` | `{field.default}` |" in text, field.name
