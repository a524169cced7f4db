"""Soak: `hsae train` SIGKILLed at random moments (harvest, HSAE, baseline) and resumed with
`hsae train --resume` each time ends bitwise equal to an uninterrupted run, with no leftover
temporaries and no log step written twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsae.runs import Run

CONFIG = """\
harvest_tokens: 2048
context_length: 32
harvest_batch_size: 8
heldout_fraction: 0.15
eval_tokens: 256
splice_contexts: 0
checkpoint_every: 7
log_every: 5
device: cpu
seed: 3
hsae:
  level_sizes: [32, 64, 128]
  target_l0: 4
  train_tokens: 49152
  batch_size: 128
  update_interval: 16
"""
HARVEST_KILLS = 3  # during start-up, model load and harvest (the harvest restarts)
TRAIN_KILLS = 18  # spread over the two trainings
STEPS = 49152 // 128  # training steps of each model (train_tokens // batch_size above)
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _launch(folder: Path, config: Path) -> subprocess.Popen:
    if (folder / "run.json").is_file():
        args = ["--resume", str(folder)]
    else:  # killed before the run was recorded: start it again (same settings)
        args = [str(config), "--out", str(folder)]
    return subprocess.Popen(
        [sys.executable, "-m", "hsae.cli", "train", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _harvested(folder: Path) -> bool:
    manifest = folder / "activations" / "manifest.json"
    try:
        return json.loads(manifest.read_text())["status"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


def _kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``process`` after ``seconds`` unless it has ended; True if it was killed."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        return True
    assert process.returncode == 0, process.stderr.read()[-2000:] if process.stderr else ""
    return False


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()]


def _timings(folder: Path) -> dict[str, float]:
    try:
        return json.loads((folder / "timings.json").read_text())
    except (OSError, ValueError):
        return {}


def _trained_steps(folder: Path) -> int:
    """Steps logged so far by both trainings (a line being written counts when complete)."""
    total = 0
    for which in ("hsae", "baseline"):
        try:
            lines = (folder / "logs" / f"train_{which}.jsonl").read_text().splitlines()
        except OSError:
            continue
        steps = []
        for line in lines:
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                break
        total += max(steps, default=0)
    return total


@pytest.mark.slow
def test_random_sigkills_then_resume_end_bitwise_equal(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    reference, victim = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(
        [sys.executable, "-m", "hsae.cli", "train", str(config), "--out", str(reference)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    rng = random.Random(16)
    kills = 0
    stage_times = []  # timings.json after each launch of the killed run
    for _ in range(HARVEST_KILLS):  # the harvest is one shard here: each kill restarts it
        kills += _kill_after(_launch(victim, config), rng.uniform(0.3, 6.0))
        stage_times.append(_timings(victim))
    process = _launch(victim, config)  # let one launch finish the harvest, then kill it
    deadline = time.monotonic() + 300
    while not _harvested(victim) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kills += _kill_after(process, rng.uniform(0.0, 1.0))
    stage_times.append(_timings(victim))
    # Training kills are placed by progress, not by the clock, so that every machine gets all
    # of them: each launch trains a random number of steps (at least one checkpoint interval,
    # at most its share of what is left), then dies a random fraction of a second later.
    train_kills = 0
    while train_kills < TRAIN_KILLS:
        start = _trained_steps(victim)
        share = (2 * STEPS - start) // (TRAIN_KILLS - train_kills + 1)
        goal = start + rng.randint(8, max(9, share))
        process = _launch(victim, config)
        deadline = time.monotonic() + 300
        while process.poll() is None and _trained_steps(victim) < goal:
            assert time.monotonic() < deadline, "no training progress within 300 s"
            time.sleep(0.01)
        killed = _kill_after(process, rng.uniform(0.0, 0.2))
        stage_times.append(_timings(victim))
        if not killed:
            break  # it finished both trainings before the kill
        train_kills += 1
    kills += train_kills
    last = _launch(victim, config)
    assert last.wait(timeout=600) == 0, last.stderr.read()[-2000:] if last.stderr else ""
    stage_times.append(_timings(victim))
    assert kills >= 20

    runs = (reference, victim)
    for which in ("hsae", "baseline"):
        # Tensor by tensor, bit for bit (the files' bytes differ only in the order in which
        # safetensors writes the metadata entries, which varies between processes).
        tensors = load_file(victim / which / "hsae.safetensors")
        expected = load_file(reference / which / "hsae.safetensors")
        assert set(tensors) == set(expected)
        for name, tensor in expected.items():
            assert tensor.dtype == tensors[name].dtype and torch.equal(tensors[name], tensor), name
        assert _metadata(victim / which) == _metadata(reference / which)
        # The same settings; the recorded file checksum differs with the metadata order.
        configs = [json.loads((f / which / "hsae_config.json").read_text()) for f in runs]
        assert [c.pop("sha256", None) is not None for c in configs] in ([True] * 2, [False] * 2)
        assert configs[0] == configs[1]
        # Same steps, each once, with the same values: nothing was logged twice.
        log = victim / "logs" / f"train_{which}.jsonl"
        assert len(_steps(log)) == len(set(_steps(log)))
        assert log.read_text() == (reference / "logs" / f"train_{which}.jsonl").read_text()
    for shard in sorted((reference / "activations" / "shards").iterdir()):
        assert (victim / "activations" / "shards" / shard.name).read_bytes() == shard.read_bytes()

    metrics = [
        Run.open(folder).evaluate(splice=False, progress=False) for folder in (reference, victim)
    ]
    for name in ("hsae", "baseline"):
        assert metrics[0][name] == metrics[1][name]

    leftovers = [p for p in victim.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, f"temporaries left behind: {leftovers}"
    # Stage times add up over launches: a launch adds its share to what the killed ones
    # recorded, so no stage's total ever goes down from one launch to the next, and each
    # training, worked on by many launches, grew over several of them. (Not compared
    # with the uninterrupted run's seconds: those are another process's wall clock.)
    for stage in ("harvest", "train_hsae", "train_baseline"):
        seen = [t[stage] for t in stage_times if stage in t]
        assert seen and seen == sorted(seen), (stage, seen)
        if stage != "harvest":  # the harvest may have been done by a single launch
            assert len(set(seen)) > 2, (stage, seen)


def _metadata(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(folder / "hsae.safetensors", framework="pt") as handle:
        return handle.metadata()
