"""LLM judges: Hierarchy AutoInterp (hsae-method.md section 6) and automatic interpretability.

Both judges read a feature through text excerpts taken from the run's activation cache with the
explorer's own scan (:func:`hsae.evaluation.contexts.scan`): per feature, the ``n_top`` (10)
highest-activating contexts and ``n_sampled`` (5) contexts drawn in proportion to activation,
with the tokens the feature fires on marked ``<<like this>>``.

* :func:`hierarchy_judge` samples parent-child pairs of the forest (seeded) and asks whether one
  feature is a more specific version of the other (``HaveRelationship: Yes/No``,
  ``Confidence: High/Medium/Low``); the metric is the Yes rate over parsed answers, also split
  by confidence, with unparsable and failed answers counted, never guessed.
* :func:`autointerp` has the judge explain sampled features from their contexts, then score
  each explanation by detection: shown a shuffled mix of held-out activating excerpts and
  excerpts where the feature is silent (no markers), the judge lists the ones that activate;
  accuracy and balanced accuracy per feature, means per level and per model. The explanations
  go into the run's ``labels.json`` (``auto`` section) so the explorer shows them.

All results are JSON-able dicts; requests go through :class:`hsae.evaluation.llm.JudgeClient`
(cache, retries, budget). See docs/judges.md.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hsae.errors import HSAEError
from hsae.evaluation.contexts import (
    RowSource,
    ScanSettings,
    context_windows,
    feature_key,
    scan,
    window_activations,
)
from hsae.evaluation.llm import Batch, JudgeClient, Message
from hsae.labels import load_labels, save_labels
from hsae.layout import Which

Feature = tuple[int, int]
"""(level, index)."""

MARK_OPEN, MARK_CLOSE = "<<", ">>"


class JudgeInputError(HSAEError, ValueError):
    """A judge cannot run on this run as asked (untrained model, nothing fires, bad setting)."""


# --------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class ContextSettings:
    """How feature contexts are gathered from the activation cache."""

    split: Literal["train", "heldout"] = "train"
    max_tokens: int = 100_000
    """Activation rows scanned (the first rows of the split)."""
    n_top: int = 10
    """Highest-activating contexts shown per feature."""
    n_sampled: int = 5
    """Contexts sampled in proportion to activation, shown per feature."""
    n_spare: int = 10
    """Extra top and sampled rows kept for autointerp's held-out scoring excerpts."""
    context_before: int = 12
    context_after: int = 4
    chunk_size: int = 4096

    def scan_settings(self, seed: int) -> ScanSettings:
        """What :func:`scan` must keep for the judges: top and sampled rows plus spares."""
        return ScanSettings(
            max_tokens=self.max_tokens,
            top_k=self.n_top + self.n_spare,
            n_samples=self.n_sampled + self.n_spare,
            chunk_size=self.chunk_size,
            seed=seed,
        )


