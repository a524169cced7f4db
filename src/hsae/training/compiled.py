"""The training loss and its backward under ``torch.compile`` (``HSAEConfig.compile``).

On a GPU the eager step is bound by kernel launches: about a thousand small operations a
step for four levels, each launched from Python (docs/scale.md, "Measured on an H200").
Compiled, the dense path's elementwise work fuses into a few kernels, and with mode
"reduce-overhead" the whole forward and backward replay as CUDA graphs. This needs a step with
static shapes and nothing read back to the host, which the dense path
(``sparse_kernels: false``) of the JumpReLU levels is (``tests/test_model.py`` checks it has
no graph break). Two things are kept outside the compiled region:

* the forest's sibling pairs, computed once per forest and padded to a power of two
  (:meth:`hsae.model.hsae.HSAE.sibling_pairs`), so a forest rebuild recompiles only when their
  count crosses one;
* everything after the backward (Adam, the decoders' renormalisation, the controllers), which
  is a few dozen operations.

A step variant (before or after the first forest, logged or not, tracking co-activation or
not) compiles on first use; a run sees at most a handful.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hsae.errors import HSAEError
from hsae.model import HSAE, TrainingLoss
from hsae.model.hierarchy_losses import BorrowedChildren, SiblingPairs
from hsae.model.hsae import LossWeights
from hsae.model.level import BatchGroup

RECOMPILE_LIMIT = 64
"""Compiled variants torch keeps per function before falling back to eager (torch's default,
8, is within reach of the step's variants times a few sibling-pair sizes)."""

CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
"""The torch.compile modes that replay the step as CUDA graphs on a GPU."""


class CompileError(HSAEError, RuntimeError):
    """torch.compile could not build the training step (no C++ compiler for the CPU backend,
    no Triton for the GPU one, ...); the message says why and how to train without it."""


class CompiledLoss:
    """``model.training_loss`` compiled with ``mode``, under bf16 autocast when ``autocast``.

    Called like the eager loss (weights, perturbation draws, dead masks, flags); returns the
    same :class:`TrainingLoss`. Its ``total`` is to be backpropagated before the next call.
    """

    def __init__(self, model: HSAE, mode: str, autocast: bool, group: BatchGroup | None = None):
        if model.config.sparse_kernels:
            raise ValueError("a compiled loss needs the dense path (sparse_kernels false)")
        self.model = model
        self.autocast = autocast
        self.group = group
        self.cuda_graphs = mode in CUDA_GRAPH_MODES
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        self._compiled = torch.compile(
            self._loss, mode=None if mode == "default" else mode, dynamic=False
        )

    def __call__(
        self,
        x: Tensor,
        weights: LossWeights,
        substituted: list[Tensor] | None,
        dead: list[Tensor] | None,
        keep_active: bool = False,
        exact_metrics: bool = True,
        borrowed: list[BorrowedChildren] | None = None,
    ) -> TrainingLoss:
        model = self.model
        pairs = None
        if model.config.uses_hierarchy_losses:
            pairs = [model.sibling_pairs(level, padded=True) for level in range(model.n_levels - 1)]
        if self.cuda_graphs and x.device.type == "cuda":
            # The graphs' outputs live in memory the next replay overwrites: a new step begins.
            torch.compiler.cudagraph_mark_step_begin()
        try:
            total, mse, l0, explained, constraint, aux, fired, active = self._compiled(
                x, weights.sparsity, weights.rho, weights.aux, substituted, dead, pairs,
                borrowed, keep_active, exact_metrics,
            )  # fmt: skip
        except torch._dynamo.exc.BackendCompilerFailed as error:
            cause = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise CompileError(
                f"compile: torch.compile could not build the training step ({cause}); "
                "set compile: off to train without it"
            ) from None
        if self.cuda_graphs:
            # Copies of the small outputs, which a caller may read after the next step
            # (``active`` is used within this one).
            mse, l0, explained = mse.clone(), l0.clone(), explained.clone()
            constraint, aux = constraint.clone(), aux.clone()
            fired = tuple(flags.clone() for flags in fired)
        return TrainingLoss(
            total=total,
            mse=mse,
            l0=l0,
            variance_explained=explained,
            constraint=constraint,
            aux=aux,
            fired=list(fired),
            active=list(active),
        )

    def _loss(
        self,
        x: Tensor,
        sparsity: Tensor,
        rho: float,
        aux: float,
        substituted: list[Tensor] | None,
        dead: list[Tensor] | None,
        pairs: Sequence[SiblingPairs] | None,
        borrowed: Sequence[BorrowedChildren] | None,
        keep_active: bool,
        exact_metrics: bool,
    ) -> tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...], tuple[Tensor, ...]
    ]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.training_loss(
                x,
                LossWeights(sparsity, rho, aux),
                substituted,
                dead,
                keep_active=keep_active,
                exact_metrics=exact_metrics,
                group=self.group,
                pairs=pairs,
                borrowed=borrowed,
            )
        return (
            out.total,
            out.mse,
            out.l0,
            out.variance_explained,
            out.constraint,
            out.aux,
            tuple(out.fired),
            tuple(out.active),
        )
