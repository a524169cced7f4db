"""HSAE vs the post-hoc baseline over seeds, on both synthetic families, scored by firing F1.

For every family ("splitting": children clustered around their parent, leaves the atoms;
"absorption": every node an atom, children pointing their own way and firing only with their
parent; see ``hsae.synthetic``), every seed and every variant (the baseline, HSAE at the current
defaults, and our options), trains one model on one CPU thread, evaluates it on 50,000
held-out tokens (hierarchy metrics, variance explained per level) and scores its forest
against the truth (``hsae.evaluation.recovery.firing_forest_recovery``: latents matched to
truth nodes by firing F1, strict and lenient edge precision, edge recall). Writes mean and
95 % t-interval over seeds per variant, and HSAE minus baseline paired by seed.

Results go to a JSON file after every finished run (written by the main process only); a
rerun skips the runs already there with the same settings, so an interrupted sweep resumes.

    OMP_NUM_THREADS=1 nohup python benchmarks/synthetic_seeds.py --workers 2 \\
        --json benchmarks/results/synthetic_seeds.json --out docs/synthetic_seeds.md &
    python benchmarks/synthetic_seeds.py --json benchmarks/results/synthetic_seeds.json \\
        --table-only            # the table from whatever has finished
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from scipy import stats

import hsae
from hsae.evaluation import evaluate, firing_forest_recovery, forest_recovery
from hsae.io import read_json, write_json, write_text
from hsae.synthetic import SyntheticSpec, make_synthetic_forest
from posthoc_forest import rebuild  # this folder's script, on sys.path when run as one

FAMILIES = ("splitting", "absorption")
POOL_TOKENS = 1_000_000
"""Training tokens are drawn, epoch after epoch, from a pool of this many sampled tokens."""

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"mode": "independent"},
    "hsae": {},
    "hsae-paper-rho": {"rho": 0.01},
    "hsae-no-perturbation": {"perturbation_rate": 0.0},
    "baseline-conditional": {"mode": "independent", "similarity": "conditional"},
    "hsae-conditional": {"similarity": "conditional"},
    "hsae-warmup": {"forest_warmup": 0.3},
    "hsae-warmup-conditional": {"forest_warmup": 0.3, "similarity": "conditional"},
    "baseline-hybrid": {"mode": "independent", "similarity": "hybrid"},
    "hsae-hybrid": {"similarity": "hybrid"},
    "hsae-then-conditional": {"similarity": "conditional"},
    "hsae-then-hybrid": {"similarity": "hybrid"},
}
"""Variant name -> HSAEConfig fields on top of the shared settings (empty: current defaults)."""

POST_HOC = {
    "baseline-conditional": "baseline",
    "baseline-hybrid": "baseline",
    "hsae-then-conditional": "hsae",
    "hsae-then-hybrid": "hsae",
}
"""Variants made from another's saved model by rebuilding its forest with their similarity,
from firing statistics gathered like the trainer's (ConditionalTracker, momentum 0.99, one
batch of 256 tokens per update, 1,000 updates over the training pool), with --models, instead
of training again. For an independent model this is exactly the variant trained with that
similarity (its weights do not depend on the forest); for an HSAE ("hsae-then-...") it is the
HSAE trained at the defaults (decoder cosine) with its final forest rebuilt by another rule."""


def family_spec(family: str, seed: int) -> SyntheticSpec:
    if family == "splitting":
        return SyntheticSpec(seed=seed)
    if family == "absorption":
        return SyntheticSpec.absorption(seed=seed)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def run_key(family: str, variant: str, seed: int) -> str:
    return f"{family}/{variant}/seed{seed}"


def _key_fields(settings: dict[str, Any]) -> dict[str, Any]:
    return {name: settings[name] for name in ("family", "variant", "seed")}


def job_settings(family: str, variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that determines a run's result (stored with it, compared on resume)."""
    return {
        "family": family,
        "variant": variant,
        "seed": seed,
        "steps": args.steps,
        "batch": args.batch,
        "heldout": args.heldout,
        "lr": args.lr,
        "min_f1": args.min_f1,
        "overrides": VARIANTS[variant],
    }


