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

from hsae.errors import HSAEError


class ActivationDataError(HSAEError, ValueError):
    """Activations given to training have the wrong shape, width or type."""


def check_batch(batch: object, width: int | None, what: str = "activation batch") -> Tensor:
    """``batch`` itself when it is a 2-D floating-point tensor [n, width]; else a one-line
    :class:`ActivationDataError` saying what was expected."""
    expected = f"[N, {width}]" if width is not None else "[N, d_in]"
    if not isinstance(batch, Tensor):
        raise ActivationDataError(
            f"{what} is a {type(batch).__name__}; expected a float tensor {expected}"
        )
    if batch.ndim != 2 or (width is not None and batch.shape[1] != width):
        raise ActivationDataError(
            f"{what} has shape {list(batch.shape)}; expected {expected}"
            + (" (d_in of the config)" if width is not None else "")
        )
    if not batch.is_floating_point():
        raise ActivationDataError(
            f"{what} has dtype {str(batch.dtype).removeprefix('torch.')}; expected floating "
            "point (float32, float16 or bfloat16)"
        )
    return batch


@runtime_checkable
class ResumableBatches(Protocol):
    """A batch iterator whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Tensor]: ...

    def __next__(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TensorBatches:
    """Shuffled batches of rows of ``data`` [N, d], reshuffled every epoch, never ending."""

    def __init__(self, data: Tensor, batch_size: int, seed: int = 0, width: int | None = None):
        check_batch(data, width, "activations")
        if data.shape[0] < batch_size:
            raise ActivationDataError(
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

    def __init__(self, source: Iterable[Tensor], batch_size: int, width: int | None = None):
        self.source = iter(source)
        self.batch_size = batch_size
        self.width = width
        self._chunks = 0
        self._pending: list[Tensor] = []
        self._pending_rows = 0

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        while self._pending_rows < self.batch_size:
            chunk = check_batch(
                next(self.source), self.width, f"activation batch {self._chunks} of the iterable"
            )
            self._chunks += 1
            self._pending.append(chunk)
            self._pending_rows += chunk.shape[0]
        joined = torch.cat(self._pending)
        batch, rest = joined[: self.batch_size], joined[self.batch_size :]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        return batch


def as_batches(
    activations: Tensor | Iterable[Tensor], batch_size: int, seed: int, width: int | None = None
) -> Iterator[Tensor]:
    """An iterator of [batch_size, d] tensors from a tensor or an iterable of tensors;
    ``width``: the d every tensor must have (checked as the tensors arrive)."""
    if isinstance(activations, Tensor):
        return TensorBatches(activations, batch_size, seed, width)
    if isinstance(activations, ResumableBatches):
        return activations
    if isinstance(activations, (str, bytes)) or not isinstance(activations, Iterable):
        raise ActivationDataError(
            f"activations must be a float tensor [N, d_in] or an iterable of such tensors, "
            f"got {type(activations).__name__}"
        )
    return RebatchedStream(activations, batch_size, width)
