"""HSAE (JumpReLU and BatchTopK levels), independent SAEs and Matryoshka SAE on one activation
cache: the comparison table of docs/baselines.md and the README.

Starts from a finished demo run (``hsae demo --suite full``: its activations, HSAE and
independent baseline, and the language-model side of the full suite in ``eval_cache``), and
fills two run folders that share its activations (hard links) and evaluation cache (copied):

- ``OUT/main``: the demo's HSAE and baseline (copied) plus the Matryoshka SAE, trained here;
- ``OUT/batchtopk``: an HSAE with BatchTopK levels (demo settings otherwise), trained here.

Then evaluates both (standard metrics with CE loss recovered, plus absorption and taxonomy
agreement) and prints the table. Each step is skipped when already done, so a killed run
continues. Usage::

    python scripts/compare_baselines.py [--demo runs/demo] [--out runs/compare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from hsae.runs import Run, RunConfig, demo_config

PARTS = "absorption,taxonomy"


def prepare(demo: Path, folder: Path, changes: dict[str, Any], models: tuple[str, ...]) -> Run:
    """A run folder with the demo's settings plus ``changes``, its activations hard-linked
    from the demo's, its evaluation cache and ``models`` copied."""
    config = RunConfig(**demo_config().model_dump() | changes)
    run = Run.create(folder, config)
    if not (folder / "activations").exists():
        shutil.copytree(demo / "activations", folder / "activations", copy_function=os.link)
    if (demo / "eval_cache").is_dir() and not (folder / "eval_cache").exists():
        shutil.copytree(demo / "eval_cache", folder / "eval_cache")
    for name in models:
        if not (folder / name).exists():
            shutil.copytree(demo / name, folder / name)
    return run


def evaluate(run: Run) -> dict[str, Any]:
    """Standard metrics plus absorption and taxonomy, unless metrics.json has them already."""
    from hsae.evaluation.suite import SuiteSettings

    path = run.folder / "metrics.json"
    if path.is_file():
        metrics = json.loads(path.read_text(encoding="utf-8"))
        if all(name in metrics.get("taxonomy", {}) for name in run.wanted_models()):
            return metrics
    settings = SuiteSettings(parts=tuple(PARTS.split(",")), seed=run.config.seed)
    return run.evaluate(suite="full", suite_settings=settings)


def table(main: dict[str, Any], batchtopk: dict[str, Any]) -> str:
    columns = [
        ("HSAE (JumpReLU)", main, "hsae"),
        ("HSAE (BatchTopK)", batchtopk, "hsae"),
        ("independent", main, "baseline"),
        ("Matryoshka", main, "matryoshka"),
    ]

    def levels(key: str, digits: int):
        return lambda m, n: " / ".join(f"{level[key]:.{digits}f}" for level in m[n]["levels"])

    def taxonomy(kind: str):
        def cell(m: dict[str, Any], n: str) -> str:
            entry = m["taxonomy"][n]["all_pairs"]
            value, random = entry[kind], entry[f"random_{kind}"]
            return (
                f"{value['precision']:.3f} [{value['low']:.3f}, {value['high']:.3f}] "
                f"(random {random['precision']:.2f}; {entry['evaluated']} links)"
            )

        return cell

    rows = [
        ("Hamming per 1k tokens (lower is better)",
         lambda m, n: f"{m[n]['hierarchy']['hamming_per_1k']:.1f}"),
        ("P(parent given child)", lambda m, n: f"{m[n]['hierarchy']['p_parent_given_child']:.3f}"),
        ("P(child given parent)", lambda m, n: f"{m[n]['hierarchy']['p_child_given_parent']:.3f}"),
        ("parent-child links the hierarchy metrics judge",
         lambda m, n: str(m[n]["hierarchy"]["n_pairs"])),
        ("L0 per level", levels("l0", 1)),
        ("variance explained per level", levels("variance_explained", 3)),
        ("CE loss recovered per level", levels("ce_loss_recovered", 3)),
        ("absorption, 1 - mean fraction, per level",
         lambda m, n: " / ".join(f"{lv['score']:.3f}" for lv in m["absorption"][n]["levels"])),
        ("taxonomy, all links: hypernym or same synset [95%]", taxonomy("hypernym")),
        ("taxonomy, all links: strict ancestor [95%]", taxonomy("strict")),
    ]  # fmt: skip
    lines = ["| | " + " | ".join(c[0] for c in columns) + " |", "|" + " --- |" * 5]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(m, n) for _, m, n in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()
    main_run = prepare(
        args.demo, args.out / "main", {"baselines": ["independent", "matryoshka"]},
        ("hsae", "baseline"),
    )  # fmt: skip
    settings = demo_config().hsae | {"level": "batchtopk"}
    btk_run = prepare(args.demo, args.out / "batchtopk", {"hsae": settings, "baselines": []}, ())
    for run in (main_run, btk_run):
        for which in run.wanted_models():
            run.train(which)
    print(table(evaluate(main_run), evaluate(btk_run)))


if __name__ == "__main__":
    main()
