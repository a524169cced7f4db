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


def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(80, 32, generator=generator), dim=1)
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