class FeatureContexts:
    """One scan of a model over the cache: ranked rows of every feature, rendered as text."""

    def __init__(
        self,
        run: Any,
        which: Which,
        settings: ContextSettings | None = None,
        seed: int = 0,
        tokenizer: Any = None,
    ) -> None:
        if not run.trained(which):
            raise JudgeInputError(f"{run.folder} has no trained {which} model yet")
        self.which = which
        self.settings = settings or ContextSettings()
        self.model = run.load(which)
        cache = run.cache()
        if cache.n_tokens(self.settings.split) == 0:
            raise JudgeInputError(f"{run.folder}: the cache has no {self.settings.split} tokens")
        self.source = RowSource(cache, self.settings.split)
        self.info = cache.token_info(self.settings.split)
        self.stats, self.scanned, _ = scan(
            self.model, self.source, self.info.token_ids, self.settings.scan_settings(seed)
        )
        if tokenizer is None:
            from hsae.activations.models import load_tokenizer

            tokenizer = load_tokenizer(cache.manifest["model"]["name"])
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}

    @property
    def n_levels(self) -> int:
        return len(self.stats)

    def fires(self, level: int) -> np.ndarray:
        """Rows on which each feature of ``level`` fired, among those scanned."""
        return self.stats[level].fires.numpy()

    def top_rows(self, feature: Feature) -> np.ndarray:
        """Rows of the feature's highest activations, highest first (active rows only)."""
        level, index = feature
        values = self.stats[level].top_values[:, index]
        return self.stats[level].top_rows[:, index][values > 0].numpy()

    def sampled_rows(self, feature: Feature) -> np.ndarray:
        """Rows drawn in proportion to activation (without replacement), in draw order."""
        level, index = feature
        keys = self.stats[level].sample_keys[:, index]
        return self.stats[level].sample_rows[:, index][keys > -np.inf].numpy()

    def shown_rows(self, feature: Feature) -> np.ndarray:
        """The ``n_top`` highest rows, then up to ``n_sampled`` weighted draws not among them."""
        top = self.top_rows(feature)[: self.settings.n_top]
        taken = set(top.tolist())
        extra = [r for r in self.sampled_rows(feature).tolist() if r not in taken]
        return np.concatenate([top, np.asarray(extra[: self.settings.n_sampled], np.int64)])

    def spare_rows(self, feature: Feature, n_top: int, n_sampled: int) -> np.ndarray:
        """Activating rows not shown (``n_top`` next-highest, ``n_sampled`` further weighted
        draws), each from a context that no shown or already picked row comes from."""
        shown = self.shown_rows(feature)
        taken = set(shown.tolist())
        used = set(self.info.context_ids[shown].tolist())
        picked = self._fresh(self.top_rows(feature)[self.settings.n_top :].tolist(), used, n_top)
        drawn = [r for r in self.sampled_rows(feature).tolist() if r not in taken]
        picked += self._fresh(drawn, used, n_sampled)
        return np.asarray(picked, dtype=np.int64)

    def _fresh(self, rows: list[int], used: set[int], n: int) -> list[int]:
        """The first ``n`` rows whose context is not in ``used`` (which grows with each pick)."""
        picked: list[int] = []
        for row in rows:
            context = int(self.info.context_ids[row])
            if len(picked) < n and context not in used:
                picked.append(row)
                used.add(context)
        return picked

    def silent_rows(self, feature: Feature, n: int, rng: np.random.Generator) -> np.ndarray:
        """Up to ``n`` random rows whose whole excerpt has the feature at zero (fewer only for
        a feature active almost everywhere)."""
        found: list[int] = []
        for _ in range(4):
            size = min(self.scanned, 8 * max(n, 1))
            candidates = rng.choice(self.scanned, size=size, replace=False)
            _, same, activations = self._windows(feature, candidates)
            quiet = candidates[~np.any((activations > 0) & same, axis=1)]
            found += [int(r) for r in quiet if int(r) not in found]
            if len(found) >= n:
                break
        return np.asarray(found[:n], dtype=np.int64)

    def render(self, feature: Feature, rows: np.ndarray, mark: bool = True) -> list[str]:
        """One line of text per row, the feature's active tokens marked when ``mark``."""
        if len(rows) == 0:
            return []
        windows, same, activations = self._windows(feature, np.asarray(rows, np.int64))
        lines = []
        for window, keep, acts in zip(windows, same, activations, strict=True):
            tokens = self.info.token_ids[window[keep]].tolist()
            active = (acts[keep] > 0) if mark else np.zeros(len(tokens), dtype=bool)
            lines.append(self._text(tokens, active.tolist()))
        return lines

    def _windows(
        self, feature: Feature, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Excerpt rows around each row, the same-context mask, and the feature's activations."""
        windows, same = context_windows(
            rows, self.info.context_ids, self.settings.context_before, self.settings.context_after
        )
        flat = windows.reshape(-1)
        level, index = feature
        features = np.full(flat.size, index, dtype=np.int64)
        values = window_activations(
            self.model, self.source, level, flat, features, self.settings.chunk_size
        )
        return windows, same, values.reshape(windows.shape)

    def _text(self, tokens: list[int], active: list[bool]) -> str:
        parts: list[str] = []
        run: list[str] = []
        for token, on in zip(tokens, active, strict=True):
            piece = self._piece(token)
            if on:
                run.append(piece)
                continue
            if run:
                parts.append(_marked("".join(run)))
                run = []
            parts.append(piece)
        if run:
            parts.append(_marked("".join(run)))
        return "".join(parts).strip()

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            text = self.tokenizer.decode([token])
            self._pieces[token] = text.replace("\r", "").replace("\n", "\\n")
        return self._pieces[token]


def _marked(text: str) -> str:
    """``<<text>>`` with leading whitespace kept outside the marker."""
    stripped = text.lstrip()
    return f"{text[: len(text) - len(stripped)]}{MARK_OPEN}{stripped or text}{MARK_CLOSE}"


# --------------------------------------------------------------------------- prompts

_SYSTEM = (
    "You help analyse the features of a sparse autoencoder trained on the internal "
    "activations of a language model. A feature is shown through short text excerpts in "
    f"which it is active; the tokens it is active on are marked {MARK_OPEN}like this"
    f"{MARK_CLOSE}."
)


def _numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"{n}. {line}" for n, line in enumerate(lines, start=1))