def run_job(settings: dict[str, Any]) -> dict[str, Any]:
    """Train and score one (family, variant, seed); runs in a worker process."""
    torch.set_num_threads(1)
    seed = settings["seed"]
    forest = make_synthetic_forest(family_spec(settings["family"], seed))
    pool = forest.sample(POOL_TOKENS, torch.Generator().manual_seed(seed + 1))
    heldout, truth = forest.sample_with_truth(
        settings["heldout"], torch.Generator().manual_seed(seed + 10_000)
    )
    target_l0 = forest.spec.active_per_token
    config = hsae.HSAEConfig(
        d_in=forest.spec.d,
        level_sizes=forest.suggested_level_sizes(),
        target_l0=target_l0,
        train_tokens=settings["steps"] * settings["batch"],
        batch_size=settings["batch"],
        lr=settings["lr"],
        # The controller settings of benchmarks/synthetic_forest.py.
        l0_ema_momentum=0.99,
        l0_decay_rate=0.005,
        sparsity_init=0.1 * forest.spec.d / target_l0,
        sparsity_adjust=0.01,
        seed=seed,
        device="cpu",
        **settings["overrides"],
    )
    start = time.perf_counter()
    source = POST_HOC.get(settings["variant"])
    saved = (
        Path(settings.get("models") or ".")
        / run_key(settings["family"], source or "", seed).replace("/", "_")
        if source
        else None
    )
    if saved is not None and saved.exists():
        model = hsae.load(saved)
        rebuild_post_hoc(model, config, pool)
    else:
        model = hsae.train(config, pool, progress=False)
    seconds = time.perf_counter() - start
    quality = evaluate(model, heldout)
    codes = model.encode_in_batches(heldout)
    firing = firing_forest_recovery(codes, model.forest(), truth, forest, settings["min_f1"])
    cosine = forest_recovery(
        [level.W_dec.detach() for level in model.levels], model.forest(), forest
    )
    if settings.get("models"):
        model.save(Path(settings["models"]) / run_key(**_key_fields(settings)).replace("/", "_"))
    return {
        "settings": settings,
        "post_hoc_of": source if saved is not None and saved.exists() else None,
        "level_sizes": config.level_sizes,
        "target_l0": target_l0,
        "seconds": seconds,
        "hierarchy": quality.hierarchy.to_dict(),
        "levels": [level.to_dict() for level in quality.levels],
        "firing_recovery": firing.to_dict(),
        "cosine_recovery": cosine.to_dict(),
    }


def rescore(run: dict[str, Any], models: Path) -> bool:
    """Recompute a stored run's firing recovery from its saved model (False: no model)."""
    settings = run["settings"]
    saved = models / run_key(**_key_fields(settings)).replace("/", "_")
    if not saved.exists():
        return False
    seed = settings["seed"]
    forest = make_synthetic_forest(family_spec(settings["family"], seed))
    heldout, truth = forest.sample_with_truth(
        settings["heldout"], torch.Generator().manual_seed(seed + 10_000)
    )
    model = hsae.load(saved)
    codes = model.encode_in_batches(heldout)
    firing = firing_forest_recovery(codes, model.forest(), truth, forest, settings["min_f1"])
    run["firing_recovery"] = firing.to_dict()
    return True


def rebuild_post_hoc(model: hsae.HSAE, config: hsae.HSAEConfig, pool: torch.Tensor) -> None:
    """Replace ``model``'s forest by ``config.similarity``'s rule on fresh firing statistics
    (the trainer's EMA over the first 1,000 batches of 256 pool tokens)."""
    rebuild(model, config, pool[: 1000 * 256], config.similarity, 256, config.coactivation_momentum)


# ------------------------------------------------------------------------------ statistics
def metric_values(run: dict[str, Any]) -> dict[str, float]:
    """The table's metrics of one run (nan where undefined)."""
    firing, hierarchy = run["firing_recovery"], run["hierarchy"]

    def number(value: Any) -> float:
        return float("nan") if value is None else float(value)

    values = {
        "precision_strict": number(firing["edge_precision_strict"]),
        "precision_lenient": number(firing["edge_precision_lenient"]),
        "recall": number(firing["edge_recall"]),
        "recall_lenient": number(firing["edge_recall_lenient"]),
        "node_recovery": number(firing["node_recovery"]),
        "split_precision": number(firing.get("split_edge_precision")),
        "split_recall": number(firing.get("split_edge_recall")),
        "hamming_per_1k": number(hierarchy["hamming_per_1k"]),
        "p_parent_given_child": number(hierarchy["p_parent_given_child"]),
        "p_child_given_parent": number(hierarchy["p_child_given_parent"]),
    }
    for index, level in enumerate(run["levels"]):
        values[f"fve_{index}"] = number(level["variance_explained"])
    return values


