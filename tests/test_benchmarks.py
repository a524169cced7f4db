"""The benchmark scripts run end to end on a tiny scale (they are not timed here: their figures
are measured by hand on a quiet machine and written in the README and the docs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--d", "32", "--sizes", "16", "32", "--batch", "64", "--target-l0", "4"]


def run(script: str, *arguments: str, stderr: list[str] | None = None) -> str:
    """The script's stdout (``stderr``: a list its stderr is appended to)."""
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if stderr is not None:
        stderr.append(done.stderr)
    return done.stdout


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_step_speed_times_every_contender_under_the_same_autocast(autocast: str) -> None:
    out = run(
        "step_speed.py", *TINY, "--steps", "1", "--rounds", "1", "--settle", "1",
        "--no-memory", "--dense-loop", "--autocast", autocast, "--threads", "1",
        "--instances", "2",
    )  # fmt: skip
    assert f"bf16 autocast={autocast == 'bf16'}" in out
    for name in ("hsae", "independent", "floor", "dense-pytorch"):
        assert f"{name}:" in out
    assert "HSAE cost / independent stack:" in out
    # Two trainers of each of ours, built A B B A, their steps pooled (2 against 1 each).
    built = [line.split()[0] for line in out.splitlines() if "L0 while timed" in line]
    assert built == ["hsae", "independent", "independent#2", "hsae#2"]
    assert "our trainers: 2 of each kind" in out and "median of 2 or 1 steps each" in out
    assert "hsae#2:" not in out


def test_step_speed_gives_the_median_of_several_processes() -> None:
    out = run(
        "step_speed.py", *TINY, "--steps", "1", "--rounds", "1", "--settle", "1",
        "--no-memory", "--threads", "1", "--processes", "2",
    )  # fmt: skip
    assert out.count("#### process") == 2
    summary = out.split("#### 2 processes")[1]
    line = next(x for x in summary.splitlines() if "HSAE cost over independent" in x)
    median = float(line.split("median")[1].split()[0])
    each = [float(v) for v in line.split("(")[1].rstrip(")").split(" / ")]
    assert len(each) == 2 and min(each) - 0.01 <= median <= max(each) + 0.01


def test_step_speed_times_the_compiled_trainers() -> None:
    out = run(
        "step_speed.py", *TINY, "--steps", "1", "--rounds", "1", "--settle", "1",
        "--no-memory", "--compile", "default", "--threads", "1",
    )  # fmt: skip
    for name in ("hsae-compiled", "independent-compiled"):
        assert f"{name}:" in out and f"{name} L0 while timed" in out
    assert "compiled (default): HSAE cost / independent stack:" in out
    if importlib.util.find_spec("sae_lens") is not None:
        assert "saelens-compiled:" in out and "over SAELens compiled alike" in out


def test_step_profile_counts_the_operations_of_both_modes() -> None:
    out = run("step_profile.py", *TINY, "--steps", "1", "--settle", "1", "--device", "cpu")
    assert out.count("aten ops dispatched") == 2
    counts = [int(line.split()[3]) for line in out.splitlines() if "dispatched" in line]
    assert all(count > 50 for count in counts), counts
    assert counts[0] > counts[1]  # the HSAE's constraint and perturbation add operations


def test_step_profile_counts_the_compiled_kernels() -> None:
    out = run(
        "step_profile.py", *TINY, "--steps", "1", "--settle", "1", "--device", "cpu",
        "--compile", "default", "--modes", "independent",
    )  # fmt: skip
    generated = [int(line.split()[2]) for line in out.splitlines() if "generated kernels" in line]
    dispatched = [int(line.split()[3]) for line in out.splitlines() if "dispatched" in line]
    assert len(generated) == 1 and generated[0] > 10
    assert len(dispatched) == 1 and dispatched[0] > 0


def test_revision_ab_steps_another_revision_beside_this_checkout() -> None:
    root = BENCHMARKS.parent
    if subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True
    ).returncode:
        pytest.skip("not a git checkout")
    errors: list[str] = []
    out = run(
        "revision_ab.py", "--base", "HEAD", *TINY, "--rounds", "2", "--steps", "1",
        "--settle", "1", "--threads", "1", stderr=errors,
    )  # fmt: skip
    for label in ("hsae (HEAD)", "hsae (this checkout)", "independent (HEAD)"):
        assert f"{label}:" in out
    # Both versions' fused kernels built (a base that silently falls back to the library
    # kernels is 10-20% slower, and the comparison means nothing).
    from hsae.model import native

    if native.enabled():
        assert "could not be built" not in errors[0], errors[0][-2000:]
    ratios = [
        float(line.rsplit(" ", 1)[1].rstrip("x"))
        for line in out.splitlines()
        if " over HEAD" in line
    ]
    assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios)


