"""Device names, checked before any work starts: "auto", "cpu", "cuda", "cuda:N", "mps"."""

from __future__ import annotations

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
