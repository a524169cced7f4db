"""Data-parallel training over the processes of a ``torchrun`` launch (docs/scale.md).

Every process holds the whole model and optimizer and trains on an equal share of each global
batch of ``batch_size`` rows (:class:`RankSlice`: process r takes the r-th contiguous block of
the batch the single-process run would draw). One step then equals the single-process step on
the global batch, up to float rounding:

* each process's loss is its part of the global loss (``HSAE.training_loss`` with
  ``group``), so the mean of the processes' gradients is the global gradient;
* gradients, the per-level batch L0 and the per-feature firing flags travel in one all-reduce
  per step (:meth:`DataParallel.reduce_step`), so the sparsity controller and the dead-feature
  counters see the global batch on every process;
* co-firing statistics are EMAs, linear in the batches, so each process tracks its own share
  and the shares are averaged before a forest rebuild or a checkpoint
  (:meth:`DataParallel.average_`); the rebuilt forest is broadcast from process 0;
* perturbation draws come from a generator seeded identically on every process.

The reductions use ``torch.distributed`` directly (not the ``DistributedDataParallel``
wrapper): the step's custom statistics share the gradients' one all-reduce, and there is no
``forward`` for the wrapper to hook (the loss is ``HSAE.training_loss``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hsae import distributed
from hsae.training.data import ActivationDataError


class DataParallel:
    """This process's place among the processes sharing each batch; a ``BatchGroup``."""

    def __init__(self, device: torch.device):
        if not distributed.is_distributed():
            raise RuntimeError("DataParallel needs an initialised process group")
        self.rank = distributed.rank()
        self.size = distributed.world_size()
        self.device = device
        self._flags: dict[tuple[bool, ...], Tensor] = {}
        """Device copies of "has a gradient" patterns (no host-to-device copy per step)."""

    @classmethod
    def current(cls, device: torch.device) -> DataParallel | None:
        """The running process group's, or None when this is a single-process run."""
        if distributed.world_size() > 1:
            return cls(device)
        return None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- BatchGroup ---------------------------------------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone().contiguous()
        dist.all_reduce(out)
        return out

    def min(self, tensor: Tensor) -> Tensor:
        out = tensor.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
        return out

    def gather(self, tensor: Tensor) -> Tensor:
        local = tensor.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.cat(parts)

    # --- the trainer's collectives ---------------------------------------------------------
    def gather_batches(self, batches: Sequence[Tensor]) -> list[Tensor]:
        """The global batches whose shares ``batches`` are (every process gets them all)."""
        return [self.gather(batch.to(self.device, torch.float32)) for batch in batches]

    def reduce_step(
        self, parameters: Sequence[torch.nn.Parameter], statistics: Sequence[Tensor]
    ) -> list[Tensor]:
        """Average the parameters' gradients over the processes and sum ``statistics``
        (float tensors), in one all-reduce. A parameter without a gradient on every process
        keeps none (as in a single-process step); returns the summed statistics."""
        pattern = tuple(p.grad is not None for p in parameters)
        if pattern not in self._flags:
            self._flags[pattern] = torch.tensor(pattern, dtype=torch.float32, device=self.device)
        has_grad = self._flags[pattern]
        pieces = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters
        ]
        pieces += [s.detach().reshape(-1).to(self.device, torch.float32) for s in statistics]
        flat = torch.cat([has_grad, *pieces])
        dist.all_reduce(flat)
        offset = len(parameters)
        flags = flat[:offset]
        with torch.no_grad():
            for index, p in enumerate(parameters):
                n = p.numel()
                mean = flat[offset : offset + n].view_as(p) / self.size
                offset += n
                if p.grad is not None:
                    p.grad.copy_(mean)
                elif bool(flags[index] > 0):
                    p.grad = torch.empty_like(p).copy_(mean)  # the parameter's layout (fused Adam)
        out = []
        for s in statistics:
            out.append(flat[offset : offset + s.numel()].view_as(s))
            offset += s.numel()
        return out

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over the processes (in place, one all-reduce)."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_(self, tensors: Sequence[Tensor], source: int = 0) -> None:
        """Give every process ``source``'s values of ``tensors`` (in place)."""
        for t in tensors:
            dist.broadcast(t, source)


class RankSlice:
    """This process's share of each global batch of ``source``: rows
    ``[rank * n / size, (rank + 1) * n / size)`` of every [n, d] batch, n divisible by size.

    The position is the source's (``state_dict`` passes through), so every process, drawing
    from an identically seeded source, stays at the same global batch."""

    def __init__(self, source: Iterator[Tensor], rank: int, size: int):
        self.source = source
        self.rank = rank
        self.size = size

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        batch = next(self.source)
        rows = batch.shape[0]
        if rows % self.size:
            raise ActivationDataError(
                f"a batch of {rows} rows cannot be split over {self.size} processes; "
                "batch_size must be a multiple of the number of processes"
            )
        share = rows // self.size
        return batch[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict[str, Any]:
        state = getattr(self.source, "state_dict", None)
        return state() if state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.source, "load_state_dict", None)
        if load is not None:
            load(state)


def rank_share(batches: Iterator[Tensor]) -> Iterator[Tensor]:
    """``batches`` (global batches) as this process's shares; unchanged in a single process."""
    if distributed.world_size() == 1:
        return batches
    return RankSlice(batches, distributed.rank(), distributed.world_size())