def t_interval(values: list[float]) -> tuple[float, float, int]:
    """Mean and half-width of the 95 % t-interval over the finite values (nan if < 2)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(finite) / n
    if n < 2:
        return mean, float("nan"), n
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n


COLUMNS = [
    ("precision_strict", "edge precision (strict)", 3),
    ("precision_lenient", "edge precision (lenient)", 3),
    ("recall", "edge recall", 3),
    ("split_precision", "split-link precision", 3),
    ("split_recall", "split-link recall", 3),
    ("node_recovery", "nodes matched", 3),
    ("hamming_per_1k", "Hamming/1k", 1),
    ("p_parent_given_child", "P(p given c)", 3),
    ("p_child_given_parent", "P(c given p)", 3),
]


def _cell(values: list[float], digits: int) -> str:
    mean, half, n = t_interval(values)
    if n == 0:
        return "n/a"
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def markdown(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """Per family: mean ± 95 % half-width per variant, then HSAE-style variants minus baseline."""
    lines: list[str] = []
    for family in args.families:
        by_variant: dict[str, list[dict[str, float]]] = {}
        seeds_of: dict[str, list[int]] = {}
        for variant in args.variants:
            found = [
                (seed, runs[run_key(family, variant, seed)])
                for seed in args.seeds
                if run_key(family, variant, seed) in runs
            ]
            if found:
                by_variant[variant] = [metric_values(run) for _, run in found]
                seeds_of[variant] = [seed for seed, _ in found]
        if not by_variant:
            continue
        n_levels = max(len([k for k in v[0] if k.startswith("fve_")]) for v in by_variant.values())
        lines += [f"### {family} family", ""]
        head = ["variant", "seeds"] + [title for _, title, _ in COLUMNS]
        head += [f"FVE level {level}" for level in range(n_levels)]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for variant, rows in by_variant.items():
            cells = [variant, str(len(rows))]
            cells += [_cell([row[key] for row in rows], digits) for key, _, digits in COLUMNS]
            cells += [
                _cell([row.get(f"fve_{level}", float("nan")) for row in rows], 3)
                for level in range(n_levels)
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if args.reference in by_variant and len(by_variant) > 1:
            lines += _paired_table(by_variant, seeds_of, n_levels, args.reference)
    lines.append(
        f"Settings: {args.steps} steps of batch {args.batch} (d = 64, level sizes from the "
        f"forest, rounded up to 16), target L0 = the family's active atoms per token, "
        f"held-out {args.heldout:,} tokens, latents matched to truth with F1 >= {args.min_f1}. "
        "Mean ± half-width of the 95 % t-interval over seeds."
    )
    return "\n".join(lines)


def _paired_table(
    by_variant: dict[str, list[dict[str, float]]],
    seeds_of: dict[str, list[int]],
    n_levels: int,
    reference: str = "baseline",
) -> list[str]:
    """Every other variant minus ``reference``, paired by seed: mean ± 95 % half-width."""
    keys = ["precision_strict", "precision_lenient", "recall", "split_precision", "split_recall"]
    keys += [f"fve_{level}" for level in range(n_levels)]
    head = [f"variant − {reference} (paired by seed)", "seeds"]
    head += ["Δ precision (strict)", "Δ precision (lenient)", "Δ recall"]
    head += ["Δ split-link precision", "Δ split-link recall"]
    head += [f"Δ FVE level {level}" for level in range(n_levels)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base = dict(zip(seeds_of[reference], by_variant[reference], strict=True))
    for variant, rows in by_variant.items():
        if variant == reference:
            continue
        pairs = [
            (row, base[seed])
            for seed, row in zip(seeds_of[variant], rows, strict=True)
            if seed in base
        ]
        cells = [variant, str(len(pairs))]
        for key in keys:
            cells.append(_cell([a[key] - b[key] for a, b in pairs], 3))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------ main
def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return read_json(path)
    return {"runs": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--variants", nargs="+", default=["baseline", "hsae"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--reference", default="baseline", choices=VARIANTS, help="the paired table subtracts it"
    )
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=50_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-f1", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2, help="training processes at once")
    parser.add_argument("--json", type=Path, required=True, help="results, written after each run")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here")
    parser.add_argument("--models", type=Path, help="also save every trained model here")
    parser.add_argument("--table-only", action="store_true", help="only tabulate the JSON")
    parser.add_argument(
        "--rescore", action="store_true", help="recompute stored runs' scores from --models"
    )
    args = parser.parse_args()

    results = load_results(args.json)
    runs: dict[str, Any] = results["runs"]
    if args.rescore:
        if args.models is None:
            parser.error("--rescore needs --models")
        torch.set_num_threads(1)
        done = [key for key, run in runs.items() if rescore(run, args.models)]
        write_json(args.json, results)
        print(f"rescored {len(done)} of {len(runs)} runs", flush=True)
    if not args.table_only and not args.rescore:
        todo = []
        for seed in args.seeds:  # seed-major, so partial results are already paired
            for family in args.families:
                for variant in args.variants:
                    settings = job_settings(family, variant, seed, args)
                    key = run_key(family, variant, seed)
                    if key in runs and runs[key]["settings"] == settings:
                        continue
                    todo.append(settings | {"models": str(args.models) if args.models else ""})
        print(f"{len(todo)} runs to do, {len(runs)} stored", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as executor:
            pending: dict[Future[dict[str, Any]], dict[str, Any]] = {
                executor.submit(run_job, settings): settings for settings in todo
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    settings = pending.pop(future)
                    key = run_key(**_key_fields(settings))
                    try:
                        run = future.result()
                    except Exception as error:  # report and go on with the other runs
                        print(f"{key} failed: {error!r}", file=sys.stderr, flush=True)
                        continue
                    run["settings"].pop("models", None)  # where a copy went; not a setting
                    runs[key] = run
                    write_json(args.json, results)
                    values = metric_values(run)
                    print(
                        f"{key} ({run['seconds']:.0f} s): precision strict "
                        f"{values['precision_strict']:.3f} lenient "
                        f"{values['precision_lenient']:.3f}, recall {values['recall']:.3f}, "
                        f"nodes {values['node_recovery']:.3f}, Hamming "
                        f"{values['hamming_per_1k']:.1f}, FVE "
                        + "/".join(
                            f"{values[k]:.3f}" for k in sorted(values) if k.startswith("fve_")
                        ),
                        flush=True,
                    )
    table = markdown(runs, args)
    print(table)
    if args.out:
        write_text(args.out, table + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
