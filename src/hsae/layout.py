"""The run folder: its layout, the names of the models it holds, and what readers need of a run.

This module is the one place that knows where things live in a run folder (see docs/runs.md)::

    RUN/run.json                 the validated run settings and what they resolved to
    RUN/activations/             the activation cache (manifest.json, shards)
    RUN/hsae/, RUN/baseline/,    the trained models (hsae.safetensors + hsae_config.json):
    RUN/matryoshka/              the HSAE and each wanted baseline (BASELINES)
    RUN/checkpoints/<model>/     resumable trainer state while training
    RUN/logs/train_<model>.jsonl one JSON line per logged step
    RUN/metrics.json, summary.md evaluation of the models side by side
    RUN/timings.json             seconds spent in each stage
    RUN/labels.json              feature labels (people and judges)
    RUN/eval_cache/              the language-model side of the full suite, reused on reruns
    RUN/report.html, RUN/plots/  the feature explorer and its charts

It imports nothing from the package, so every layer may use it. :class:`RunView` is what the
evaluation and report layers need of a run; :class:`hsae.runs.Run` provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

BASELINES: dict[str, str] = {
    "independent": "baseline",
    "matryoshka": "matryoshka",
}
"""The baselines a run can train beside the HSAE (``--baselines``): baseline name (also the
model's ``ArchitectureConfig.mode``) -> the model's name in a run folder. Adding a baseline is
one line here plus its model class (docs/extending.md)."""
MODEL_NAMES = ("hsae", *BASELINES.values())
"""The models a run trains, in the order they are trained, evaluated and shown."""
Which = Literal["hsae", "baseline", "matryoshka"]
"""A model name of a run (one of MODEL_NAMES; for type checkers only)."""

RUN_FILE = "run.json"
ACTIVATIONS_DIR = "activations"
CACHE_MANIFEST = "manifest.json"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
TIMINGS_FILE = "timings.json"
LABELS_FILE = "labels.json"
ARCHIVE_RECORD = "archive.json"
EVAL_CACHE_DIR = "eval_cache"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
LOCK_FILE = ".lock"
TENSORBOARD_DIR = "tensorboard"

RUN_OWNED = (
    RUN_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
    LABELS_FILE,
    ARCHIVE_RECORD,
    ACTIVATIONS_DIR,
    *MODEL_NAMES,
    CHECKPOINTS_DIR,
    LOGS_DIR,
    EVAL_CACHE_DIR,
    TENSORBOARD_DIR,
    "ablations",
    "saebench",
)
"""A run folder's own entries (besides the report): nothing hsae exports may replace them."""


def baseline_mode(which: str) -> str:
    """The ``ArchitectureConfig.mode`` of run model ``which`` ("hsae" for the HSAE)."""
    modes = {name: mode for mode, name in BASELINES.items()}
    return modes.get(check_model_name(which), "hsae")


def check_model_name(which: str) -> Which:
    """``which`` if it names a model of a run; a ValueError naming the choices otherwise."""
    if which not in MODEL_NAMES:
        raise ValueError(f"which must be one of {list(MODEL_NAMES)}, got {which!r}")
    return which  # type: ignore[return-value]


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    folder: Path

    @property
    def run_file(self) -> Path:
        return self.folder / RUN_FILE

    @property
    def activations(self) -> Path:
        return self.folder / ACTIVATIONS_DIR

    @property
    def metrics(self) -> Path:
        return self.folder / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.folder / SUMMARY_FILE

    @property
    def timings(self) -> Path:
        return self.folder / TIMINGS_FILE

    @property
    def labels(self) -> Path:
        return self.folder / LABELS_FILE

    @property
    def eval_cache(self) -> Path:
        return self.folder / EVAL_CACHE_DIR

    @property
    def report(self) -> Path:
        return self.folder / REPORT_FILE

    @property
    def plots(self) -> Path:
        return self.folder / PLOTS_DIR

    @property
    def lock(self) -> Path:
        return self.folder / LOCK_FILE

    def model(self, which: str) -> Path:
        return self.folder / check_model_name(which)

    def checkpoint(self, which: str) -> Path:
        return self.folder / CHECKPOINTS_DIR / check_model_name(which)

    def log(self, which: str) -> Path:
        return self.folder / LOGS_DIR / f"train_{check_model_name(which)}.jsonl"


class RunView(Protocol):
    """What evaluation and the report read of a run (:class:`hsae.runs.Run` is one)."""

    folder: Path
    config: Any
    """The run's settings; readers use ``config.model`` (the language model's name)."""

    def trained(self, which: Which) -> bool: ...

    def load(self, which: Which) -> Any:
        """The trained model ``which`` (an :class:`hsae.model.HSAE`)."""
        ...

    def cache(self) -> Any:
        """The run's activation cache (an :class:`hsae.activations.ActivationCache`)."""
        ...

    def wanted_models(self) -> list[Which]: ...
