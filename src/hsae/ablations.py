"""Ablations of one run: the paper's variants trained on the run's cached activations.

Owns the catalogue of variants (hsae-method.md sections 4, 5, 7), their resolution against the
run's own HSAE settings, training each distinct configuration once into its own resumable
sub-run, evaluation of all of them on the same held-out activations, and the outputs::

    OUT/variants/<name>/   a run folder per trained configuration (model, checkpoints, logs,
                           timings); it trains on RUN's activation cache, no copy is made
    OUT/ablations.json     per variant: settings that differ from the reference, per-level
                           variance explained and L0, hierarchy metrics, train seconds
    OUT/ablations.md       one Markdown table
    OUT/figure8.png        variance explained vs Hamming for the rho and r sweeps (Figure 8)

Variants: ``baseline`` (independent SAEs, post-hoc forest), ``no_constraint`` (rho = 0),
``no_perturbation`` (r = 0), ``hsae`` (the run's settings: the reference); ``tree=...``
(partial, full, binary, fixed); ``similarity=...`` (every similarity the config accepts);
``rho=<v>`` and ``r=<v>`` for each sweep value. Variants that resolve to the same
configuration (``tree=partial`` and ``hsae`` when the run uses the partial tree, say) are
trained once; the run's own trained HSAE and baseline are reused when their saved settings
match. A killed ablation continues where it stopped: finished variants are skipped and an
unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from tqdm.auto import tqdm

from hsae.config import ConfigError, HSAEConfig, Similarity
from hsae.io import write_json, write_text
from hsae.layout import MODEL_NAMES, Which
from hsae.model import load_hsae
from hsae.model.hsae import CONFIG_FILE, saved_training_config
from hsae.report.plots import save_figure
from hsae.runs import Run, RunConfig, RunError

GROUPS = ("core", "tree", "similarity", "rho", "r")
TREES = ("partial", "full", "binary", "fixed")
SIMILARITIES: tuple[str, ...] = get_args(Similarity)
DEFAULT_RHO_SWEEP = (0.03, 0.1, 0.3, 1.0)
DEFAULT_R_SWEEP = (0.0, 0.02, 0.05, 0.1, 0.2)
REFERENCE = "hsae"
# Settings that never change what a model learns; left out when configurations are compared.
_NOT_COMPARED = ("device",)


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: a name, its group and how it departs from the run."""

    name: str
    group: str
    which: Which
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AblationSettings:
    """What ``hsae ablate`` trains; refused with one message naming the field when invalid."""

    variants: tuple[str, ...] = ("all",)
    train_tokens: int | None = None
    rho_sweep: tuple[float, ...] = DEFAULT_RHO_SWEEP
    r_sweep: tuple[float, ...] = DEFAULT_R_SWEEP

    def __post_init__(self) -> None:
        if self.train_tokens is not None and self.train_tokens < 1:
            raise ConfigError(
                f"train_tokens: must be >= 1 (or unset: the run's), got {self.train_tokens}"
            )
        for value in self.rho_sweep:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"rho_sweep: every value must be a finite number >= 0, got {value}"
                )
        for value in self.r_sweep:
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"r_sweep: every value must lie in [0, 1], got {value}")
        select_variants(self)  # unknown names are refused now, before any work


REFERENCE_VARIANT = Variant(REFERENCE, "core", "hsae")


def catalogue(rho_sweep: Sequence[float], r_sweep: Sequence[float]) -> list[Variant]:
    """Every variant in table order; the first of several that coincide names their folder."""
    variants = [
        Variant("baseline", "core", "baseline"),
        REFERENCE_VARIANT,
        Variant("no_constraint", "core", "hsae", {"rho": 0.0}),
        Variant("no_perturbation", "core", "hsae", {"perturbation_rate": 0.0}),
    ]
    variants += [Variant(f"tree={tree}", "tree", "hsae", {"tree": tree}) for tree in TREES]
    variants += [
        Variant(f"similarity={name}", "similarity", "hsae", {"similarity": name})
        for name in SIMILARITIES
    ]
    variants += [Variant(f"rho={v:g}", "rho", "hsae", {"rho": v}) for v in _unique(rho_sweep)]
    variants += [
        Variant(f"r={v:g}", "r", "hsae", {"perturbation_rate": v}) for v in _unique(r_sweep)
    ]
    return variants


