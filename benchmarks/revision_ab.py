"""This checkout's training step against another git revision's, stepped alternately in one process.

On a shared or virtual machine a whole process can run 10-15% faster or slower than the next
(``step_speed.py``'s note), and one host can be slower than the next hour's, so two versions
timed in separate runs cannot be told apart by a few per cent. This script loads the other
revision's package next to this checkout's, under another name (``git archive`` of its
``src/hsae``, its imports renamed to ``hsae_base``), builds both versions' trainers (the HSAE
and its independent stack) on the same batches, brings every one to steady state as
``step_speed.py`` does (thresholds at the target L0's quantile, then ``--settle`` controller
steps), and steps them alternately: each round, every trainer runs ``--steps`` steps in turn,
the order reversed every round. A trainer built later tends to step a little faster (1-2% here,
its memory's place), so each version gets ``--instances`` trainers of each kind, built in the
order A B B A, and their steps are pooled. It prints the median wall-clock ms/step of each
version, the HSAE over its independent stack for each, and this checkout over the base. Run
with ``--base HEAD`` first: the same code against itself shows the noise left (on the 2-core
CPU of the README, within 2%).

The base revision must have the package at ``src/hsae``; configuration fields it does not know
are left out of its config. Both versions share this process's torch and its allocator setting
(``hsae.devices.keep_freed_cpu_memory`` on CPU).

    python benchmarks/revision_ab.py --base HEAD~1                   # d = 640, 16 rounds of 3
    python benchmarks/revision_ab.py --base HEAD                     # the noise floor
    python benchmarks/revision_ab.py --base v0.9 --scale large --rounds 6 --steps 1 --instances 1
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from step_speed import (
    N_BATCHES,
    SCALES,
    _cycle,
    add_scale_arguments,
    calibrate_thresholds,
    scale_estimated_from,
    settle,
    sparse_batches,
)

ROOT = Path(__file__).resolve().parents[1]
BASE_PACKAGE = "hsae_base"
NATIVE_LIBRARY = "hsae_native"
"""``hsae.model.native.NAME``: the fused kernels' extension and operator namespace."""
MODES = ("hsae", "independent")


def export_revision(revision: str, into: Path, root: Path = ROOT) -> Path:
    """The package of git ``revision`` as an importable ``hsae_base`` under ``into``."""
    done = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", revision, "src/hsae"],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise SystemExit(f"--base {revision}: git archive of src/hsae failed: {message}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+: refuse links out of ``into``
            archive.extractall(into, filter="data")
        else:
            archive.extractall(into)  # noqa: S202 (our own repository's archive)
    package = into / BASE_PACKAGE
    shutil.move(into / "src" / "hsae", package)
    rename_package(package, "hsae", BASE_PACKAGE)
    rename_native_library(package, NATIVE_LIBRARY, f"{BASE_PACKAGE}_native")
    return package


def rename_native_library(package: Path, old: str, new: str) -> None:
    """Give the package's fused C++ kernels (``model/native``, where the revision has them) the
    extension and operator namespace ``new``: torch registers one namespace once per process,
    and builds one extension name in one cache folder, so the two versions' kernels need
    different names to load side by side (the headers too: their declarations name the
    namespace the sources define)."""
    folder = package / "model" / "native"
    if not folder.is_dir():
        return
    pattern = re.compile(rf"\b{re.escape(old)}\b")
    for path in [*folder.glob("*.py"), *folder.glob("*.cpp"), *folder.glob("*.h")]:
        text = path.read_text(encoding="utf-8")
        path.write_text(pattern.sub(new, text), encoding="utf-8")


def rename_package(package: Path, old: str, new: str) -> None:
    """Rewrite the package's imports of ``old`` (``import old``, ``from old``, ``old.module``
    for its own modules) to ``new``; other text (file names such as ``old.safetensors``) stays."""
    modules = sorted(p.stem for p in package.iterdir() if p.suffix == ".py" or p.is_dir())
    patterns = [
        (re.compile(rf"\b(from|import)\s+{old}\b"), rf"\1 {new}"),
        (re.compile(rf"\b{old}\.({'|'.join(map(re.escape, modules))})\b"), rf"{new}.\1"),
    ]
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern, replacement in patterns:
            text = pattern.sub(replacement, text)
        path.write_text(text, encoding="utf-8")


