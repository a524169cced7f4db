"""Device names and the CPU memory setting of training processes (hsae.devices)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from hsae.devices import KEEP_FREED_MEMORY_ENV, device_problem, parse_device
from hsae.errors import ConfigError

PROBE = (
    "from hsae.devices import keep_freed_cpu_memory as keep; "
    "first = keep(); print(first, keep() is first)"
)


def _probe(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop(KEEP_FREED_MEMORY_ENV, None)
    if env_value is not None:
        env[KEEP_FREED_MEMORY_ENV] = env_value
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_cpu_malloc_keeps_freed_memory_once_per_process_unless_switched_off() -> None:
    assert _probe(None) == "True True"
    assert _probe("0") == "False True"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_a_cpu_trainer_applies_the_memory_setting() -> None:
    code = (
        "import torch, hsae.devices as d; from hsae import HSAEConfig; "
        "from hsae.training import Trainer; before = d._kept_freed_memory; "
        "c = HSAEConfig(d_in=8, level_sizes=[4, 8], target_l0=2, train_tokens=640, "
        "batch_size=64); Trainer(c, iter([torch.randn(64, 8)] * 20)); "
        "print(before, d._kept_freed_memory)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "True"]


def test_device_names_are_checked_with_the_field_named() -> None:
    assert device_problem("cpu") is None
    assert "unknown device" in str(device_problem("tpu:0"))
    with pytest.raises(ConfigError, match="^device: "):
        parse_device("cuda:99" if torch.cuda.is_available() else "cuda")
