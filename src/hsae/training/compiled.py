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

import warnings
from collections.abc import Sequence
from typing import Any

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

GRADIENT_TOLERANCE = 0.05
"""Largest relative (L2) difference between a parameter's compiled and eager gradients that
the first step of each compiled variant accepts (bf16 autocast rounds the two differently)."""

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
        self._checked: set[tuple[Any, ...]] = set()
        """The step variants whose compiled gradients were compared with the eager ones."""
        self.largest_gradient_difference: tuple[str, float] = ("", 0.0)
        """The parameter whose compiled gradient differed most from the eager one over the
        checked variants, and by how much (relative L2)."""
        self.mode = mode
        self.fused = True
        """False once the fused build failed and the step was compiled with fusion off."""
        self._compiled = torch.compile(
            self._loss, mode=None if mode == "default" else mode, dynamic=False
        )

    @property
    def variants_checked(self) -> int:
        """How many step variants were compiled and checked against the eager step so far."""
        return len(self._checked)

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
        arguments = (
            x, weights.sparsity, weights.rho, weights.aux, substituted, dead, pairs, borrowed,
            keep_active, exact_metrics,
        )  # fmt: skip
        variant = (
            substituted is None, dead is None, keep_active, exact_metrics, tuple(x.shape),
            tuple(p.first.numel() for p in pairs or ()),
            tuple(b.index.numel() for b in borrowed or ()),
        )  # fmt: skip
        if variant not in self._checked:
            self._check_gradients(arguments)
            self._checked.add(variant)
            if self.cuda_graphs and x.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
        total, mse, l0, explained, constraint, aux, fired, active = self._run(arguments)
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

    def _run(self, arguments: tuple[Any, ...]) -> tuple[Any, ...]:
        try:
            return self._compiled(*arguments)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            cause = _cause(error)
            if self.fused:
                # Triton 3.6 (torch 2.11) fails to build one fused reduction of the tiny GPU
                # test's sizes ("operand does not dominate this use"); unfused it builds.
                warnings.warn(
                    f"compile: torch.compile could not build the fused training step ({cause}); "
                    "compiling it again with kernel fusion off (slower; docs/scale.md)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.fused = False
                options = dict(torch._inductor.list_mode_options(self.mode))
                options["max_fusion_size"] = 1
                self._compiled = torch.compile(self._loss, options=options, dynamic=False)
                return self._run(arguments)
            raise CompileError(
                f"compile: torch.compile could not build the training step ({cause}); "
                "set compile: off to train without it"
            ) from None

    def _check_gradients(self, arguments: tuple[Any, ...]) -> None:
        """Compare the compiled step's gradients with the eager ones, once per variant.

        A compiler defect can give wrong gradients with the right loss (one of inductor's
        did, docs/scale.md): the first step of each variant of the step (compiled anew) is
        also taken eagerly, and a parameter whose gradient differs by more than
        ``GRADIENT_TOLERANCE`` (relative, L2) stops training with a :class:`CompileError`.
        The buffers a training forward updates (BatchTopK's running threshold) are restored,
        so the check leaves no trace."""
        parameters = dict(self.model.named_parameters())
        buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        eager_total = self._loss(*arguments)[0]  # the method itself runs eagerly
        expected = torch.autograd.grad(eager_total, list(parameters.values()), allow_unused=True)
        compiled_total = self._run(arguments)[0]
        got = torch.autograd.grad(compiled_total, list(parameters.values()), allow_unused=True)
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        for name, want, have in zip(parameters, expected, got, strict=True):
            if want is None or have is None:
                if (want is None) != (have is None):
                    raise CompileError(f"compile: {name} has a gradient in one step only")
                continue
            error = float(torch.linalg.vector_norm((have - want).float()))
            scale = float(torch.linalg.vector_norm(want.float()))
            relative = error / max(scale, 1e-12) if error > 1e-6 else 0.0
            if relative > self.largest_gradient_difference[1]:
                self.largest_gradient_difference = (name, relative)
            if error > GRADIENT_TOLERANCE * scale + 1e-6:
                raise CompileError(
                    f"compile: the compiled step's gradient of {name} differs from the eager "
                    f"one by {relative:.2g} (relative L2; tolerance "
                    f"{GRADIENT_TOLERANCE}): a compiler defect, set compile: off"
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


def _cause(error: Exception) -> str:
    """What failed, in one line: the compiler's own exception, and of its message the first
    line, or the last when the first only introduces a traceback (a compile worker's
    "An exception occurred in a subprocess:")."""
    inner = getattr(error, "inner_exception", None) or error
    lines = [line.strip() for line in str(inner).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Set TORCHDYNAMO_VERBOSE")]
    if not lines:
        return repr(inner)
    line = lines[-1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    name = type(inner).__name__
    return line if line.startswith(name) else f"{name}: {line}"
