"""Data-parallel training (gloo on the CPU, 2 processes under torchrun): the same model as one
process on the whole batch, forest and controller state included; SIGKILL of one process,
then resume, equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsae.config import HSAEConfig
from hsae.training import Trainer
from hsae.training.data import TensorBatches
from hsae.training.parallel import RankSlice

CONFIG = {
    "d_in": 16,
    "level_sizes": [8, 32, 256],
    "target_l0": 4,
    "train_tokens": 64 * 120,
    "batch_size": 64,
    "update_interval": 30,
    "similarity": "conditional",
    "perturbation_rate": 0.2,
    "dead_after_tokens": 192,
    "l0_ema_momentum": 0.9,
    "l0_decay_rate": 0.01,
    "device": "cpu",
}

SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import save_file
from hsae import distributed
from hsae.config import HSAEConfig
from hsae.training import Trainer
from hsae.training.data import TensorBatches
from hsae.training.parallel import rank_share

out, settings = sys.argv[1], json.loads(sys.argv[2])
distributed.init("nccl" if settings.get("device", "cpu").startswith("cuda") else "gloo")
with open(f"{out}/pid.{distributed.rank()}", "w") as pid_file:
    pid_file.write(str(os.getpid()))
generator = torch.Generator().manual_seed(0)
atoms = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=1)
data = (torch.rand(6000, 40, generator=generator) < 0.08).float() @ atoms * 3.0
config = HSAEConfig(**settings)
trainer = Trainer(config, rank_share(TensorBatches(data, config.batch_size, seed=1)))
checkpoint = out + "/checkpoint"
if os.path.isdir(checkpoint):
    trainer.resume(checkpoint)
    print("resumed at", trainer.step, flush=True)
trainer.fit(progress=False, log_every=5, on_log=lambda log: print("step", log.step, flush=True),
            checkpoint_dir=checkpoint, checkpoint_every=20)
state = trainer.state_dict().tensors
if distributed.rank() == 0:
    save_file({k: v for k, v in state.items() if k != "generator"}, out + "/final.safetensors")
distributed.barrier()
distributed.destroy()
print("done", flush=True)
"""


STEP_SCRIPT = """
import sys
import torch
from safetensors.torch import save_file
from hsae import distributed
from hsae.model import HSAE
from hsae.model.hsae import LossWeights
from hsae.training.parallel import DataParallel
sys.path.insert(0, sys.argv[2])
from test_parallel import one_step_inputs

distributed.init("gloo")
group = DataParallel(torch.device("cpu"))
saved = {}
for kind in ("jumprelu", "batchtopk", "matryoshka"):
    model, x, dead = one_step_inputs(kind)
    share = x.shape[0] // group.size
    out = model.training_loss(x[group.rank * share : (group.rank + 1) * share],
                              LossWeights(torch.full((3,), 0.1), 0.3, 1.0), None, dead,
                              group=group)
    out.total.backward()
    params = dict(model.named_parameters())
    total, aux = group.reduce_step(list(params.values()), [out.total.detach(), out.aux])
    saved |= {f"{kind}.{name}": p.grad.contiguous() for name, p in params.items()}
    saved |= {f"{kind}.total": total / group.size, f"{kind}.aux": aux / group.size}
if group.rank == 0:
    save_file(saved, sys.argv[1])
distributed.destroy()
"""


def one_step_inputs(kind: str) -> tuple:
    """A model with a forest (none for the Matryoshka baseline, which trains without one), a
    batch of 64 and a third of each level flagged dead."""
    from hsae.model import HSAE

    if kind == "matryoshka":
        config = HSAEConfig(**(CONFIG | {"level": "batchtopk", "mode": "matryoshka"}))
    else:
        config = HSAEConfig(**(CONFIG | {"level": kind}))
    model = HSAE.class_for(config.mode)(config)
    x = data()[:64] * 2.0
    for level in model.levels:
        level.initialise_from_data(x, config.target_l0)
    if kind != "matryoshka":
        model.set_parents(0, torch.arange(32) % 8)
        model.set_parents(1, torch.arange(256) % 32)
    dead = [torch.arange(size) % 3 == 0 for size in config.level_sizes]
    return model, x, dead


def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=1)
    return (torch.rand(6000, 40, generator=generator) < 0.08).float() @ atoms * 3.0


def single_process(settings: dict) -> dict[str, torch.Tensor]:
    trainer = Trainer(HSAEConfig(**settings), TensorBatches(data(), settings["batch_size"], 1))
    trainer.fit(progress=False)
    return {k: v for k, v in trainer.state_dict().tensors.items() if k != "generator"}


def launch(folder: Path, settings: dict) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder.parent / "train_script.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(folder), json.dumps(settings)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def assert_same_state(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(actual)
    for name, value in expected.items():
        if value.dtype in (torch.long, torch.int64, torch.bool):  # forest, counters, flags
            assert torch.equal(value, actual[name]), name
        else:
            torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("parallel") / "uninterrupted"
    process = launch(folder, CONFIG)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return load_file(folder / "final.safetensors")


