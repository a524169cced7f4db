"""A training process killed with SIGKILL resumes to the same model as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

import hsae

SCRIPT = """
import sys, torch
from hsae.config import HSAEConfig
from hsae.training import Trainer
from hsae.training.data import TensorBatches

out = sys.argv[1]
generator = torch.Generator().manual_seed(0)
atoms = torch.nn.functional.normalize(torch.randn(60, 24, generator=generator), dim=1)
data = (torch.rand(20000, 60, generator=generator) < 0.06).float() @ atoms
config = HSAEConfig(d_in=24, level_sizes=[16, 32, 64], target_l0=4, train_tokens=128 * 400,
                    batch_size=128, update_interval=40, perturbation_rate=0.2)
trainer = Trainer(config, TensorBatches(data, 128, seed=5))
checkpoint = out + "/checkpoint"
import os
if os.path.isdir(checkpoint):
    trainer.resume(checkpoint)
    print("resumed at", trainer.step, flush=True)

def slow_log(log):
    print("step", log.step, flush=True)

model = trainer.fit(progress=False, log_every=10, on_log=slow_log,
                    checkpoint_dir=checkpoint, checkpoint_every=25)
model.save(out + "/model")
print("done", flush=True)
"""


def _run(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    reference = _run(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    victim = _run(tmp_path / "killed")
    assert victim.stdout is not None
    for line in victim.stdout:  # kill once a few checkpoints have been written
        if line.startswith("step 160"):
            os.kill(victim.pid, signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()

    resumed = _run(tmp_path / "killed")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed at 150" in output

    expected = hsae.load(tmp_path / "reference" / "model")
    actual = hsae.load(tmp_path / "killed" / "model")
    for (name, a), b in zip(
        expected.state_dict().items(), actual.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