def build_trainer(
    package: str, mode: str, args: argparse.Namespace, batches: list[torch.Tensor]
) -> Any:
    """``package``'s trainer of ``mode`` at steady state, set up as ``step_speed.make_trainer``."""
    config_module: ModuleType = importlib.import_module(f"{package}.config")
    trainer_module: ModuleType = importlib.import_module(f"{package}.training.trainer")
    fields = {
        "d_in": args.d,
        "level_sizes": args.sizes,
        "target_l0": args.target_l0,
        "train_tokens": args.batch * 100_000,
        "batch_size": args.batch,
        "mode": mode,
        "device": args.device,
        "update_interval": 99_999,
        "sparse_kernels": True,
        "autocast": "off",
        "compile": "off",
    }
    known = config_module.HSAEConfig.model_fields
    config = config_module.HSAEConfig(**{k: v for k, v in fields.items() if k in known})
    with scale_estimated_from(trainer_module, args.batch):
        trainer = trainer_module.Trainer(config, _cycle(batches))
        if not type(trainer.model).__module__.startswith(f"{package}."):
            raise SystemExit(
                f"{package}'s trainer built a model of {type(trainer.model).__module__}"
            )
        trainer.initialise()
    calibrate_thresholds(trainer, batches)
    if mode == "hsae":
        trainer.update_forest()
    settle(trainer, args.settle)
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    add_scale_arguments(parser, list(SCALES), "small")
    parser.add_argument("--rounds", type=int, default=16, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per trainer per round")
    parser.add_argument("--settle", type=int, help="controller steps before timing")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--instances",
        type=int,
        default=2,
        help="trainers per version and mode, built in the order A B B A (memory: at d = 2304 "
        "one instance of each is 2.6 GiB)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if (args.d is None) != (args.sizes is None):
        parser.error("--d and --sizes go together")
    scale = SCALES[args.scale]
    if args.d is None:
        args.d, args.sizes = scale["d"], scale["sizes"]
    if args.settle is None:
        args.settle = scale["settle"]
    for name in ("rounds", "steps", "batch", "instances"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="hsae-revision-ab-") as folder:
        export_revision(args.base, Path(folder))
        sys.path.insert(0, folder)
        batches = sparse_batches(args.d, N_BATCHES, args.batch)
        # Built in the order A B B A (a trainer built later tends to step a little faster).
        versions = [("base", BASE_PACKAGE), ("this", "hsae")]
        trainers = []
        for mode in MODES:
            for instance in range(args.instances):
                for version, package in versions[:: 1 if instance % 2 == 0 else -1]:
                    trainers.append((version, mode, build_trainer(package, mode, args, batches)))
        times: dict[tuple[str, str], list[float]] = {
            (version, mode): [] for mode in MODES for version, _ in versions
        }
        for _ in range(args.rounds):
            for version, mode, trainer in trainers:
                for _ in range(args.steps):
                    start = time.perf_counter()
                    trainer.train_step(exact_metrics=False)
                    times[(version, mode)].append(time.perf_counter() - start)
            trainers.reverse()  # ABBA: no version always runs right after the other
    median = {key: statistics.median(values) * 1e3 for key, values in times.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.d} "
        f"sizes={args.sizes} batch={args.batch}; {args.rounds} rounds of {args.steps} steps"
    )
    for (version, mode), value in median.items():
        label = f"{mode} ({'this checkout' if version == 'this' else args.base})"
        print(f"{label:>40}: {value:8.1f} ms/step")
    for version in ("base", "this"):
        ratio = median[(version, "hsae")] / median[(version, "independent")]
        name = "this checkout" if version == "this" else args.base
        print(f"HSAE cost / independent stack, {name}: {ratio:.3f}x")
    for mode in MODES:
        ratio = median[("this", mode)] / median[("base", mode)]
        print(f"this checkout over {args.base}, {mode} step time: {ratio:.3f}x")


if __name__ == "__main__":
    main()
