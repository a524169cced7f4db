"""LLM judges against a real local OpenAI-compatible HTTP server with scripted answers."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from hsae.evaluation.judges import (
    FeatureContexts,
    autointerp,
    detection_scores,
    hierarchy_judge,
    parse_detection,
    parse_explanation,
    parse_verdict,
)
from hsae.evaluation.llm import JudgeClient, JudgeError, JudgeSettings, judge_available
from hsae.labels import load_labels, save_labels
from hsae.runs import Run
from openai_stub_server import Reply, StubServer

SECRET = "sk-test-SECRET-4242"
PROMPT = [{"role": "user", "content": "say something"}]


def _settings(server: StubServer, **changes) -> JudgeSettings:
    values = {"base_url": server.base_url, "model": "stub-model", "backoff_s": 0.001}
    return JudgeSettings(**(values | {"cache_dir": None} | changes))


def _prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"prompt {i}"}] for i in range(n)]


def _echo(body, n) -> str:
    return "echo: " + body["messages"][-1]["content"]


# --------------------------------------------------------------------------- settings


def test_settings_come_from_the_environment_and_never_show_the_key() -> None:
    assert judge_available({})[0] is False
    ok, reason = judge_available({"HSAE_JUDGE_BASE_URL": "http://localhost:8000/v1"})
    assert not ok and "HSAE_JUDGE_MODEL" in reason
    env = {"OPENAI_API_KEY": SECRET, "HSAE_JUDGE_MODEL": "m", "HSAE_JUDGE_MAX_REQUESTS": "7"}
    ok, reason = judge_available(env)
    assert ok and "api.openai.com" in reason and SECRET not in reason
    settings = JudgeSettings.from_env(env | {"HSAE_JUDGE_CACHE_DIR": "off"})
    assert settings.api_key == SECRET and settings.max_requests == 7
    assert settings.base_url == "https://api.openai.com/v1" and settings.cache_dir is None
    assert SECRET not in repr(settings) and SECRET not in json.dumps(settings.describe())
    local = JudgeSettings.from_env(
        env | {"HSAE_JUDGE_BASE_URL": "http://user:pw@host:9/v1/?token=x", "OPENAI_BASE_URL": "y"}
    )
    assert local.endpoint == "http://host:9/v1"
    with pytest.raises(JudgeError, match="HSAE_JUDGE_CONCURRENCY"):
        JudgeSettings.from_env(env | {"HSAE_JUDGE_CONCURRENCY": "many"})
    with pytest.raises(JudgeError, match="no judge endpoint"):
        JudgeSettings.from_env({"HSAE_JUDGE_MODEL": "m"})
    with pytest.raises(JudgeError, match="HSAE_JUDGE_MODEL"):
        JudgeSettings.from_env({"HSAE_JUDGE_BASE_URL": "http://localhost:1/v1"})
    given = JudgeSettings.from_env({"HSAE_JUDGE_BASE_URL": "http://localhost:1/v1"}, model="x")
    assert given.model == "x" and given.api_key is None


# --------------------------------------------------------------------------- the client


def test_requests_run_concurrently_up_to_the_limit_and_keep_their_order() -> None:
    with StubServer(lambda body, n: Reply(text=_echo(body, n), delay=0.25)) as server:
        client = JudgeClient(_settings(server, max_concurrency=4))
        batch = client.complete_many(_prompts(8), progress=False)
        assert [c.text for c in batch.completions] == [f"echo: prompt {i}" for i in range(8)]
        # Concurrency shows in the server's count of requests in flight at once (a wall-clock
        # bound would fail on a loaded host): 0.25 s replies overlap unless sent one by one.
        assert 2 <= server.max_in_flight <= 4
        server.max_in_flight = 0
        serial = JudgeClient(_settings(server, max_concurrency=1))
        serial.complete_many(_prompts(3), progress=False)
        assert server.max_in_flight == 1
    assert server.hits == 11


def test_a_429_is_retried_after_the_time_retry_after_asks_for(caplog) -> None:
    def answer(body, n):
        return Reply(429, "slow down", {"Retry-After": "0.4"}) if n == 0 else "fine"

    caplog.set_level(logging.WARNING)
    with StubServer(answer) as server:
        client = JudgeClient(_settings(server, api_key=SECRET))
        started = time.perf_counter()
        assert client.complete(PROMPT).text == "fine"
        assert time.perf_counter() - started >= 0.4
    assert server.hits == 2 and client.usage.retries == 1
    assert "HTTP 429" in caplog.text and SECRET not in caplog.text


def test_a_500_storm_ends_in_a_clear_error_or_counted_failures() -> None:
    with StubServer(lambda body, n: Reply(500, "overloaded")) as server:
        client = JudgeClient(_settings(server, max_retries=2))
        with pytest.raises(JudgeError, match="kept failing: HTTP 500 after 3 attempts"):
            client.complete(PROMPT)
        assert server.hits == 3
        batch = client.complete_many(_prompts(3), progress=False)
    assert batch.completions == [None, None, None]
    assert all("HTTP 500" in error for error in batch.errors)
    assert client.usage.failures == 3 and server.hits == 3 + 9


def test_a_refused_key_stops_the_batch_with_a_redacted_error() -> None:
    def answer(body, n):
        return Reply(401, f"Incorrect API key provided: {SECRET}")

    with StubServer(answer) as server:
        client = JudgeClient(_settings(server, api_key=SECRET, max_concurrency=1))
        with pytest.raises(JudgeError, match="HTTP 401") as error:
            client.complete_many(_prompts(5), progress=False)
    assert error.value.fatal and SECRET not in str(error.value)
    assert server.hits == 1


def test_the_cache_answers_a_rerun_without_any_request(tmp_path: Path) -> None:
    with StubServer(_echo) as server:
        first = JudgeClient(_settings(server, cache_dir=tmp_path / "cache"))
        texts = [c.text for c in first.complete_many(_prompts(5), progress=False).completions]
        assert server.hits == 5
        again = JudgeClient(_settings(server, cache_dir=tmp_path / "cache"))
        batch = again.complete_many(_prompts(5), progress=False)
        assert server.hits == 5
        assert [c.text for c in batch.completions] == texts
        assert all(c.cached for c in batch.completions) and again.usage.cache_hits == 5
        other_model = JudgeClient(_settings(server, cache_dir=tmp_path / "cache", model="other"))
        other_model.complete(_prompts(1)[0])
        other_params = JudgeClient(_settings(server, cache_dir=tmp_path / "cache"))
        other_params.complete(_prompts(1)[0], temperature=0.7)
        assert server.hits == 7
    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 7 and all(json.loads(f.read_text())["text"] for f in files)


def test_the_budget_stops_requests_at_the_limit() -> None:
    with StubServer(_echo) as server:
        client = JudgeClient(_settings(server, max_requests=3, max_concurrency=2))
        batch = client.complete_many(_prompts(8), progress=False)
        assert server.hits == 3
        assert sum(c is not None for c in batch.completions) == 3
        assert batch.stopped is not None and "3 of 3 requests" in batch.stopped
        assert batch.errors == [None] * 8  # not sent is not a failure
        tokens = JudgeClient(_settings(server, max_total_tokens=250, max_concurrency=1))
        batch = tokens.complete_many(_prompts(8), progress=False)
        assert server.hits == 3 + 3 and tokens.usage.tokens == 300
        assert batch.stopped is not None and "HSAE_JUDGE_MAX_TOKENS" in batch.stopped


def test_the_key_is_sent_but_never_stored(tmp_path: Path) -> None:
    with StubServer(lambda body, n: f"my key is {SECRET}") as server:
        client = JudgeClient(_settings(server, api_key=SECRET, cache_dir=tmp_path / "cache"))
        batch = client.complete_many(_prompts(2), progress=False)
        plain = JudgeClient(_settings(server))
        plain.complete(PROMPT)
    assert server.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert "Authorization" not in server.requests[-1].headers
    for file in (tmp_path / "cache").rglob("*"):
        if file.is_file():
            assert SECRET not in file.read_text()
    assert SECRET not in repr(client)
    assert all(c.text == "my key is ***" for c in batch.completions)


# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("reply", "relationship", "confidence"),
    [
        ("HaveRelationship: Yes\nConfidence: High", True, "high"),
        ("haverelationship: no\nconfidence: low", False, "low"),
        (
            "Sure! Looking at both...\n**HaveRelationship:** YES.\n**Confidence:** medium",
            True,
            "medium",
        ),
        ("Have relationship - No (they differ). Confidence = Medium", False, "medium"),
        ("HaveRelationship: Yes", True, None),
        ("Yes, feature 2 is narrower.", None, None),
        ("HaveRelationship: maybe\nConfidence: High", None, "high"),
        ("HaveRelationship: Yes\nHaveRelationship: No", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_verdict_parser(reply, relationship, confidence) -> None:
    verdict = parse_verdict(reply)
    assert verdict.relationship is relationship and verdict.confidence == confidence


def test_explanation_and_detection_parsers_and_scores() -> None:
    assert parse_explanation("Explanation: plural nouns of animals") == "plural nouns of animals"
    assert parse_explanation("Thinking...\n**Explanation:** 'the word <<of>>'.") == "the word of'."
    assert parse_explanation("dates and years") == "dates and years"
    assert parse_explanation("first line\nsecond line") is None
    assert parse_explanation("Explanation:   ") is None
    assert parse_detection("Answer: 1, 3,4", 5) == {1, 3, 4}
    assert parse_detection("I think...\nanswer: none", 5) == set()
    assert parse_detection("2, 5", 5) == {2, 5}
    assert parse_detection("Answer: 1, 9", 5) is None
    assert parse_detection("no idea", 5) is None
    assert parse_detection(None, 5) is None
    assert detection_scores({1, 2}, [True, True, False, False]) == (1.0, 1.0)
    accuracy, balanced = detection_scores(set(), [True, False, False, False])
    assert accuracy == 0.75 and balanced == 0.5
    accuracy, balanced = detection_scores({1, 3}, [True, True, False, False, False, False])
    assert accuracy == pytest.approx(4 / 6) and balanced == pytest.approx((0.5 + 0.75) / 2)


# --------------------------------------------------------------------------- end to end


class ScriptedJudge:
    """Answers by prompt kind; hierarchy answers cycle through Yes / No / malformed."""

    HIERARCHY = [
        "HaveRelationship: Yes\nConfidence: High",
        "haverelationship: no, confidence: low",
        "I cannot tell.",
    ]

    def __init__(self) -> None:
        self.hierarchy_seen = 0
        self.lock = threading.Lock()

    def __call__(self, body, n) -> str:
        prompt = body["messages"][-1]["content"]
        if "HaveRelationship" in prompt:
            with self.lock:
                self.hierarchy_seen += 1
                return self.HIERARCHY[(self.hierarchy_seen - 1) % 3]
        if "Explanation:" in prompt:
            return f"Explanation: tokens like {prompt.split('<<')[1].split('>>')[0]!r}"
        return "Answer: None"


def _copy_run(run: Run, target: Path) -> Run:
    keep = {"run.json", "activations", "hsae", "baseline"}
    target.mkdir()
    for item in run.folder.iterdir():
        if item.name in keep:
            (shutil.copytree if item.is_dir() else shutil.copy)(item, target / item.name)
    return Run.open(target)


@pytest.fixture(scope="module")
def tokenizer():
    from hsae.activations.models import load_tokenizer

    return load_tokenizer(None)


def test_both_judges_on_a_small_real_run(small_run: Run, tmp_path: Path, tokenizer) -> None:
    run = _copy_run(small_run, tmp_path / "run")
    save_labels(run.folder, {"hsae": {"0:0": "a human label"}})
    contexts = {
        w: FeatureContexts(run, w, seed=3, tokenizer=tokenizer) for w in run.wanted_models()
    }
    judge = ScriptedJudge()
    with StubServer(judge) as server:
        settings = _settings(server, api_key=SECRET, cache_dir=tmp_path / "cache")
        client = JudgeClient(settings)
        hier = {w: hierarchy_judge(run, w, client, 6, 3, contexts[w], False) for w in contexts}
        auto = autointerp(run, "hsae", client, 6, 3, contexts["hsae"], progress=False)
        hits = server.hits
        rerun = JudgeClient(settings)
        again = hierarchy_judge(run, "hsae", rerun, 6, 3, contexts["hsae"], False)
        auto_again = autointerp(run, "hsae", rerun, 6, 3, contexts["hsae"], progress=False)
        assert server.hits == hits  # everything came from the cache
        prompts = [seen.prompt for seen in server.requests]

    # hierarchy: same number of seeded pairs for both models, real forest links, honest counts
    assert hier["hsae"]["n_pairs"] == hier["baseline"]["n_pairs"] == 6
    for which, result in hier.items():
        forest = run.load(which).forest()
        for pair in result["pairs"]:
            (pl, pi), (cl, ci) = (map(int, pair[k].split(":")) for k in ("parent", "child"))
            assert cl == pl + 1 and int(forest[pl][ci]) == pi
    for result in hier.values():  # the scripted answers cycle Yes / No / malformed
        assert (result["yes"], result["no"], result["n_unparsable"]) == (2, 2, 2)
        assert result["n_parsed"] == result["yes"] + result["no"]
        assert result["yes_rate"] == pytest.approx(result["yes"] / result["n_parsed"], abs=1e-4)
        assert result["by_confidence"]["high"]["yes"] == result["yes"]
    hierarchy_prompts = [p for p in prompts if "HaveRelationship" in p]
    for prompt in hierarchy_prompts:
        blocks = prompt.split("Feature 2:")
        assert "<<" in blocks[0] and "<<" in blocks[1]
        assert 1 <= blocks[1].split("\n\nIs one")[0].count("\n") <= 15
    assert again["pairs"] == hier["hsae"]["pairs"]

    # autointerp: explanations from marked excerpts, scored on unmarked ones ("None" -> 0.5)
    assert auto["n_features"] == auto["n_scored"] > 0
    for feature in auto["features"]:
        total = feature["n_active"] + feature["n_silent"]
        assert feature["n_active"] >= 1 and feature["n_silent"] >= 1
        assert feature["accuracy"] == pytest.approx(feature["n_silent"] / total, abs=1e-4)
        assert feature["balanced_accuracy"] == 0.5
    assert auto["balanced_accuracy"] == 0.5
    assert {entry["level"] for entry in auto["by_level"] if entry["n"]} == {0, 1, 2}
    scoring = [p for p in prompts if "'Answer:'" in p]
    assert scoring and not any("<<" in p for p in scoring)
    assert auto_again["features"] == auto["features"]

    labels = load_labels(run.folder)
    assert labels["hsae"] == {"0:0": "a human label"}
    assert labels["judge"] == settings.describe()
    for feature in auto["features"]:
        assert labels["auto"]["hsae"][feature["feature"]]["label"] == feature["explanation"]

    from hsae.report.explorer import ReportSettings, build_report_data

    page = build_report_data(run, ReportSettings(projection="none"), tokenizer=tokenizer)
    shown = auto["features"][0]["feature"]
    assert page["features"][shown]["auto_label"] == auto["features"][0]["explanation"]

    stored = json.dumps([hier, auto]) + (run.folder / "labels.json").read_text()
    stored += "".join(f.read_text() for f in (tmp_path / "cache").rglob("*.json"))
    assert SECRET not in stored


def test_a_spent_budget_gives_partial_results(small_run: Run, tmp_path: Path, tokenizer) -> None:
    contexts = FeatureContexts(small_run, "hsae", seed=1, tokenizer=tokenizer)
    with StubServer(ScriptedJudge()) as server:
        client = JudgeClient(_settings(server, max_requests=2, max_concurrency=1))
        result = hierarchy_judge(small_run, "hsae", client, 5, 1, contexts, False)
        auto = autointerp(
            small_run, "hsae", client, 3, 1, contexts, write_labels=False, progress=False
        )
    assert server.hits == 2
    assert result["n_answered"] == 2 and result["n_not_sent"] == 3 and result["n_failed"] == 0
    assert "results are partial" in result["stopped"]
    assert auto["n_scored"] == 0 and auto["n_not_answered"] == 3 and auto["stopped"]