def select_variants(settings: AblationSettings) -> list[Variant]:
    """The catalogue entries ``settings.variants`` asks for (groups or names), in table order."""
    everything = catalogue(settings.rho_sweep, settings.r_sweep)
    names = {variant.name for variant in everything}
    wanted: set[str] = set()
    for item in settings.variants:
        if item == "all":
            wanted |= names
        elif item in GROUPS:
            wanted |= {v.name for v in everything if v.group == item}
        elif item in names:
            wanted.add(item)
        else:
            allowed = ", ".join(("all", *GROUPS, *(v.name for v in everything)))
            raise ConfigError(f"variants: unknown variant {item!r}; allowed: {allowed}")
    if not wanted:
        raise ConfigError("variants: nothing selected; give at least one group or variant name")
    return [variant for variant in everything if variant.name in wanted]


# --- planning -----------------------------------------------------------------------------
@dataclass
class Planned:
    """A variant resolved against the run: its full configuration and where its model lives."""

    variant: Variant
    run_config: RunConfig
    config: HSAEConfig
    folder: str
    """Name of the sub-run that trains it (shared by variants that coincide)."""
    reused: Path | None = None
    """The run's own model folder when the run already trained exactly this configuration."""


def plan(run: Run, settings: AblationSettings) -> list[Planned]:
    """Resolve every selected variant; coinciding configurations share one folder."""
    cache = run.cache()
    train_tokens = settings.train_tokens or _run_train_tokens(run, cache)
    first_of: dict[str, str] = {}
    for variant in catalogue(settings.rho_sweep, settings.r_sweep):
        _, resolved = resolve(run, cache, variant, train_tokens)
        first_of.setdefault(fingerprint(resolved), variant.name)
    own_models = _run_models(run)
    planned = []
    for variant in select_variants(settings):
        config, resolved = resolve(run, cache, variant, train_tokens)
        key = fingerprint(resolved)
        planned.append(Planned(variant, config, resolved, first_of[key], own_models.get(key)))
    return planned


def resolve(
    run: Run, cache: Any, variant: Variant, train_tokens: int
) -> tuple[RunConfig, HSAEConfig]:
    """The variant's run settings (the run's, its overrides, the training length, no extra
    logging) and the HSAE configuration they resolve to on the run's activations."""
    hsae = run.config.hsae | variant.overrides | {"train_tokens": train_tokens}
    values = run.config.model_dump() | {"hsae": hsae, "tensorboard": False, "wandb_project": None}
    config = RunConfig(**values)
    return config, config.hsae_config(cache.d_model, _mode(variant.which), cache.scale)


def comparable(config: HSAEConfig) -> dict[str, Any]:
    """The settings that decide what a model learns (not the device)."""
    values = config.model_dump()
    for name in _NOT_COMPARED:
        values.pop(name, None)
    return values


def fingerprint(config: HSAEConfig) -> str:
    return json.dumps(comparable(config), sort_keys=True)


def _mode(which: Which) -> str:
    return "hsae" if which == "hsae" else "independent"


def _run_train_tokens(run: Run, cache: Any) -> int:
    return run.config.hsae_config(cache.d_model, "hsae", cache.scale).train_tokens


def _run_models(run: Run) -> dict[str, Path]:
    """The run's trained models by fingerprint of their saved settings."""
    found = {}
    for which in MODEL_NAMES:
        folder = run.model_dir(which)
        saved = saved_training_config(folder) if (folder / CONFIG_FILE).is_file() else None
        if saved is not None:
            found[fingerprint(saved)] = folder
    return found


# --- training -------------------------------------------------------------------------------
@dataclass
class Trained:
    """Where a distinct configuration's model is and how long it took to train."""

    model_dir: Path
    train_seconds: float | None
    reused_from_run: bool


