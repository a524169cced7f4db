"""Rebuild a run's forests (HSAE and baselines) post hoc with another similarity, in a copy.

The weights stay as trained; only the parent links change. Firing-rate similarities
("coactivation", "conditional", "hybrid") get their statistics from one pass over the run's
training activations, with the trainer's EMA (momentum ``--momentum``, one update per batch of
``--batch`` tokens). The copy is an ordinary run folder: ``hsae eval COPY`` measures the new
forests (docs/synthetic.md, "The hybrid rule", has the demo's figures).

    python benchmarks/posthoc_forest.py runs/demo runs/demo-hybrid --similarity hybrid
    hsae eval runs/demo-hybrid --suite full --parts taxonomy
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

import hsae
from hsae.activations.cache import ActivationCache
from hsae.layout import ACTIVATIONS_DIR, MODEL_NAMES
from hsae.model.forest import make_tracker
from hsae.model.hsae import saved_training_config


def rebuild(
    model: hsae.HSAE,
    settings: hsae.HSAEConfig,
    train: torch.Tensor,
    similarity: str,
    batch: int = 1024,
    momentum: float = 0.99,
) -> None:
    """Replace ``model``'s forest by ``similarity``'s (the run's quantile and tree cap kept),
    with firing statistics from one pass over ``train`` (raw activations) in ``batch`` rows."""
    tracker = make_tracker(similarity, model.config.level_sizes, momentum)
    if tracker is not None:
        with torch.no_grad():
            for start in range(0, len(train), batch):
                codes = model.encode(train[start : start + batch])
                tracker.update([level_codes > 0 for level_codes in codes])
    links = model.build_forest(
        similarity,
        settings.effective_quantile,
        2 if settings.tree == "binary" else None,
        tracker,
    )
    for level, level_links in enumerate(links):
        model.set_parents(level, level_links)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder")
    parser.add_argument("out", type=Path, help="the copy to write (must not exist)")
    parser.add_argument("--similarity", required=True)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--momentum", type=float, default=0.99)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists")
    shutil.copytree(args.run, args.out, ignore=shutil.ignore_patterns("eval_cache", "checkpoints"))
    cache = ActivationCache(args.out / ACTIVATIONS_DIR)
    train = cache.all_activations("train")
    for name in MODEL_NAMES:
        folder = args.out / name
        if not folder.is_dir():
            continue
        model = hsae.load(folder)
        settings = saved_training_config(folder)
        if settings is None:
            parser.error(f"{folder} has no training settings to take the quantile from")
        before = [links.clone() for links in model.forest()]
        rebuild(model, settings, train, args.similarity, args.batch, args.momentum)
        kept = [float((a == b).float().mean()) for a, b in zip(before, model.forest(), strict=True)]
        print(f"{name}: share of links unchanged per level pair", [round(k, 3) for k in kept])
        model.save(folder)


if __name__ == "__main__":
    main()