def test_revision_ab_renames_only_the_package_imports(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("revision_ab", BENCHMARKS / "revision_ab.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(BENCHMARKS))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    package = tmp_path / "pkg"
    (package / "model").mkdir(parents=True)
    (package / "io.py").write_text("X = 1\n")
    (package / "model" / "core.py").write_text(
        "from hsae.io import X\nimport hsae.model\nimport hsaeish\n"
        "NAME = 'hsae.safetensors'\nY = hsae.model.core\n"
    )
    module.rename_package(package, "hsae", "hsae_base")
    assert (package / "model" / "core.py").read_text() == (
        "from hsae_base.io import X\nimport hsae_base.model\nimport hsaeish\n"
        "NAME = 'hsae.safetensors'\nY = hsae_base.model.core\n"
    )
    # The fused kernels' extension and operator namespace get the base's own name.
    (package / "model" / "native").mkdir()
    (package / "model" / "native" / "__init__.py").write_text('NAME = "hsae_native"\n')
    (package / "model" / "native" / "k.cpp").write_text(
        "TORCH_LIBRARY(hsae_native, m) {}\nint hsae_native_count;\n"
    )
    (package / "model" / "native" / "k.h").write_text("namespace hsae_native {}\n")
    module.rename_native_library(package, "hsae_native", "hsae_base_native")
    assert (package / "model" / "native" / "__init__.py").read_text() == (
        'NAME = "hsae_base_native"\n'
    )
    assert (package / "model" / "native" / "k.cpp").read_text() == (
        "TORCH_LIBRARY(hsae_base_native, m) {}\nint hsae_native_count;\n"
    )
    assert (package / "model" / "native" / "k.h").read_text() == "namespace hsae_base_native {}\n"


def test_step_speed_starts_every_level_at_its_target_l0_on_the_timed_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The thresholds are calibrated on all the batches the timed steps cycle through, so that
    the steps are timed at the target sparsity (issue 13: a settled controller)."""
    import argparse

    import torch

    import hsae.training.trainer as trainer_module

    # make_trainer lowers this module global for its own initialisation only: were it left
    # lowered, every later in-process trainer would estimate its scale from fewer tokens (it
    # once made test_parallel's one-process reference differ from its torchrun runs).
    default = trainer_module.SCALE_ESTIMATION_TOKENS
    monkeypatch.setattr(trainer_module, "SCALE_ESTIMATION_TOKENS", default)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_speed

    args = argparse.Namespace(
        d=48, sizes=[32, 128], batch=256, target_l0=8, device="cpu", dense_kernels=False,
        autocast="off",
    )  # fmt: skip
    batches = step_speed.sparse_batches(args.d, step_speed.N_BATCHES, args.batch)
    trainer = step_speed.make_trainer(args, "independent", batches)
    assert default == trainer_module.SCALE_ESTIMATION_TOKENS
    x = torch.cat(batches) * trainer.model.activation_scale
    with torch.no_grad():
        for level in trainer.model.levels:
            l0 = (level.pre_activations(x) > level.threshold).sum(1).float().mean().item()
            assert abs(l0 - args.target_l0) <= 0.05 * args.target_l0, (level.n_features, l0)


@pytest.mark.parametrize("kind", ["hsae", "independent"])
def test_step_speed_memory_probe_counts_parameters_gradients_and_adam_state(kind: str) -> None:
    """The probe's tensor peak on CPU counts from before the model is built: the parameters,
    their gradients and Adam's two moments are all live after a backward, so the peak is at
    least four times the parameters' bytes, and the step's temporaries (a few [64, 1536]
    tensors here) add little to it."""
    d, sizes, batch = 256, [512, 1024], 64
    out = run(
        "step_speed.py", "--memory-probe", kind, "--d", str(d), "--sizes", *map(str, sizes),
        "--batch", str(batch), "--target-l0", "8", "--device", "cpu", "--autocast", "off",
        "--threads", "1",
    )  # fmt: skip
    peak = json.loads(out.strip().splitlines()[-1])
    weights_mb = 2 * sum(sizes) * d * 4 / 2**20  # W_enc and W_dec, float32
    assert 4 * weights_mb <= peak["peak_mb"] <= 4 * weights_mb + 4, (peak, weights_mb)
    assert peak["rss_mb"] > 0
