"""Device names, checked before any work starts ("auto", "cpu", "cuda", "cuda:N", "mps"), and
the CPU memory settings of training processes (freed memory kept, huge pages)."""

from __future__ import annotations

import ctypes
import os
import platform

import torch

from hsae.errors import ConfigError

ALLOWED = "auto, cpu, cuda, cuda:N"


def device_problem(name: object, check_available: bool = True) -> str | None:
    """Why ``name`` cannot be used as a device here (None: it can). Without
    ``check_available`` only the spelling is checked (a saved GPU config stays readable)."""
    if not isinstance(name, str) or not name.strip():
        return f"expected a device name ({ALLOWED}), got {name!r}"
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"unknown device {name!r}; allowed: {ALLOWED}"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"unsupported device {name!r}; allowed: {ALLOWED}"
    if not check_available:
        return None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{name!r} asks for CUDA, but this machine has no usable CUDA GPU"
        if device.index is not None and device.index >= count:
            return (
                f"{name!r} asks for GPU {device.index}, but only {count} "
                f"{'is' if count == 1 else 'are'} available (cuda:0 .. cuda:{count - 1})"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{name!r} asks for MPS, which this machine lacks"
    return None


def parse_device(name: str, field: str = "device") -> torch.device:
    """The torch device ``name`` stands for ("auto": CUDA when available, else the CPU);
    a name torch cannot parse or a device this machine lacks is a :class:`ConfigError`
    naming ``field``."""
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"{field}: {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's own switch: its CPU allocator marks every block of 2 MB or more for transparent
huge pages (page-aligned, ``madvise(MADV_HUGEPAGE)``). Read once, at the process's first CPU
allocation."""
_HUGE_PAGE_BYTES = 2 << 20
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def request_cpu_huge_pages() -> None:
    """Ask PyTorch to put large CPU tensors on transparent huge pages, unless the environment
    already says (``THP_MEM_ALLOC_ENABLE=0`` keeps 4 KB pages).

    A training step reads decoder rows and activation rows all over tensors of hundreds of MB;
    on 4 KB pages nearly every such read misses the TLB, and how a process's pages happen to
    lie makes one run 10-30 % slower than the next. On huge pages (benchmarks/step_speed.py,
    2-core AMD EPYC, median of 3 processes each): d = 2304 steps 8-12 % shorter and the HSAE
    over its independent stack 1.02-1.07x instead of 0.81-1.17x; d = 640 some 9 % shorter.
    SAELens's step in the same process gains alike. The cost: the kernel backs such a block with
    whole 2 MB pages, so a process may hold up to 2 MB more per block (peak memory at d = 2304
    within about 10 % either way).

    PyTorch reads the switch at its first CPU allocation, so this runs when ``hsae`` is
    imported, before anything else of the package; a process that allocated tensors before
    importing ``hsae`` keeps 4 KB pages (:func:`cpu_huge_pages` tells). On a kernel with
    transparent huge pages "never", nothing changes.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def cpu_huge_pages() -> bool:
    """Whether large CPU tensors of this process go on transparent huge pages: whether a
    2 MB tensor's memory is marked for them (``madvise(MADV_HUGEPAGE)``: "hg" among its
    mapping's flags in ``/proc/self/smaps``) and the kernel allows them (mode "always" or
    "madvise"). False where either cannot be read (not Linux)."""
    try:
        with open(_THP_MODE_FILE, encoding="ascii") as modes:
            if "[never]" in modes.read():
                return False
        probe = torch.empty(_HUGE_PAGE_BYTES // 4, dtype=torch.float32)
        address = probe.data_ptr()
        inside = False
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    start, _, end = head.partition("-")
                    inside = int(start, 16) <= address < int(end, 16)
                elif inside and head == "VmFlags:":
                    return "hg" in line.split()[1:]
    except (OSError, ValueError):
        pass
    return False


KEEP_FREED_MEMORY_ENV = "HSAE_CPU_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept_freed_memory: bool | None = None


def keep_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the system.

    PyTorch's CPU tensors come from malloc, and glibc serves every block above 32 MiB with a
    fresh mmap that it unmaps on free, so each [features, d] temporary of a training step at
    the paper's width pays its page faults again, step after step (about 50 ms per 150 MB on
    the machine of benchmarks/step_speed.py). Serving every block from the heap and never
    trimming it lets the next step reuse the same pages: steps 35-45 % shorter at d = 2304 on
    CPU, no change at d = 640. The process then keeps its peak memory until it exits.

    Applied once per process, on Linux with glibc only (elsewhere, or when the environment
    variable ``HSAE_CPU_KEEP_FREED_MEMORY=0``, nothing changes). Returns whether it is in
    effect. The trainer calls it when it trains on the CPU.
    """
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(None)
                _kept_freed_memory = bool(
                    libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
                )
            except (OSError, AttributeError):
                pass
    return _kept_freed_memory