def hierarchy_prompt(first: Sequence[str], second: Sequence[str]) -> list[Message]:
    """Ask whether one of two features (given by excerpts) is a more specific version of the
    other; the answer format is ``HaveRelationship: Yes/No`` then ``Confidence: ...``."""
    user = (
        "Here are excerpts for two features.\n\n"
        f"Feature 1:\n{_numbered(first)}\n\n"
        f"Feature 2:\n{_numbered(second)}\n\n"
        "Is one of these features a more specific version of the other? That is, does the "
        "narrower one respond to a subset, special case or sub-category of what the broader one "
        "responds to (as 'poodle' is a narrower version of 'dog')?\n\n"
        "Reply with exactly these two lines and nothing else:\n"
        "HaveRelationship: Yes or No\n"
        "Confidence: High, Medium or Low"
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def explanation_prompt(lines: Sequence[str]) -> list[Message]:
    """Ask for a short description of one feature from its marked excerpts."""
    user = (
        f"Excerpts where one feature is active:\n\n{_numbered(lines)}\n\n"
        "In a few words, what does this feature detect? Name the kind of token or concept it "
        "is active on, and the surrounding context only if it matters. Reply with one line:\n"
        "Explanation: <short description>"
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def detection_prompt(explanation: str, lines: Sequence[str]) -> list[Message]:
    """Ask which of the unmarked excerpts contain a token the explained feature is active on."""
    user = (
        f'A feature has been described as: "{explanation}".\n\n'
        f"Below are {len(lines)} numbered excerpts, with no tokens marked. In some of them the "
        "feature is active on at least one token; in the others it is not active at all.\n\n"
        f"{_numbered(lines)}\n\n"
        "Which excerpts contain a token where the feature is active? Reply with one line: "
        "'Answer:' followed by the excerpt numbers separated by commas, or 'Answer: None'."
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------- parsers


@dataclass(frozen=True)
class Verdict:
    """A parsed hierarchy answer; ``relationship`` None means the reply was unparsable."""

    relationship: bool | None
    confidence: Literal["high", "medium", "low"] | None


_FIELD_GAP = r"[\s*_'\"`:=\-]*"
_RELATIONSHIP = re.compile(rf"have[\s_\-]*relationship{_FIELD_GAP}(yes|no)\b", re.IGNORECASE)
_CONFIDENCE = re.compile(rf"confidence{_FIELD_GAP}(high|medium|low)\b", re.IGNORECASE)


def parse_verdict(reply: str | None) -> Verdict:
    """``HaveRelationship`` / ``Confidence`` from a reply, tolerant of case, markdown and extra
    text; contradictory or missing answers give ``Verdict(None, ...)`` (never an exception)."""
    if not isinstance(reply, str):
        return Verdict(None, None)
    answers = {match.lower() for match in _RELATIONSHIP.findall(reply)}
    levels = {match.lower() for match in _CONFIDENCE.findall(reply)}
    relationship = (answers == {"yes"}) if len(answers) == 1 else None
    confidence = levels.pop() if len(levels) == 1 else None
    return Verdict(relationship, confidence)  # type: ignore[arg-type]


_EXPLANATION = re.compile(r"explanation\s*[:\-]\s*(.+)", re.IGNORECASE)
MAX_EXPLANATION_CHARS = 200


def parse_explanation(reply: str | None) -> str | None:
    """The text after the last ``Explanation:``, or a one-line reply as it is; None if empty."""
    if not isinstance(reply, str):
        return None
    matches = _EXPLANATION.findall(reply)
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    if matches:
        text = matches[-1]
    elif len(lines) == 1:
        text = lines[0]
    else:
        return None
    text = text.strip().strip("*_`\"' ").strip()
    text = text.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
    return text[:MAX_EXPLANATION_CHARS] or None


_ANSWER = re.compile(r"answer\s*[:\-]\s*(.*)", re.IGNORECASE)
_BARE_ANSWER = re.compile(r"^(?:[\s\d,;.]|\band\b)*$|^\s*none\W*$", re.IGNORECASE)


def parse_detection(reply: str | None, n_items: int) -> set[int] | None:
    """Excerpt numbers (1-based) the judge says are active; set() for "None"; None if the reply
    is unparsable or names a number outside 1..n_items."""
    if not isinstance(reply, str):
        return None
    matches = _ANSWER.findall(reply)
    if matches:
        text = matches[-1]
    elif _BARE_ANSWER.match(reply.strip()):
        text = reply
    else:
        return None
    numbers = {int(n) for n in re.findall(r"\d+", text)}
    if not numbers:
        return set() if re.search(r"\bnone\b", text, re.IGNORECASE) else None
    if not all(1 <= n <= n_items for n in numbers):
        return None
    return numbers


def detection_scores(chosen: set[int], truth: Sequence[bool]) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of the chosen 1-based items against ``truth``."""
    predicted = np.array([n + 1 in chosen for n in range(len(truth))], dtype=bool)
    actual = np.asarray(truth, dtype=bool)
    accuracy = float(np.mean(predicted == actual)) if actual.size else float("nan")
    recalls = [
        float(np.mean(predicted[actual == c] == c)) for c in (True, False) if (actual == c).any()
    ]
    return accuracy, float(np.mean(recalls)) if recalls else float("nan")


# --------------------------------------------------------------------------- hierarchy judge


def eligible_pairs(contexts: FeatureContexts) -> list[tuple[Feature, Feature]]:
    """(parent, child) of every assigned link whose two features fired in the scanned rows."""
    pairs = []
    for level, links in enumerate(contexts.model.forest(), start=1):
        parents = links.cpu().numpy()
        children = np.flatnonzero(parents >= 0)
        both_fire = (contexts.fires(level)[children] > 0) & (
            contexts.fires(level - 1)[parents[children]] > 0
        )
        pairs += [((level - 1, int(parents[c])), (level, int(c))) for c in children[both_fire]]
    return pairs


def hierarchy_judge(
    run: Any,
    which: Which,
    client: JudgeClient,
    n_pairs: int = 50,
    seed: int = 0,
    contexts: FeatureContexts | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Hierarchy AutoInterp on ``n_pairs`` parent-child pairs of one model, sampled with
    ``seed`` among assigned pairs whose features both fire; the Yes rate and its breakdown."""
    if n_pairs < 1:
        raise JudgeInputError(f"n_pairs must be >= 1, got {n_pairs}")
    contexts = contexts or FeatureContexts(run, which, seed=seed)
    before = client.usage.snapshot()
    pool = eligible_pairs(contexts)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pool), size=min(n_pairs, len(pool)), replace=False) if pool else []
    pairs = [pool[int(i)] for i in sorted(picked)]
    child_first = rng.random(len(pairs)) < 0.5  # shown order drawn per pair: no position bias
    prompts = []
    for (parent, child), swap in zip(pairs, child_first, strict=True):
        shown = [contexts.render(f, contexts.shown_rows(f)) for f in (parent, child)]
        prompts.append(hierarchy_prompt(*(shown[::-1] if swap else shown)))
    batch = client.complete_many(prompts, desc=f"hierarchy judge ({which})", progress=progress)
    records = [
        _pair_record(parent, child, bool(swap), batch, n)
        for n, ((parent, child), swap) in enumerate(zip(pairs, child_first, strict=True))
    ]
    summary = summarise_verdicts(records)
    return {
        "which": which,
        "judge": client.settings.describe(),
        "seed": seed,
        "n_pairs_requested": n_pairs,
        "n_pairs_eligible": len(pool),
        "n_pairs": len(pairs),
        **summary,
        "stopped": batch.stopped,
        "usage": client.usage.since(before),
        "pairs": records,
    }


def _pair_record(
    parent: Feature, child: Feature, swap: bool, batch: Batch, n: int
) -> dict[str, Any]:
    completion = batch.completions[n]
    verdict = parse_verdict(completion.text if completion else None)
    record: dict[str, Any] = {
        "parent": feature_key(*parent),
        "child": feature_key(*child),
        "shown_first": "child" if swap else "parent",
        "status": _status(completion is not None, verdict.relationship is not None, batch, n),
        "relationship": verdict.relationship,
        "confidence": verdict.confidence,
    }
    if completion is not None and verdict.relationship is None:
        record["reply"] = completion.text[:300]
    return record


def _status(answered: bool, parsed: bool, batch: Batch, n: int) -> str:
    if not answered:
        return "not sent" if batch.errors[n] is None else "failed"
    return "parsed" if parsed else "unparsable"


def summarise_verdicts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and Yes rates (overall and per confidence) of judged pair records."""
    parsed = [r for r in records if r["status"] == "parsed"]
    yes = sum(1 for r in parsed if r["relationship"])
    by_confidence = {}
    for level in ("high", "medium", "low", None):
        group = [r for r in parsed if r["confidence"] == level]
        hits = sum(1 for r in group if r["relationship"])
        by_confidence[level or "missing"] = {
            "n": len(group),
            "yes": hits,
            "yes_rate": _rate(hits, len(group)),
        }
    return {
        "n_answered": sum(1 for r in records if r["status"] in ("parsed", "unparsable")),
        "n_parsed": len(parsed),
        "n_unparsable": sum(1 for r in records if r["status"] == "unparsable"),
        "n_failed": sum(1 for r in records if r["status"] == "failed"),
        "n_not_sent": sum(1 for r in records if r["status"] == "not sent"),
        "yes": yes,
        "no": len(parsed) - yes,
        "yes_rate": _rate(yes, len(parsed)),
        "by_confidence": by_confidence,
    }


def _rate(numerator: float, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


# --------------------------------------------------------------------------- autointerp


@dataclass(frozen=True)
class DetectionSettings:
    """The excerpts one explanation is scored on (all held out from the explanation)."""

    n_top: int = 2
    """Activating excerpts from the next-highest activations."""
    n_sampled: int = 3
    """Activating excerpts drawn in proportion to activation."""
    n_silent: int = 5
    """Excerpts where the feature is zero on every token shown."""


@dataclass(frozen=True)
class ScoringItem:
    """One feature to explain and the shuffled, unmarked excerpts its explanation is scored on."""

    feature: Feature
    lines: list[str]
    truth: list[bool]
    """Whether the feature is active in each excerpt."""


def autointerp(
    run: Any,
    which: Which,
    client: JudgeClient,
    n_features: int = 30,
    seed: int = 0,
    contexts: FeatureContexts | None = None,
    detection: DetectionSettings | None = None,
    write_labels: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Explain ``n_features`` sampled features (spread evenly over the levels, seeded), score
    each explanation by detection, and (``write_labels``) store the explanations as automatic
    labels in RUN/labels.json. Returns per-feature scores and means per level and overall."""
    if n_features < 1:
        raise JudgeInputError(f"n_features must be >= 1, got {n_features}")
    contexts = contexts or FeatureContexts(run, which, seed=seed)
    detection = detection or DetectionSettings()
    before = client.usage.snapshot()
    chosen = sample_features(contexts, n_features, seed, detection)
    items = [scoring_item(contexts, feature, detection, seed) for feature in chosen]
    explain = [
        explanation_prompt(contexts.render(i.feature, contexts.shown_rows(i.feature)))
        for i in items
    ]
    explained = client.complete_many(explain, f"autointerp explain ({which})", progress)
    explanations = [parse_explanation(c.text if c else None) for c in explained.completions]
    to_score = [n for n, text in enumerate(explanations) if text is not None]
    scores = client.complete_many(
        [detection_prompt(str(explanations[n]), items[n].lines) for n in to_score],
        f"autointerp score ({which})",
        progress,
    )
    answers: list[str | None] = [None] * len(items)
    for slot, n in enumerate(to_score):
        completion = scores.completions[slot]
        answers[n] = completion.text if completion is not None else None
    features = [
        _feature_record(item, explanations[n], explained.completions[n] is not None, answers[n])
        for n, item in enumerate(items)
    ]
    result = {
        "which": which,
        "judge": client.settings.describe(),
        "seed": seed,
        "n_features_requested": n_features,
        "n_features": len(items),
        **summarise_detection(features, contexts.n_levels),
        "stopped": explained.stopped or scores.stopped,
        "usage": client.usage.since(before),
        "labels_file": None,
        "features": features,
    }
    if write_labels:
        result["labels_file"] = str(write_auto_labels(run, which, features, client))
    return result


def sample_features(
    contexts: FeatureContexts, n_features: int, seed: int, detection: DetectionSettings
) -> list[Feature]:
    """Up to ``n_features`` features with held-out activating rows, spread evenly over levels
    (a level short of eligible features leaves its share unused), sorted."""
    rng = np.random.default_rng(seed)
    quota = [n_features // contexts.n_levels] * contexts.n_levels
    for level in range(n_features % contexts.n_levels):
        quota[level] += 1
    chosen: list[Feature] = []
    for level, want in enumerate(quota):
        firing = np.flatnonzero(contexts.fires(level) > 0)
        order = rng.permutation(firing).tolist()
        picked = 0
        for index in order:
            if picked == want:
                break
            if len(contexts.spare_rows((level, index), detection.n_top, detection.n_sampled)):
                chosen.append((level, index))
                picked += 1
    return sorted(chosen)


def scoring_item(
    contexts: FeatureContexts, feature: Feature, detection: DetectionSettings, seed: int
) -> ScoringItem:
    """Held-out activating and silent excerpts of ``feature``, shuffled (seeded per feature)."""
    rng = np.random.default_rng([seed, *feature])
    active = contexts.spare_rows(feature, detection.n_top, detection.n_sampled)
    silent = contexts.silent_rows(feature, detection.n_silent, rng)
    rows = np.concatenate([active, silent])
    truth = [True] * len(active) + [False] * len(silent)
    order = rng.permutation(len(rows))
    lines = contexts.render(feature, rows[order], mark=False)
    return ScoringItem(feature, lines, [truth[int(n)] for n in order])


def _feature_record(
    item: ScoringItem, explanation: str | None, answered: bool, reply: str | None
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "feature": feature_key(*item.feature),
        "level": item.feature[0],
        "explanation": explanation,
        "n_active": sum(item.truth),
        "n_silent": len(item.truth) - sum(item.truth),
        "status": "scored",
        "accuracy": None,
        "balanced_accuracy": None,
    }
    chosen = parse_detection(reply, len(item.truth))
    if not answered:
        record["status"] = "not explained"
    elif explanation is None:
        record["status"] = "explanation unparsable"
    elif reply is None:
        record["status"] = "not scored"
    elif chosen is None:
        record["status"] = "score unparsable"
        record["reply"] = reply[:300]
    else:
        accuracy, balanced = detection_scores(chosen, item.truth)
        record["accuracy"], record["balanced_accuracy"] = round(accuracy, 4), round(balanced, 4)
    return record


def summarise_detection(features: Sequence[dict[str, Any]], n_levels: int) -> dict[str, Any]:
    """Counts, mean accuracy and balanced accuracy overall and per level."""
    scored = [f for f in features if f["status"] == "scored"]
    statuses = [f["status"] for f in features]
    return {
        "n_explained": sum(1 for f in features if f["explanation"] is not None),
        "n_scored": len(scored),
        "n_unparsable": sum(1 for s in statuses if s.endswith("unparsable")),
        "n_not_answered": sum(1 for s in statuses if s.startswith("not ")),
        **_means(scored),
        "by_level": [
            {"level": level, **_means([f for f in scored if f["level"] == level])}
            for level in range(n_levels)
        ],
    }


def _means(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def mean(name: str) -> float | None:
        return round(float(np.mean([f[name] for f in scored])), 4) if scored else None

    return {
        "n": len(scored),
        "accuracy": mean("accuracy"),
        "balanced_accuracy": mean("balanced_accuracy"),
    }


def write_auto_labels(
    run: Any, which: Which, features: Sequence[dict[str, Any]], client: JudgeClient
) -> Path:
    """Merge the explanations into RUN/labels.json under ``auto.<which>`` (human labels kept;
    score: balanced accuracy) and record the judge's endpoint and model; return the path."""
    labels = load_labels(run.folder)
    section = dict(labels.get("auto", {}).get(which, {}))
    model = client.settings.model
    for feature in features:
        if feature["explanation"] is not None:
            section[feature["feature"]] = {
                "label": feature["explanation"],
                "score": feature["balanced_accuracy"],
                "judge": model,
            }
    labels["auto"] = dict(labels.get("auto", {})) | {which: section}
    labels["judge"] = client.settings.describe()
    return save_labels(run.folder, labels)


# --------------------------------------------------------------------------- both models


def judge_run(
    run: Any,
    client: JudgeClient,
    n_pairs: int = 50,
    n_features: int = 30,
    seed: int = 0,
    models: Sequence[Which] | None = None,
    write_labels: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Both judges on every trained model of the run (HSAE first, then the baseline), one scan
    per model: ``{"judge": ..., "hsae": {"hierarchy": ..., "autointerp": ...}, ...}``."""
    wanted = [w for w in (models or run.wanted_models()) if run.trained(w)]
    contexts = {which: FeatureContexts(run, which, seed=seed) for which in wanted}
    result: dict[str, Any] = {"judge": client.settings.describe()}
    for which in wanted:  # the paper's metric first, for every model, then autointerp
        result[which] = {
            "hierarchy": hierarchy_judge(
                run, which, client, n_pairs, seed, contexts[which], progress=progress
            )
        }
    for which in wanted:
        result[which]["autointerp"] = autointerp(
            run,
            which,
            client,
            n_features,
            seed,
            contexts[which],
            write_labels=write_labels,
            progress=progress,
        )
    return result
