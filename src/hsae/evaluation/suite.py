"""What an evaluation of a run's models runs, and how its results are laid out as JSON.

The *standard* suite (:func:`evaluate_models`) has, for each model name (``"hsae"``,
``"baseline"``), ``"levels"`` (per level: ``l0``, ``variance_explained``, ``dead_fraction``,
``dense_fraction``, ``mse``, and when the language model is available ``ce_loss_recovered``
and ``kl``) and ``"hierarchy"`` (``hamming_per_1k``, ``hamming_normalised``,
``p_parent_given_child``, ``p_child_given_parent``, and per level pair).

The *full* suite (:func:`run_full_suite`) adds, each under its own top-level key, every part
that this environment can run: ``absorption``, ``sparse_probing`` (WordNet categories),
``sparse_probing_hf`` (a labelled Hugging Face dataset), ``taxonomy``, ``judges`` and
``saebench``; ``suite`` says which parts ran, which were skipped and why, and which failed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hsae.errors import HSAEError
from hsae.evaluation.quality import evaluate
from hsae.evaluation.splice import SpliceResult, spliced_losses
from hsae.layout import MODEL_NAMES, RunLayout, RunView
from hsae.model import HSAE


def evaluate_models(
    models: dict[str, HSAE],
    heldout: Tensor,
    splice: tuple[Any, torch.nn.Module, Iterable[tuple[Tensor, Tensor, Tensor]]] | None = None,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Evaluate every model on the same held-out activations (and spliced contexts)."""
    results: dict[str, Any] = {"tokens": int(heldout.shape[0])}
    for name, model in models.items():
        results[name] = evaluate(model, heldout, batch_size=batch_size).to_dict()
    if splice is not None:
        language_model, block, batches = splice
        names = list(models)
        spliced = spliced_losses(language_model, block, [models[n] for n in names], batches)
        for name, outcome in zip(names, spliced, strict=True):
            _merge_splice(results[name], outcome)
        results["lm"] = {
            "ce_clean": spliced[0].ce_clean,
            "ce_zero": spliced[0].ce_zero,
            "tokens": spliced[0].tokens,
        }
    return results


def _merge_splice(model_results: dict[str, Any], outcome: SpliceResult) -> None:
    for level, entry in enumerate(model_results["levels"]):
        entry["ce_loss_recovered"] = outcome.ce_loss_recovered[level]
        entry["ce_spliced"] = outcome.ce_spliced[level]
        entry["kl"] = outcome.kl_spliced[level]