def test_rank_slices_are_the_global_batch_in_order() -> None:
    rows = torch.arange(48.0).reshape(24, 2)
    shares = [next(RankSlice(TensorBatches(rows, 12, seed=3), r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(shares), next(TensorBatches(rows, 12, seed=3)))


def test_multi_process_train_needs_the_run_folder_named(tmp_path: Path) -> None:
    # Each process would otherwise pick its own time-stamped folder.
    env = os.environ | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "hsae", "train", "--no-baseline"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--out: a multi-process run needs the run folder named" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_one_step_gradients_of_two_shares_equal_the_global_batch(tmp_path: Path) -> None:
    """Loss terms that depend on the whole batch (BatchTopK's selection, the auxiliary
    loss's normalisation) are the global batch's: averaged gradients match exactly."""
    from hsae.model.hsae import LossWeights

    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(tmp_path / "grads.safetensors")]
    command += [str(Path(__file__).parent)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = load_file(tmp_path / "grads.safetensors")
    for kind in ("jumprelu", "batchtopk", "matryoshka"):
        model, x, dead = one_step_inputs(kind)
        out = model.training_loss(x, LossWeights(torch.full((3,), 0.1), 0.3, 1.0), None, dead)
        out.total.backward()
        assert float(out.aux) > 0
        torch.testing.assert_close(saved[f"{kind}.aux"], out.aux, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved[f"{kind}.total"], out.total.detach(), rtol=1e-5, atol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                saved[f"{kind}.{name}"], p.grad, rtol=1e-4, atol=1e-6, msg=f"{kind} {name}"
            )


def test_two_processes_equal_one_process_on_the_global_batch(two_process_run) -> None:
    expected = single_process(CONFIG)
    # The run exercised every global statistic: rebuilt forests, dead features, co-firing.
    assert int((expected["model.parents_0"] >= 0).sum()) > 0
    assert bool((expected["tokens_since_fired.2"] >= CONFIG["dead_after_tokens"]).any())
    assert float(expected["conditional.rate.0"].sum()) > 0
    assert_same_state(expected, two_process_run)


def test_two_processes_compiled_equal_one_eager_process(tmp_path: Path) -> None:
    # HSAEConfig.compile under torchrun: the collectives inside the loss (the global batch's
    # centring, the auxiliary loss's normalisation) are traced into the compiled graph, and
    # two compiled processes land where one eager process on the global batch does.
    settings = CONFIG | {
        "sparse_kernels": False,
        "compile": "default",
        "similarity": "decoder",
        "train_tokens": 64 * 45,
    }
    process = launch(tmp_path / "compiled", settings)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    expected = single_process(settings | {"compile": "off"})
    assert int((expected["model.parents_0"] >= 0).sum()) > 0
    assert_same_state(expected, load_file(tmp_path / "compiled" / "final.safetensors"))


@pytest.mark.slow
def test_two_processes_batchtopk_equal_one_process(tmp_path: Path) -> None:
    settings = CONFIG | {"level": "batchtopk", "similarity": "coactivation"}
    process = launch(tmp_path / "batchtopk", settings)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert_same_state(single_process(settings), load_file(tmp_path / "batchtopk/final.safetensors"))


@pytest.mark.slow
def test_sigkill_of_one_process_then_resume_equals_uninterrupted(
    tmp_path: Path, two_process_run
) -> None:
    folder = tmp_path / "killed"
    victim = launch(folder, CONFIG)
    assert victim.stdout is not None
    for line in victim.stdout:  # kill process 1 once a few checkpoints have been written
        if "step 70" in line:  # (the two processes' output may share a line)
            os.kill(int((folder / "pid.1").read_text()), signal.SIGKILL)
            break
    victim.communicate(timeout=300)
    assert victim.returncode != 0
    assert not (folder / "final.safetensors").exists()

    # The checkpoint does not depend on the number of processes: one process continues it
    # to the single-process run's model.
    alone = Trainer(HSAEConfig(**CONFIG), TensorBatches(data(), CONFIG["batch_size"], 1))
    alone.resume(folder / "checkpoint")
    assert alone.step == 60
    alone.fit(progress=False)
    state = {k: v for k, v in alone.state_dict().tensors.items() if k != "generator"}
    assert_same_state(single_process(CONFIG), state)

    resumed = launch(folder, CONFIG)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed at 60" in output
    assert_same_state(two_process_run, load_file(folder / "final.safetensors"))


@pytest.mark.slow
def test_torchrun_hsae_train_equals_the_single_process_run(small_run, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m hsae train --resume RUN`` on a copy of the small run's
    harvested activations trains both models as the single-process run did; process 0
    alone writes the logs, checkpoints and models."""
    import shutil

    import hsae

    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copytree(small_run.activations_dir, folder / "activations")
    shutil.copy(small_run.folder / "run.json", folder / "run.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "hsae", "train", "--resume", str(folder)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("trained models are in") == 1
    for which in ("hsae", "baseline"):
        expected = small_run.load(which).state_dict()
        actual = hsae.load(folder / which).state_dict()
        assert_same_state(expected, actual)
        logged = (folder / "logs" / f"train_{which}.jsonl").read_text().splitlines()
        reference = small_run.log_path(which).read_text().splitlines()
        assert [json.loads(line)["step"] for line in logged] == [
            json.loads(line)["step"] for line in reference
        ]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_nccl_equal_one_gpu(tmp_path: Path) -> None:
    """The same equivalence on GPUs (NCCL); TF32 matmuls, hence the looser tolerance."""
    settings = CONFIG | {"device": "cuda", "autocast": "off"}
    process = launch(tmp_path / "nccl", settings)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    actual = load_file(tmp_path / "nccl/final.safetensors")
    expected = single_process(settings)
    for name in ("model.levels.0.W_dec", "model.levels.2.W_enc", "sparsity.weights"):
        torch.testing.assert_close(actual[name], expected[name].cpu(), rtol=2e-2, atol=2e-3)
