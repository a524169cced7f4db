"""Device names and the CPU memory setting of training processes (hsae.devices)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from hsae.devices import HUGE_PAGES_ENV, KEEP_FREED_MEMORY_ENV, device_problem, parse_device
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


def _kernel_allows_huge_pages() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as modes:
            return "[never]" not in modes.read()
    except OSError:
        return False


def _huge_pages_probe(code: str, env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop(HUGE_PAGES_ENV, None)
    if env_value is not None:
        env[HUGE_PAGES_ENV] = env_value
    probe = f"{code}; from hsae.devices import cpu_huge_pages; print(cpu_huge_pages())"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(not _kernel_allows_huge_pages(), reason="no transparent huge pages here")
def test_importing_hsae_puts_large_cpu_tensors_on_huge_pages_unless_switched_off() -> None:
    assert _huge_pages_probe("import torch, hsae", None) == "True"
    assert _huge_pages_probe("import hsae.cli", None) == "True"  # the command line's process
    assert _huge_pages_probe("import hsae", "0") == "False"  # the user's setting wins
    # PyTorch reads its switch at its first allocation: a process that allocated before
    # importing hsae keeps 4 KB pages, and the probe says so.
    assert _huge_pages_probe("import torch; torch.ones(10**6); import hsae", None) == "False"


def test_device_names_are_checked_with_the_field_named() -> None:
    assert device_problem("cpu") is None
    assert "unknown device" in str(device_problem("tpu:0"))
    with pytest.raises(ConfigError, match="^device: "):
        parse_device("cuda:99" if torch.cuda.is_available() else "cuda")