def train_all(
    run: Run, out: Path, planned: list[Planned], progress: bool = True
) -> dict[str, Trained]:
    """Train each distinct configuration once (skipping finished ones); keyed by folder name."""
    distinct: dict[str, Planned] = {}
    for entry in planned:
        distinct.setdefault(entry.folder, entry)
    trained = {}
    bar = tqdm(list(distinct.values()), desc="ablations", unit="variant", disable=not progress)
    for entry in bar:
        bar.set_postfix_str(entry.folder)
        trained[entry.folder] = _train_one(run, out, entry, progress)
    return trained


def _train_one(run: Run, out: Path, entry: Planned, progress: bool) -> Trained:
    which = entry.variant.which
    if entry.reused is not None:
        seconds = run.timings.get(f"train_{which}")
        return Trained(entry.reused, seconds, reused_from_run=True)
    folder = out / "variants" / entry.folder
    _refuse_other_settings(folder, which, entry.config)
    sub_run = Run.create(folder, entry.run_config, activations_dir=run.activations_dir)
    sub_run.train(which, progress=progress)
    return Trained(sub_run.model_dir(which), sub_run.timings.get(f"train_{which}"), False)


def _refuse_other_settings(folder: Path, which: Which, wanted: HSAEConfig) -> None:
    """A finished variant folder must hold a model of exactly these settings."""
    path = folder / which / CONFIG_FILE
    if not path.is_file():
        return  # unfinished: the checkpoint's own fingerprint check guards a resume
    saved = saved_training_config(folder / which)
    if saved is not None and fingerprint(saved) != fingerprint(wanted):
        old, new = comparable(saved), comparable(wanted)
        differing = [key for key in new if old.get(key) != new[key]]
        shown = ", ".join(f"{k}: {old.get(k)!r} vs {new[k]!r}" for k in differing[:4])
        raise RunError(
            f"{folder} holds a model trained with other settings ({shown}); "
            "choose another --out or the original settings"
        )


