"""The process group for multi-process runs started by ``torchrun`` (or any launcher that sets
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT): init and teardown, this process's rank, the
number of processes and a barrier. Without those variables everything answers as a single
process (rank 0 of 1) and nothing is initialised, so the same code runs with and without torchrun.

The backend is chosen automatically: ``nccl`` when CUDA is available, else ``gloo`` (CPU)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from hsae.errors import HSAEError

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(HSAEError, RuntimeError):
    """The torchrun environment is incomplete or the process group could not be set up."""


def launched() -> bool:
    """True when a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when a process group is initialised (after init())."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (LOCAL_RANK, set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by the torchrun variables; returns whether this is a
    multi-process run. A no-op (False) when WORLD_SIZE is unset or 1, or when already joined.
    With nccl, the process's CUDA device is set to LOCAL_RANK."""
    if is_distributed():
        return True
    if not launched():
        return False
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE > 1 but {', '.join(missing)} unset: start the processes with torchrun"
        )
    chosen = backend or default_backend()
    if chosen == "nccl":
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"cannot join the {chosen} process group: {exc}") from exc
    return True


def destroy() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective: every process must call it)."""
    if not is_distributed():
        return ok
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0 if ok else 1], device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
