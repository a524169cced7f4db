"""The GPU path: training on CUDA gives the CPU's model up to TF32 rounding, with pinned,
non-blocking batch copies. Marked ``cuda`` and skipped on machines without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from hsae.config import HSAEConfig
from hsae.training import Trainer
from hsae.training.data import TensorBatches

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = {
    "d_in": 32,
    "level_sizes": [16, 32, 64],
    "target_l0": 4,
    "train_tokens": 128 * 60,
    "batch_size": 128,
    "update_interval": 20,
    "perturbation_rate": 0.2,
}


def data(d: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(80, d, generator=generator), dim=1)
    return (torch.rand(8000, 80, generator=generator) < 0.05).float() @ atoms * 4.0


def losses(device: str, autocast: str = "off") -> tuple[list[float], Trainer]:
    settings = CONFIG | {"device": device, "autocast": autocast}
    trainer = Trainer(HSAEConfig(**settings), TensorBatches(data(), 128, 2))
    trainer.initialise()
    seen = []
    while trainer.step < trainer.config.total_steps:
        seen.append(float(trainer.train_step().total.detach()))
    return seen, trainer


def test_cuda_training_follows_the_cpu_run() -> None:
    cpu, _ = losses("cpu")
    gpu, trainer = losses("cuda")
    assert trainer.model.levels[0].W_dec.device.type == "cuda"
    assert torch.backends.cuda.matmul.allow_tf32
    # The first steps agree to TF32 rounding; later ones may drift by threshold flips only.
    assert gpu[:5] == pytest.approx(cpu[:5], rel=1e-2)
    assert gpu[-1] == pytest.approx(cpu[-1], rel=0.1)


def test_bf16_autocast_on_cuda_is_the_default_and_trains_like_float32() -> None:
    plain, _ = losses("cuda", "off")
    bf16, trainer = losses("cuda", "auto")
    assert trainer.autocast
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert bf16[-1] == pytest.approx(plain[-1], rel=0.1)


def test_batches_are_copied_from_pinned_memory_without_blocking() -> None:
    trainer = Trainer(HSAEConfig(**(CONFIG | {"device": "cuda"})), TensorBatches(data(), 128, 2))
    trainer.initialise()
    batch = trainer._next_batch()
    assert batch.device.type == "cuda" and batch.dtype == torch.float32
    torch.cuda.synchronize()
    expected = next(TensorBatches(data(), 128, 2)).cuda() * trainer.model.activation_scale
    torch.testing.assert_close(batch, expected)


@pytest.mark.parametrize("kind", ["jumprelu", "topk", "batchtopk"])
def test_dense_loss_does_not_wait_for_the_gpu(kind: str) -> None:
    # The CUDA twin of tests/test_model.py's host-sync test: on the dense path the loss of
    # every level kind, forward and backward, makes no synchronising CUDA call (the ground for
    # capturing the step in a CUDA graph; docs/scale.md, "Measured on an H200").
    from hsae.model import HSAE
    from hsae.model.hierarchy_losses import sample_perturbation
    from hsae.model.hsae import LossWeights

    config = HSAEConfig(**(CONFIG | {"device": "cuda", "sparse_kernels": False, "level": kind}))
    model = HSAE(config).cuda()
    x = data()[:128].cuda()
    sizes = config.level_sizes
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for level in model.levels:
            level.initialise_from_data(x, config.target_l0)
        for index in range(len(sizes) - 1):
            links = torch.randint(0, sizes[index], (sizes[index + 1],), generator=generator)
            model.set_parents(index, links.cuda())
            model.sibling_pairs(index)  # once per forest, outside the step
    substituted = [
        sample_perturbation(model.parents(i), sizes[i], 0.3, generator)
        for i in range(len(sizes) - 1)
    ] + [torch.zeros(sizes[-1], dtype=torch.bool, device="cuda")]
    dead = [(torch.arange(n) % 5 == 0).cuda() for n in sizes]
    weights = LossWeights(torch.tensor([0.5, 0.7, 0.9], device="cuda"), rho=0.3, aux=1 / 32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.training_loss(x, weights, substituted, dead, exact_metrics=False)
        out.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(out.total) and out.constraint > 0


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_step_on_cuda_trains_like_the_eager_dense_step(mode: str) -> None:
    # HSAEConfig.compile on the GPU (Triton kernels; "reduce-overhead" replays CUDA graphs),
    # through two forest rebuilds, against the eager dense step in float32. At these tiny
    # sizes Triton 3.6 (torch 2.11) cannot build one fused reduction, so this also checks
    # that the step is compiled again without fusion and trains right.
    compiled_like_eager(mode, CONFIG)


def test_compiled_step_on_cuda_is_fused_at_realistic_sizes() -> None:
    # At sizes like the benchmark's the fused build succeeds (no fallback).
    sizes = {"d_in": 64, "level_sizes": [64, 128, 256, 512], "target_l0": 8}
    trainer = compiled_like_eager("reduce-overhead", CONFIG | sizes)
    assert trainer.compiled_loss is not None and trainer.compiled_loss.fused


def compiled_like_eager(mode: str, config: dict) -> Trainer:
    runs = []
    for compile in ("off", mode):
        settings = config | {
            "device": "cuda",
            "sparse_kernels": False,
            "compile": compile,
            "autocast": "off",  # float32 (TF32) both ways: bf16 rounding differs once fused
        }
        batches = TensorBatches(data(settings["d_in"]), 128, 2)
        trainer = Trainer(HSAEConfig(**settings), batches)
        trainer.initialise()
        seen = []
        while trainer.step < trainer.config.total_steps:
            seen.append(float(trainer.train_step(exact_metrics=trainer.step % 7 == 0).total))
        runs.append((seen, trainer))
    (eager, _), (compiled, trainer) = runs
    assert trainer.forest_updates == 2
    assert compiled[:5] == pytest.approx(eager[:5], rel=1e-3)
    assert compiled[-1] == pytest.approx(eager[-1], rel=0.1)
    return trainer