def comparison_table(results: dict[str, Any], names: list[str]) -> str:
    """A Markdown table of the metrics of ``names`` side by side."""
    header = "| metric | " + " | ".join(names) + " |"
    lines = [header, "|" + " --- |" * (len(names) + 1)]
    hierarchy_rows = [
        ("Hamming per 1k tokens (lower is better)", "hamming_per_1k"),
        ("Hamming / union (lower is better)", "hamming_normalised"),
        ("P(parent given child)", "p_parent_given_child"),
        ("P(child given parent)", "p_child_given_parent"),
        ("parents left out of Hamming (family never fires)", "n_silent_parents"),
    ]
    for label, key in hierarchy_rows:
        if any(key not in results[n]["hierarchy"] for n in names):
            continue  # metrics.json written before the row existed
        values = [_fmt(results[n]["hierarchy"][key]) for n in names]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    n_levels = len(results[names[0]]["levels"])
    level_rows = [
        ("L0", "l0"),
        ("variance explained", "variance_explained"),
        ("dead fraction", "dead_fraction"),
        ("CE loss recovered", "ce_loss_recovered"),
    ]
    for level in range(n_levels):
        for label, key in level_rows:
            if key not in results[names[0]]["levels"][level]:
                continue
            values = [_fmt(results[n]["levels"][level][key]) for n in names]
            lines.append(f"| level {level} {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


# --------------------------------------------------------------------------- the full suite

SUITES = ("standard", "full")
DEFAULT_HF_PROBING = "fancyzhx/ag_news"


@dataclass(frozen=True)
class SuiteSettings:
    """What ``hsae eval --suite full`` runs beyond the standard metrics, and how much of it."""

    parts: tuple[str, ...] | None = None
    """Parts to attempt, in registry order (None: all of :data:`PARTS`); each is still skipped
    when this environment cannot run it."""
    judge_pairs: int = 50
    """Parent-child pairs per model shown to the hierarchy judge."""
    judge_features: int = 30
    """Features per model explained and scored by the autointerp judge."""
    judge_max_requests: int | None = None
    """Cap on judge HTTP requests (cache hits are free); None keeps HSAE_JUDGE_MAX_REQUESTS."""
    hf_probing_dataset: str = DEFAULT_HF_PROBING
    """Labelled Hugging Face dataset "NAME[:CONFIG][@SPLIT]" for the online probing part, or a
    local folder of JSONL/CSV/Parquet files with the same columns (works offline)."""
    hf_text_field: str = "text"
    """Its text column (SAEBench's bias_in_bios: "hard_text")."""
    hf_label_field: str = "label"
    """Its label column (bias_in_bios: "profession")."""
    absorption_words: int = 3000
    """Single-token words the first-letter absorption metric samples."""
    contexts_per_category: int = 200
    """WordNet noun contexts per lexicographer category (sparse probing, taxonomy)."""
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parts or ()) - set(FULL_PARTS))
        if unknown:
            raise ValueError(f"unknown suite part(s) {unknown}; choose from {list(FULL_PARTS)}")
        for name in ("judge_pairs", "judge_features", "absorption_words", "contexts_per_category"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.judge_max_requests is not None and self.judge_max_requests < 0:
            raise ValueError(f"judge_max_requests must be >= 0, got {self.judge_max_requests}")


class SkipPartError(Exception):
    """This environment cannot run a suite part; the message says why, in one line."""


@dataclass
class SuiteInputs:
    """What the parts share: the run, its models, and a language model loaded at most once."""

    run: RunView
    models: dict[str, HSAE]
    layer: int
    load_lm: Callable[[], Any] | None
    """None when the language model must not be used (``--no-lm``)."""
    settings: SuiteSettings
    progress: bool = True
    _lexicon: Any = None

    def require_lm(self) -> None:
        if self.load_lm is None:
            raise SkipPartError("needs the language model, and --no-lm was given")

    def lm(self) -> Any:
        self.require_lm()
        return self.load_lm()

    def lexicon(self) -> Any:
        from hsae.evaluation.lexicon import LexiconData, LexiconSettings, prepare_lexicon

        if self._lexicon is None:
            per_class = self.settings.contexts_per_category
            settings = LexiconSettings(
                per_class=per_class, min_per_class=min(50, per_class), seed=self.settings.seed
            )
            self._lexicon = self.prepared(
                "lexicon",
                settings,
                lambda: prepare_lexicon(
                    self.lm(), self.layer, settings=settings, progress=self.progress
                ),
                LexiconData.load,
            )
        return self._lexicon

    def prepared(
        self, kind: str, settings: Any, prepare: Callable[[], Any], load: Callable[[Path], Any]
    ) -> Any:
        """The language-model side of a part (``prepare()``), saved under
        RUN/eval_cache/KIND-KEY so that a rerun with the same model, layer and settings loads it
        instead of running the language model again (even with ``--no-lm``)."""
        folder = RunLayout(self.run.folder).eval_cache / f"{kind}-{self._key(kind, settings)}"
        try:
            return load(folder)
        except Exception:  # absent, or left unreadable by a crash: prepare it again
            pass
        self.require_lm()
        data = prepare()
        data.save(folder)
        return data

    def _key(self, kind: str, settings: Any) -> str:
        identity = {
            "kind": kind,
            "model": self.run.config.model,
            "layer": self.layer,
            "settings": asdict(settings),
        }
        text = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _absorption(inputs: SuiteInputs) -> dict[str, Any]:
    from hsae.evaluation.absorption import (
        AbsorptionData,
        AbsorptionSettings,
        absorption_metrics,
        prepare_absorption,
    )

    words = inputs.settings.absorption_words
    settings = AbsorptionSettings(
        n_words=words, min_words_per_letter=min(20, max(2, words // 50)), seed=inputs.settings.seed
    )
    data = inputs.prepared(
        "absorption",
        settings,
        lambda: prepare_absorption(
            inputs.lm(), inputs.layer, settings=settings, progress=inputs.progress
        ),
        AbsorptionData.load,
    )
    return {name: absorption_metrics(model, data) for name, model in inputs.models.items()}


def _sparse_probing(inputs: SuiteInputs) -> dict[str, Any]:
    from hsae.evaluation.probing import sparse_probing

    return sparse_probing(inputs.models, inputs.lexicon(), progress=inputs.progress)


def _taxonomy(inputs: SuiteInputs) -> dict[str, Any]:
    from hsae.evaluation.taxonomy import taxonomy_alignment

    return taxonomy_alignment(inputs.models, inputs.lexicon(), progress=inputs.progress)


def _sparse_probing_hf(inputs: SuiteInputs) -> dict[str, Any]:
    import importlib.util
    import os

    from hsae.activations.corpora import parse_hf_spec
    from hsae.evaluation.lexicon import hf_contexts, prepare_contexts
    from hsae.evaluation.probing import sparse_probing

    inputs.require_lm()
    if importlib.util.find_spec("datasets") is None:
        raise SkipPartError("needs the optional `datasets` package (pip install 'hsae[datasets]')")
    spec = inputs.settings.hf_probing_dataset
    local = Path(parse_hf_spec(spec)[0]).exists()  # a folder of JSONL/CSV/Parquet files
    offline = "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    if offline and not local:
        raise SkipPartError("the Hugging Face Hub is switched off (HF_HUB_OFFLINE)")
    try:
        contexts = hf_contexts(
            spec,
            text_field=inputs.settings.hf_text_field,
            label_field=inputs.settings.hf_label_field,
            seed=inputs.settings.seed,
        )
    except Exception as error:  # datasets raises its own error types when the Hub is away
        if not _hub_unreachable(error):
            raise
        raise SkipPartError(f"could not read {spec} from the Hub: {_first_line(error)}") from None
    data = prepare_contexts(inputs.lm(), inputs.layer, contexts, progress=inputs.progress)
    return {"dataset": spec} | sparse_probing(inputs.models, data, progress=inputs.progress)


def _hub_unreachable(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, ConnectionError) or any(
        word in text for word in ("connect", "offline", "resolve", "timed out", "network")
    )


def _judges(inputs: SuiteInputs) -> dict[str, Any]:
    from hsae.evaluation.judges import judge_run
    from hsae.evaluation.llm import JudgeClient, JudgeSettings, judge_available

    available, reason = judge_available()
    if not available:
        raise SkipPartError(reason)
    overrides: dict[str, Any] = {}
    if inputs.settings.judge_max_requests is not None:
        overrides["max_requests"] = inputs.settings.judge_max_requests
    client = JudgeClient(JudgeSettings.from_env(**overrides))
    try:
        return judge_run(
            inputs.run,
            client,
            n_pairs=inputs.settings.judge_pairs,
            n_features=inputs.settings.judge_features,
            seed=inputs.settings.seed,
            models=[name for name in inputs.models if name in MODEL_NAMES],
            progress=inputs.progress,
        )
    finally:
        client.close()


def _saebench(inputs: SuiteInputs) -> dict[str, Any]:
    import importlib.util

    from hsae.interop.saebench import run_saebench

    if importlib.util.find_spec("sae_bench") is None:
        raise SkipPartError("needs the sae-bench package (see docs/interop.md); or: hsae saebench")
    if not torch.cuda.is_available():
        raise SkipPartError("SAEBench's evaluations need a CUDA GPU; run `hsae saebench` on one")
    folder = inputs.run.folder
    return run_saebench(folder, folder / "saebench", evals=_saebench_evals())


def _saebench_evals() -> list[str]:
    import os

    from hsae.interop.saebench import TABLE1_EVALS

    has_key = bool(os.environ.get("OPENAI_API_KEY"))
    return [name for name in TABLE1_EVALS if name != "autointerp" or has_key]


def run_full_suite(
    inputs: SuiteInputs,
    results: dict[str, Any],
    on_part_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every wanted part that this environment allows, adding each part's result to
    ``results`` under its name and the outcome of every part under ``results["suite"]``.

    A part that cannot run here is skipped with its reason; one that fails is recorded as
    failed with the error's first line, and the others still run. ``on_part_done`` sees
    ``results`` after each part (the run uses it to save metrics.json as it goes).
    """
    status: dict[str, Any] = {"suite": "full", "ran": [], "skipped": {}, "failed": {}}
    status["seconds"] = {}
    results["suite"] = status
    wanted = inputs.settings.parts
    for part in [name for name in PARTS if wanted is None or name in wanted]:
        started = time.perf_counter()
        try:
            results[part] = PARTS[part].run(inputs)
            status["ran"].append(part)
        except SkipPartError as reason:
            status["skipped"][part] = str(reason)
        except _part_errors() as error:
            status["failed"][part] = f"{type(error).__name__}: {_first_line(error)}"
        status["seconds"][part] = round(time.perf_counter() - started, 2)
        if on_part_done is not None:
            on_part_done(results)
    return results


def _part_errors() -> tuple[type[Exception], ...]:
    """A part failing with one of these is recorded as failed; the other parts still run."""
    return (HSAEError, OSError, RuntimeError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------- full-suite table


def full_suite_table(results: dict[str, Any], names: list[str]) -> str:
    """A Markdown table of the full suite's headline numbers, then what was skipped or failed."""
    header = "| metric | " + " | ".join(names) + " |"
    lines = [header, "|" + " --- |" * (len(names) + 1)]
    for label, values in _suite_rows(results, names):
        lines.append(f"| {label} | " + " | ".join(_cell(v) for v in values) + " |")
    status = results.get("suite", {})
    for part, reason in status.get("skipped", {}).items():
        lines.append(f"\nskipped {part}: {reason}")
    for part, reason in status.get("failed", {}).items():
        lines.append(f"\nFAILED {part}: {reason}")
    return "\n".join(lines)


Row = tuple[str, list[Any]]


def _suite_rows(results: dict[str, Any], names: list[str]) -> list[Row]:
    rows: list[Row] = []
    for part in PARTS.values():
        if results.get(part.name):
            rows += part.rows(results[part.name], names)
    return rows


def _absorption_rows(part: dict[str, Any], names: list[str]) -> list[Row]:
    rows = []
    for level in range(len(part[names[0]]["levels"])):
        score = [part[n]["levels"][level]["score"] for n in names]
        full = [part[n]["levels"][level]["full_absorption_rate"] for n in names]
        rows.append((f"level {level} absorption, 1 - mean fraction (higher is better)", score))
        rows.append((f"level {level} full-absorption rate (lower is better)", full))
    return rows


def _probing_rows(part: dict[str, Any], names: list[str], title: str) -> list[Row]:
    raw = part["raw"]
    rows: list[Row] = [
        (
            f"{title}: raw activations, top-5 dims / all dims",
            [_pair(raw, "top_5", "all")] * len(names),
        )
    ]
    for level in range(len(part[names[0]]["levels"])):
        entries = [part[n]["levels"][level] for n in names]
        rows.append(
            (
                f"{title}: level {level} top-1 / top-5 accuracy",
                [_pair(e, "top_1", "top_5") for e in entries],
            )
        )
    return rows


def _pair(entry: dict[str, Any], first: str, second: str) -> str:
    a, b = entry.get(f"{first}_accuracy"), entry.get(f"{second}_accuracy")
    return f"{_cell(a)} / {_cell(b)}"


def _taxonomy_rows(part: dict[str, Any], names: list[str]) -> list[Row]:
    rows: list[Row] = []
    for index, pair in enumerate(part[names[0]]["pairs"]):
        level = pair["parent_level"]
        cells = [_precision_cell(part[n]["pairs"][index]) for n in names]
        rows.append(
            (f"taxonomy: links {level}->{level + 1}, hypernym precision [95% CI] (random)", cells)
        )
    cells = [_precision_cell(part[n]["all_pairs"]) for n in names]
    rows.append(("taxonomy: all links, hypernym precision [95% CI] (random)", cells))
    if all("strict" in part[n]["all_pairs"] for n in names):
        cells = [_precision_cell(part[n]["all_pairs"], "strict") for n in names]
        rows.append(("taxonomy: all links, strict ancestor (not same synset) [95% CI]", cells))
    return rows


def _precision_cell(entry: dict[str, Any], kind: str = "hypernym") -> str:
    ours, chance = entry[kind], entry[f"random_{kind}"]
    if ours["precision"] is None:
        return f"n/a ({entry['evaluated']} links)"
    return (
        f"{ours['precision']:.3f} [{ours['low']:.3f}, {ours['high']:.3f}] "
        f"({_cell(chance['precision'])}; n={entry['evaluated']})"
    )


def _judge_rows(part: dict[str, Any], names: list[str]) -> list[Row]:
    judged = [n for n in names if n in part]
    if not judged:
        return []
    hierarchy = [part[n]["hierarchy"] if n in part else None for n in names]
    autointerp = [part[n].get("autointerp") if n in part else None for n in names]
    return [
        (
            "hierarchy judge: Yes rate (pairs parsed)",
            [_judge_cell(h, "yes_rate", "n_parsed") for h in hierarchy],
        ),
        (
            "autointerp: balanced accuracy (features scored)",
            [_judge_cell(a, "balanced_accuracy", "n_scored") for a in autointerp],
        ),
    ]


def _judge_cell(entry: dict[str, Any] | None, key: str, count: str) -> str:
    if entry is None:
        return "n/a"
    return f"{_cell(entry.get(key))} ({entry.get(count, 0)})"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return _fmt(value)
    return str(value)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SuiteChart:
    """A per-level bar chart of one part, drawn on the explorer page and in plots/suite.png."""

    key: str
    title: str
    note: str
    values: Callable[[dict[str, Any]], list[Any]]
    """The bars of one model, from that model's entry in the part's result."""
    per_pair: bool = False
    """One bar per pair of adjacent levels (links) instead of one per level."""


@dataclass(frozen=True)
class SuitePart:
    """One part of the full suite: how it runs, its table rows and its charts.

    Adding a metric to the suite is one module computing it plus one entry in :data:`PARTS`.
    """

    name: str
    run: Callable[[SuiteInputs], dict[str, Any]]
    """Computes the part's result (JSON-able; per model under the model's name), or raises
    :class:`SkipPartError` when this environment cannot run it."""
    rows: Callable[[dict[str, Any], list[str]], list[Row]] = lambda part, names: []
    """Rows of the full-suite table: (label, one cell per model)."""
    charts: tuple[SuiteChart, ...] = ()


PARTS: dict[str, SuitePart] = {
    part.name: part
    for part in (
        SuitePart(
            "absorption",
            _absorption,
            _absorption_rows,
            (
                SuiteChart(
                    "absorption",
                    "Absorption: 1 - mean fraction",
                    "higher is better",
                    lambda entry: [level.get("score") for level in entry["levels"]],
                ),
            ),
        ),
        SuitePart(
            "sparse_probing",
            _sparse_probing,
            lambda part, names: _probing_rows(part, names, "sparse probing (WordNet)"),
            (
                SuiteChart(
                    "probing_top5",
                    "Sparse probing top-5 accuracy",
                    "WordNet categories",
                    lambda entry: [level.get("top_5_accuracy") for level in entry["levels"]],
                ),
            ),
        ),
        SuitePart(
            "taxonomy",
            _taxonomy,
            _taxonomy_rows,
            (
                SuiteChart(
                    "taxonomy",
                    "Links agreeing with WordNet",
                    "hypernym precision",
                    lambda entry: [pair["hypernym"]["precision"] for pair in entry["pairs"]],
                    per_pair=True,
                ),
            ),
        ),
        SuitePart(
            "sparse_probing_hf",
            _sparse_probing_hf,
            lambda part, names: _probing_rows(part, names, f"sparse probing ({part['dataset']})"),
        ),
        SuitePart("judges", _judges, _judge_rows),
        SuitePart("saebench", _saebench),
    )
}
"""Every part of ``--suite full``, in the order they run."""
FULL_PARTS = tuple(PARTS)


def suite_charts(metrics: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The charts of every part present in ``metrics`` for model ``name``: key, title, note,
    whether bars are per level pair, and the values (what the explorer and the plots draw)."""
    charts = []
    for part in PARTS.values():
        entry = (metrics.get(part.name) or {}).get(name)
        if not isinstance(entry, dict):
            continue
        for chart in part.charts:
            charts.append(
                {
                    "key": chart.key,
                    "title": chart.title,
                    "note": chart.note,
                    "per_pair": chart.per_pair,
                    "values": chart.values(entry),
                }
            )
    return charts
