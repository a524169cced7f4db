"""The seam between data and training: the trainer only sees an iterator of [batch, d] tensors.

:class:`TensorBatches` draws shuffled batches from an in-memory tensor, epoch after epoch, with a
resumable position. Any other iterable of tensors (e.g. the activation cache's reader) works
too; :func:`as_batches` turns whatever the user passed into such an iterator.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class ResumableBatches(Protocol):
    """A batch iterator whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Tensor]: ...

    def __next__(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorBatches:
    """Shuffled batches of rows of ``data`` [N, d], reshuffled every epoch, never ending."""

    def __init__(self, data: Tensor, batch_size: int, seed: int = 0):
        if data.ndim != 2:
            raise ValueError(
                f"activations must be a [N, d_in] tensor, got shape {tuple(data.shape)}"
            )
        if data.shape[0] < batch_size:
            raise ValueError(
                f"activations hold {data.shape[0]} rows, fewer than one batch ({batch_size})"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.data.shape[0], generator=generator)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        if self.position + self.batch_size > self._order.numel():
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.data[rows]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


class RebatchedStream:
    """Re-cuts an iterable of [n_i, d] tensors into [batch_size, d] batches."""

    def __init__(self, source: Iterable[Tensor], batch_size: int):
        self.source = iter(source)
        self.batch_size = batch_size
        self._pending: list[Tensor] = []
        self._pending_rows = 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        while self._pending_rows < self.batch_size:
            chunk = next(self.source)
            if chunk.ndim != 2:
                raise ValueError(f"activation batches must be 2-D, got {tuple(chunk.shape)}")
            self._pending.append(chunk)
            self._pending_rows += chunk.shape[0]
        joined = torch.cat(self._pending)
        batch, rest = joined[: self.batch_size], joined[self.batch_size :]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        return batch


def as_batches(
    activations: Tensor | Iterable[Tensor], batch_size: int, seed: int
) -> Iterator[Tensor]:
    """An iterator of [batch_size, d] tensors from a tensor or an iterable of tensors."""
    if isinstance(activations, Tensor):
        return TensorBatches(activations, batch_size, seed)
    if isinstance(activations, ResumableBatches):
        return activations
    return RebatchedStream(activations, batch_size)