# --- evaluation and outputs ---------------------------------------------------------------
def ablate(
    run_dir: str | Path,
    out: str | Path | None = None,
    settings: AblationSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and tabulate the ablations of ``run_dir``; return ablations.json's data."""
    settings = settings or AblationSettings()
    run = Run.open(run_dir)
    target = Path(out) if out is not None else run.folder / "ablations"
    planned = plan(run, settings)
    trained = train_all(run, target, planned, progress)
    heldout = run.cache().all_activations("heldout")[: run.config.eval_tokens]
    if heldout.shape[0] == 0:
        raise RunError(f"{run.folder}: the activation cache has no held-out tokens")
    evaluations = _evaluate_all(trained, heldout, progress)
    _, reference = resolve(run, run.cache(), REFERENCE_VARIANT, planned[0].config.train_tokens)
    results = {
        "run": str(run.folder),
        "out": str(target),
        "train_tokens": planned[0].config.train_tokens,
        "heldout_tokens": int(heldout.shape[0]),
        "reference": comparable(reference),
        "variants": [
            _variant_record(entry, trained[entry.folder], evaluations[entry.folder], reference)
            for entry in planned
        ],
    }
    write_json(target / "ablations.json", results)
    write_text(target / "ablations.md", markdown_table(results))
    write_figure8(results, target / "figure8.png")
    return results


def _evaluate_all(
    trained: dict[str, Trained], heldout: torch.Tensor, progress: bool
) -> dict[str, dict[str, Any]]:
    from hsae.evaluation import evaluate

    evaluations = {}
    for name, entry in tqdm(trained.items(), desc="evaluate", disable=not progress):
        evaluations[name] = evaluate(load_hsae(entry.model_dir), heldout).to_dict()
    return evaluations


def _variant_record(
    entry: Planned, trained: Trained, evaluation: dict[str, Any], reference: HSAEConfig
) -> dict[str, Any]:
    mine, theirs = comparable(entry.config), comparable(reference)
    levels = [
        {key: level[key] for key in ("level", "l0", "variance_explained", "dead_fraction")}
        for level in evaluation["levels"]
    ]
    return {
        "name": entry.variant.name,
        "group": entry.variant.group,
        "differs": {key: value for key, value in mine.items() if theirs.get(key) != value},
        "trained_as": entry.folder,
        "model": str(trained.model_dir),
        "reused_from_run": trained.reused_from_run,
        "train_seconds": trained.train_seconds,
        "mean_variance_explained": _mean([level["variance_explained"] for level in levels]),
        "mean_l0": _mean([level["l0"] for level in levels]),
        "levels": levels,
        "hierarchy": {
            key: _finite_or_none(value)
            for key, value in evaluation["hierarchy"].items()
            if key != "per_level"
        },
    }


def _finite_or_none(value: Any) -> Any:
    """NaN (no parent with children) becomes null, so ablations.json stays strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def markdown_table(results: dict[str, Any]) -> str:
    """The table of ablations.md: one row per variant, coinciding variants marked."""
    lines = [
        "| variant | Hamming/1k | P(p\\|c) | P(c\\|p) | mean VE | L0 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for record in results["variants"]:
        name = record["name"]
        if record["trained_as"] != name:
            name += f" (= {record['trained_as']})"
        hierarchy = record["hierarchy"]
        cells = [
            hierarchy["hamming_per_1k"],
            hierarchy["p_parent_given_child"],
            hierarchy["p_child_given_parent"],
            record["mean_variance_explained"],
        ]
        values = " | ".join(_fmt(v, 1 if i == 0 else 3) for i, v in enumerate(cells))
        lines.append(f"| {name} | {values} | {_fmt(record['mean_l0'], 1)} |")
    note = (
        f"\n{results['heldout_tokens']} held-out tokens; each variant trained on "
        f"{results['train_tokens']} tokens. Hamming, P(p|c), P(c|p): pooled over all level "
        "pairs; VE and L0: mean over levels.\n"
    )
    return "\n".join(lines) + "\n" + note


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def write_figure8(results: dict[str, Any], path: Path) -> Path:
    """Variance explained against Hamming for each sweep value, baseline and reference marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["variants"]
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for group, colour, below in (("rho", "#1f6fd1", False), ("r", "#2ca02c", True)):
        _plot_sweep(axis, [r for r in records if r["group"] == group], group, colour, below)
    reference = results["reference"]
    for name, marker, colour, size, label in (
        ("baseline", "*", "#f08c2e", 140, "baseline"),
        (
            REFERENCE,
            "s",
            "#d62728",
            50,
            f"hsae (rho={reference['rho']:g}, r={reference['perturbation_rate']:g})",
        ),
    ):
        record = next((r for r in records if r["name"] == name), None)
        if record is not None:
            x, y = _point(record)
            axis.scatter(x, y, marker=marker, s=size, color=colour, label=label, zorder=3)
    axis.set_xlabel("Hamming per 1k tokens (lower is better)")
    axis.set_ylabel("mean variance explained over levels")
    axis.set_title("Figure 8: reconstruction vs hierarchy consistency", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def _point(record: dict[str, Any]) -> tuple[float, float]:
    hamming = record["hierarchy"]["hamming_per_1k"]
    return (math.nan if hamming is None else hamming), record["mean_variance_explained"]


def _plot_sweep(
    axis: Any, records: list[dict[str, Any]], symbol: str, colour: str, below: bool
) -> None:
    """One line through a sweep's points in value order, each labelled except the reference."""
    if not records:
        return
    records = sorted(records, key=lambda r: float(r["name"].split("=", 1)[1]))
    xs, ys = zip(*(_point(r) for r in records), strict=True)
    axis.plot(xs, ys, "o-", color=colour, label=f"{symbol} sweep", markersize=5)
    for record, x, y in zip(records, xs, ys, strict=True):
        if record["differs"]:  # the reference point carries the legend's label instead
            offset = (4, -10) if below else (4, 4)
            axis.annotate(
                record["name"],
                (x, y),
                textcoords="offset points",
                xytext=offset,
                fontsize=7,
                color=colour,
            )


def _unique(values: Sequence[float]) -> list[float]:
    return list(dict.fromkeys(float(v) for v in values))
