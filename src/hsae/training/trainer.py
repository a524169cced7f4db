"""The alternating optimisation loop (``hsae-method.md`` section 4).

Gradient steps run with the forest fixed; every ``update_interval`` steps the forest is rebuilt
with the parameters fixed. Each step: draw a batch, scale it, draw the parent/children
perturbation, take an Adam step on the loss, renormalise decoder rows, feed the sparsity
controller and the dead-feature counters. The baseline (``mode="independent"``) runs the same
loop without constraint, perturbation or rebuilds, and gets its forest post hoc at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hsae import distributed
from hsae.config import ConfigError, HSAEConfig
from hsae.devices import keep_freed_cpu_memory, parse_device
from hsae.errors import HSAEError
from hsae.model import HSAE, TrainingLoss
from hsae.model.forest import make_tracker
from hsae.model.hierarchy_losses import (
    BorrowedChildren,
    borrowed_capacity,
    borrowed_children,
    sample_perturbation,
)
from hsae.model.hsae import LossWeights
from hsae.training.checkpoint import (
    CheckpointError,
    TrainerState,
    load_checkpoint,
    restore_interrupted_swap,
    save_checkpoint,
)
from hsae.training.compiled import CompiledLoss
from hsae.training.data import ActivationDataError, as_batches, check_batch
from hsae.training.diagnose import non_finite_report
from hsae.training.parallel import DataParallel, rank_share
from hsae.training.schedule import warmup_cosine
from hsae.training.sparsity import AdaptiveSparsity

SCALE_ESTIMATION_TOKENS = 16_384


class PerturbationDraw(NamedTuple):
    """One step's parent/children perturbation."""

    substituted: list[Tensor]
    """Per level, [n_l] flags of the parents replaced by their children (the last: none)."""
    borrowed: list[BorrowedChildren] | None
    """Per perturbed level, the children standing in (for the dense path; None otherwise)."""


class NonFiniteLossError(HSAEError, RuntimeError):
    """Training produced NaN or inf; the message names the step."""


@dataclass
class StepLog:
    """What one logged step reports (plain floats, JSON-ready)."""

    step: int
    tokens: int
    loss: float
    lr: float
    mse: list[float]
    l0: list[float]
    variance_explained: list[float]
    sparsity_weight: list[float]
    constraint: float
    aux: float
    dead_fraction: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_device(name: str) -> torch.device:
    """The device of ``config.device``; a device this machine lacks is a ConfigError. In a
    multi-process run, "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK."""
    device = parse_device(name)
    if device.type == "cuda" and device.index is None and distributed.is_distributed():
        device = torch.device("cuda", distributed.local_rank())
    return device


def estimate_activation_scale(sample: Tensor) -> float:
    """Constant c with mean ||c x|| = sqrt(d) over ``sample`` [N, d]."""
    mean_norm = float(sample.float().norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ActivationDataError(
            "cannot estimate the activation scale: activations are all zero or not finite"
        )
    return math.sqrt(sample.shape[1]) / mean_norm


ADAM_STATE_LAYOUT = "contiguous"
"""Recorded in checkpoints whose Adam state of a transposed parameter (W_enc) is kept for its
contiguous alias (:func:`_contiguous_alias`), i.e. in [n, d]; older checkpoints hold it in the
parameter's [d, n] shape."""


def _contiguous_alias(param: Tensor) -> torch.nn.Parameter | None:
    """A contiguous parameter over the memory of ``param`` when that is a transposed matrix
    (W_enc: a [d, n] view of [n, d] rows), for the optimizer; None for every other parameter.

    torch's fused Adam copies a non-contiguous parameter, its gradient and its state to
    contiguous tensors and back on every step (5 ms of the d = 640 benchmark's step on two CPU
    threads). The update is elementwise, so stepping the transposed alias with the transposed
    gradient (a view, since autograd keeps gradients in the parameter's layout) is the same.
    """
    if param.dim() != 2 or param.is_contiguous() or not param.t().is_contiguous():
        return None
    return torch.nn.Parameter(param.detach().t())


def _match_state_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every loaded optimizer state tensor its parameter's memory layout.

    Checkpoints store state tensors contiguous, while Adam created them with ``zeros_like`` of
    the parameter; the fused kernel, which walks the tensors as flat memory, would then pair
    the wrong elements after a resume if the two differed.
    """
    for param, values in optimizer.state.items():
        for key, value in values.items():
            if (
                isinstance(value, Tensor)
                and value.shape == param.shape
                and value.stride() != param.stride()
            ):
                values[key] = torch.empty_like(param).copy_(value)


class Trainer:
    """Owns a model, its optimiser, schedule, controllers and data position for one run."""

    def __init__(
        self,
        config: HSAEConfig,
        batches: Iterator[Tensor],
        model: HSAE | None = None,
        initialise_from_data: bool = True,
    ):
        """``initialise_from_data=False`` keeps the given model's weights, thresholds and
        activation scale (e.g. SAEs imported from SAELens) instead of :meth:`initialise`.

        In a multi-process run (``torchrun``; :mod:`hsae.training.parallel`) ``batches``
        yields this process's share of each global batch of ``config.batch_size`` rows
        (:func:`hsae.training.parallel.rank_share`), and every process builds its trainer
        with the same config."""
        if model is None and not initialise_from_data:
            raise ValueError("initialise_from_data=False needs a model whose weights to keep")
        self.config = config
        self.device = resolve_device(config.device)
        self.parallel = DataParallel.current(self.device)
        if self.parallel is not None and config.batch_size % self.parallel.size:
            raise ConfigError(
                f"batch_size: {config.batch_size} is not divisible by the {self.parallel.size} "
                "training processes (each takes batch_size / processes rows a step)"
            )
        self.autocast = config.autocast == "bf16" or (
            config.autocast == "auto" and self.device.type == "cuda"
        )
        """Whether the loss's forward runs under bf16 autocast (config.autocast)."""
        if self.device.type == "cpu":
            keep_freed_cpu_memory()  # large temporaries reuse their pages (hsae.devices)
        if self.device.type == "cuda":
            # TF32 matmuls (float32 storage, 10-bit mantissa products) on Ampere and later.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.batches = batches
        self.model = (model or HSAE.class_for(config.mode)(config)).to(self.device)
        self.model.training_config = config
        self._compiled = (
            None
            if config.compile == "off"
            else CompiledLoss(self.model, config.compile, self.autocast, self.parallel)
        )
        """The loss under torch.compile (config.compile), or None for the eager loss."""
        groups = _parameter_groups(self.model, config)
        self._aliases: list[tuple[Tensor, torch.nn.Parameter]] = []
        """(model parameter, the contiguous alias the optimizer steps in its place)."""
        for group in groups:
            stepped = []
            for param in group["params"]:
                alias = _contiguous_alias(param)
                if alias is not None:
                    self._aliases.append((param, alias))
                stepped.append(param if alias is None else alias)
            group["params"] = stepped
        self.optimizer = torch.optim.Adam(
            groups,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            # One kernel per tensor instead of a dozen passes (7 ms against 10 ms a step of the
            # d = 640 benchmark on one CPU thread). It reads parameter, gradient and state as
            # flat memory, so their layouts must agree: autograd keeps gradients in the
            # parameter's layout, and _match_state_layouts restores a resumed state's. A
            # transposed W_enc is stepped through a contiguous alias (_contiguous_alias).
            fused=self.device.type in ("cpu", "cuda"),  # where torch has the kernel
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(step, config.total_steps, config.warmup_fraction),
        )
        self.sparsity = AdaptiveSparsity(
            config.n_levels,
            config.target_l0,
            config.initial_sparsity_weight(),
            config.l0_ema_momentum,
            config.l0_decay_rate,
            config.sparsity_adjust,
            config.adaptive_sparsity,
            self.device,
        )
        self._controlled = torch.tensor(
            [float(level.uses_sparsity_controller) for level in self.model.levels],
            device=self.device,
        )
        """1 for levels trained with lambda * L0 under the controller, 0 for TopK kinds."""
        self._controls_sparsity = bool(self._controlled.any())
        self.tokens_since_fired = [
            torch.zeros(size, dtype=torch.long, device=self.device) for size in config.level_sizes
        ]
        self.coactivation = make_tracker(
            config.similarity, config.level_sizes, config.coactivation_momentum, self.device
        )
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
        self.step = 0
        self.forest_updates = 0
        self.initialised = not initialise_from_data
        self._borrowed_sizes = [0] * (config.n_levels - 1)
        """The largest padded size of each level's borrowed children so far (they only grow)."""
        self._none_dead: bool | None = None
        """Known on the host (from the last step's check) that no feature is dead this step:
        the step then passes no dead masks. None when unknown (after a start or a resume; the
        next step reads it from the counters)."""
        self._borrowed_hint_at = -1
        """``forest_updates`` when ``_borrowed_sizes`` last took the forest's likely sizes."""
        self._replay: list[Tensor] = []
        self.tokens_drawn = 0
        self.last_checkpoint: tuple[Path, int] | None = None
        """(folder, step) of the last checkpoint written or resumed from."""

    # --- set-up -------------------------------------------------------------------------
    def initialise(self) -> None:
        """Scale estimate, b_dec at the data mean and thresholds from the first batches."""
        sample = self._initialisation_sample()
        scale = self.config.activation_scale or estimate_activation_scale(sample)
        self.model.activation_scale.fill_(scale)
        scaled = sample.to(self.device, torch.float32) * scale
        for level in self.model.levels:
            level.initialise_from_data(scaled, self.config.target_l0)
        self.initialised = True

    def _initialisation_sample(self) -> Tensor:
        # These batches are replayed afterwards, so the scale estimate costs no data. In a
        # multi-process run every process initialises from the same global batches.
        cfg = self.config
        needed = max(cfg.batch_size, min(SCALE_ESTIMATION_TOKENS, cfg.train_tokens // 20))
        processes = 1 if self.parallel is None else self.parallel.size
        batches, rows = [], 0
        while rows < needed:
            batch = self._draw()
            batches.append(batch)
            rows += batch.shape[0] * processes
        self._replay = batches
        if self.parallel is not None:
            return torch.cat(self.parallel.gather_batches(batches))
        return torch.cat(batches)

    def _next_batch(self) -> Tensor:
        batch = self._replay.pop(0) if self._replay else self._draw()
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # the copy below then overlaps with queued GPU work
        return batch.to(self.device, torch.float32, non_blocking=True) * self.model.activation_scale

    def _draw(self) -> Tensor:
        try:
            batch = next(self.batches)
        except StopIteration:
            raise ActivationDataError(
                f"the activation stream ran out after {self.tokens_drawn} tokens; "
                f"train_tokens asks for {self.config.train_tokens}"
            ) from None
        check_batch(batch, self.config.d_in)
        self.tokens_drawn += batch.shape[0] * (1 if self.parallel is None else self.parallel.size)
        return batch

    @property
    def compiled_loss(self) -> CompiledLoss | None:
        """The loss under torch.compile (``config.compile``), or None when the step is eager."""
        return self._compiled

    # --- one step ---------------------------------------------------------------------------
    def train_step(self, exact_metrics: bool = True) -> TrainingLoss:
        """One optimisation step. ``exact_metrics=False`` lets the reported MSE and variance
        explained be those of the perturbed reconstructions (cheaper; for unlogged steps)."""
        x = self._next_batch()
        draw = self._draw_perturbation()
        substituted = None if draw is None else draw.substituted
        borrowed = None if draw is None else draw.borrowed
        if self._none_dead is None:  # one read after a start or a resume (same on every rank)
            self._none_dead = not bool(self._may_be_dead(0))
        dead = None if self._none_dead else self._dead_masks()
        weights = LossWeights(self.sparsity.weights, self.config.rho, self.config.aux_coefficient)
        keep_active = self._tracks_coactivation_now()
        if self._compiled is not None:
            out = self._compiled(
                x, weights, substituted, dead, keep_active, exact_metrics, borrowed
            )
        else:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model.training_loss(
                    x,
                    weights,
                    substituted,
                    dead,
                    keep_active=keep_active,
                    exact_metrics=exact_metrics,
                    group=self.parallel,
                    borrowed=borrowed,
                )
        # The support-only step never reads a feature that does not fire, so a NaN in its
        # weights leaves the loss finite: logged steps also check every parameter. The same
        # read tells whether any feature can be dead at the next step (one sync for both).
        n_tokens = x.shape[0] * (1 if self.parallel is None else self.parallel.size)
        checks = torch.stack([torch.isfinite(out.total.detach()), self._may_be_dead(n_tokens)])
        finite, may_be_dead = checks.tolist()
        self._none_dead = not may_be_dead
        if not finite or (exact_metrics and not self._parameters_finite()):
            raise NonFiniteLossError(
                non_finite_report(self.step, x, out, self.model, self.last_checkpoint)
            )
        self.model.zero_grad(set_to_none=True)
        out.total.backward()
        if self.parallel is not None:
            out.l0, out.fired = self._reduce_step(out)
        for param, alias in self._aliases:
            alias.grad = None if param.grad is None else param.grad.t().contiguous()
        self.optimizer.step()
        for _, alias in self._aliases:
            alias.grad = None
        self.scheduler.step()
        self.model.normalise_decoders()
        if self._controls_sparsity:
            self.sparsity.update(out.l0)
        self._count_firing(out.fired, n_tokens)
        if self.coactivation is not None and out.active:
            self.coactivation.update(out.active)
        self.step += 1
        if self._forest_due():
            self.update_forest()
        return out

    def _parameters_finite(self) -> bool:
        finite = [torch.isfinite(p.detach()).all() for p in self.model.parameters()]
        return bool(torch.stack(finite).all())

    def _reduce_step(self, out: TrainingLoss) -> tuple[Tensor, list[Tensor]]:
        """Average gradients; the global batch's L0 and firing flags (one all-reduce)."""
        assert self.parallel is not None
        fired = [f.to(torch.float32) for f in out.fired]
        total_l0, *fired_counts = self.parallel.reduce_step(
            list(self.model.parameters()), [out.l0.detach(), *fired]
        )
        return total_l0 / self.parallel.size, [count > 0 for count in fired_counts]

    def _draw_perturbation(self) -> PerturbationDraw | None:
        """This step's substituted parents, drawn on the host (from a host copy of the forest,
        refreshed when it changes), with the children that stand in for them; None before the
        first forest or without a perturbation."""
        cfg = self.config
        if not cfg.uses_hierarchy_losses or cfg.perturbation_rate == 0 or self.forest_updates == 0:
            return None
        forest = [self.model.host_parents(level) for level in range(cfg.n_levels - 1)]
        draws = [
            sample_perturbation(
                links, size, cfg.perturbation_rate, self.generator,
                self.model.host_with_children(level),
            )
            for level, (links, size) in enumerate(zip(forest, cfg.level_sizes[:-1], strict=True))
        ]  # fmt: skip
        substituted = [draw.to(self.device, non_blocking=True) for draw in draws]
        substituted.append(torch.zeros(cfg.level_sizes[-1], dtype=torch.bool, device=self.device))
        borrowed = None
        if not cfg.sparse_kernels:  # the dense path picks the borrowed children's columns
            if self._borrowed_hint_at != self.forest_updates:
                # Start each level at the size its draws almost never exceed, so a compiled
                # step compiles once per forest rather than once per level as they grow.
                self._borrowed_hint_at = self.forest_updates
                self._borrowed_sizes = [
                    max(size, borrowed_capacity(links, n_parents, cfg.perturbation_rate))
                    for size, links, n_parents in zip(
                        self._borrowed_sizes, forest, cfg.level_sizes[:-1], strict=True
                    )
                ]
            borrowed = [
                borrowed_children(links, draw, self.device, at_least=capacity)
                for links, draw, capacity in zip(forest, draws, self._borrowed_sizes, strict=True)
            ]
            # Sizes only grow: a compiled step sees one shape once the draws settle.
            self._borrowed_sizes = [children.index.numel() for children in borrowed]
        return PerturbationDraw(substituted, borrowed)

    def _dead_masks(self) -> list[Tensor]:
        window = self.config.dead_window_tokens
        return [counter >= window for counter in self.tokens_since_fired]

    def _may_be_dead(self, n_tokens: int) -> Tensor:
        """Whether a feature may be dead at the next step: one whose count of tokens without
        firing reaches the window once this step's are added (whether it fired in this step
        or not, so every process, holding the same counters, gives the same answer). False
        only when none can be, and then the next step leaves out the dead-feature loss, which
        would be zero (on the dense path it is otherwise computed every step)."""
        if self.config.aux_coefficient == 0:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        window = self.config.dead_window_tokens - n_tokens
        return torch.stack([(counter >= window).any() for counter in self.tokens_since_fired]).any()

    def _count_firing(self, fired: list[Tensor], n_tokens: int) -> None:
        for counter, level_fired in zip(self.tokens_since_fired, fired, strict=True):
            counter.add_(n_tokens).masked_fill_(level_fired, 0)

    def _tracks_coactivation_now(self) -> bool:
        return self.coactivation is not None and self.step % self.config.coactivation_every == 0

    # --- forest ---------------------------------------------------------------------------
    def _forest_due(self) -> bool:
        cfg = self.config
        if not cfg.uses_hierarchy_losses:
            return False
        if cfg.tree == "fixed" and self.forest_updates > 0:
            return False
        since = self.step - cfg.first_rebuild_step
        due = since >= 0 and since % cfg.forest_update_interval == 0
        return due and self.step < cfg.total_steps

    def update_forest(self) -> None:
        cfg = self.config
        self._sync_statistics()
        links = self.model.build_forest(
            cfg.similarity,
            cfg.effective_quantile,
            2 if cfg.tree == "binary" else None,
            self.coactivation,
        )
        links = [link.to(self.device) for link in links]
        if self.parallel is not None:  # the same forest on every process, whatever rounding
            self.parallel.broadcast_(links)
        for level, level_links in enumerate(links):
            self.model.set_parents(level, level_links)
        self.forest_updates += 1

    def _sync_statistics(self) -> None:
        """Every process's co-firing EMAs become the global batch's (their mean: EMAs are
        linear in the batches, and every process tracks on the same steps)."""
        if self.parallel is None or self.coactivation is None:
            return
        tensors = list(self.coactivation.frequencies)
        tensors += list(getattr(self.coactivation, "rates", []))
        self.parallel.average_(tensors)

    # --- the loop -------------------------------------------------------------------------
    def fit(
        self,
        progress: bool = True,
        log_every: int = 50,
        on_log: Callable[[StepLog], None] | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 500,
    ) -> HSAE:
        """Train until ``config.total_steps``; checkpoint every ``checkpoint_every`` steps.

        In a multi-process run only process 0 shows progress, calls ``on_log`` and writes
        checkpoints (every process holds the same state)."""
        if not self.initialised:
            self.initialise()
        cfg = self.config
        main = self.parallel is None or self.parallel.is_main
        label = {"hsae": "HSAE", "independent": "baseline"}.get(cfg.mode, cfg.mode)
        bar = tqdm(
            total=cfg.total_steps,
            initial=self.step,
            disable=not (progress and main),
            desc=f"train {label}",
        )
        if self._compiled is not None:  # until the first log replaces it
            bar.set_postfix_str(f"compile {cfg.compile}: each kind of step compiles once, slowly")
        self.model.train()
        while self.step < cfg.total_steps:
            out = self.train_step(exact_metrics=self._log_due(self.step + 1, log_every))
            bar.update(1)
            if self._log_due(self.step, log_every):
                log = self.step_log(out)
                bar.set_postfix_str(_postfix(log))
                if on_log is not None and main:
                    on_log(log)
            if checkpoint_dir is not None and self._checkpoint_due(checkpoint_every):
                self._sync_statistics()  # a collective: every process, then process 0 writes
                if main:
                    save_checkpoint(self.state_dict(), checkpoint_dir)
                self.last_checkpoint = (Path(checkpoint_dir), self.step)
        bar.close()
        if not cfg.uses_hierarchy_losses:
            self.build_post_hoc_forest()
        self.model.eval()
        return self.model

    def _log_due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config.total_steps

    def _checkpoint_due(self, every: int) -> bool:
        # The batches drawn to initialise are replayed first; checkpoint once they are used.
        return not self._replay and (self.step % every == 0 or self.step == self.config.total_steps)

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Continue from a checkpoint written by :meth:`fit` (same config, same data). In a
        multi-process run every process calls it and loads the same checkpoint."""
        if self.parallel is not None:
            # Process 0 alone repairs a checkpoint swap a kill interrupted, then all read.
            if self.parallel.is_main:
                restore_interrupted_swap(Path(checkpoint_dir))
            distributed.barrier()
        state = load_checkpoint(checkpoint_dir, like=self.state_dict())
        try:
            self.load_state_dict(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            message = " ".join(str(error).split())
            raise CheckpointError(
                f"checkpoint {checkpoint_dir} does not fit this trainer: "
                f"{type(error).__name__}: {message}"
            ) from None
        self.last_checkpoint = (Path(checkpoint_dir), self.step)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> TrainerState:
        """Everything needed to continue bit-for-bit: tensors, optimizer, counters, position."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= self.sparsity.state_tensors()
        for level, counter in enumerate(self.tokens_since_fired):
            tensors[f"tokens_since_fired.{level}"] = counter
        if self.coactivation is not None:
            tensors |= self.coactivation.state_tensors()
        tensors["generator"] = self.generator.get_state()
        config = self.config.model_dump()
        config.pop("device", None)  # a run may resume on another device
        record = {
            "step": self.step,
            "forest_updates": self.forest_updates,
            "tokens_drawn": self.tokens_drawn,
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
            "config": config,
            "adam_state_layout": ADAM_STATE_LAYOUT,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        optional = frozenset({"sparsity.smoothed"})  # checkpoints before its introduction
        return TrainerState(tensors, self.optimizer.state_dict(), record, optional)

    def load_state_dict(self, state: TrainerState) -> None:
        """Restore what :meth:`state_dict` returned (e.g. read back by ``load_checkpoint``)."""
        tensors, record = state.tensors, state.record
        model_state = {
            k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")
        }
        self.model.load_state_dict(model_state)
        self._none_dead = None  # the counters change below: unknown until the next step reads them
        self.sparsity.load_state_tensors(tensors)
        for level, counter in enumerate(self.tokens_since_fired):
            counter.copy_(tensors[f"tokens_since_fired.{level}"])
        if self.coactivation is not None:
            self.coactivation.load_state_tensors(tensors)
        self.generator.set_state(tensors["generator"])
        self.optimizer.load_state_dict(state.optimizer)
        if record.get("adam_state_layout") != ADAM_STATE_LAYOUT:
            # Written before the aliases: the state of W_enc is in its [d, n] shape.
            for _, alias in self._aliases:
                values = self.optimizer.state.get(alias, {})
                for key, value in values.items():
                    if isinstance(value, Tensor) and value.dim() == 2:
                        values[key] = value.t().contiguous()
        _match_state_layouts(self.optimizer)
        self.scheduler.load_state_dict(record["scheduler"])
        if record.get("data") is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(record["data"])
        self.step = int(record["step"])
        self.forest_updates = int(record["forest_updates"])
        self.tokens_drawn = int(record["tokens_drawn"])
        self.initialised = True

    def build_post_hoc_forest(self) -> None:
        """The baseline's forest: the same similarity rule, applied once after training."""
        if self.config.n_levels > 1:
            self.update_forest()

    def step_log(self, out: TrainingLoss) -> StepLog:
        """The step's log line; in a multi-process run, the processes' mean of each value (a
        collective: every process calls it at the same steps). The global batch's L0 is
        exact, and so is variance explained (each share's tokens are centred on the global
        batch's mean)."""
        window = self.config.dead_window_tokens
        n_levels = self.config.n_levels
        values = torch.cat(
            [
                out.total.detach().reshape(1),
                out.mse.detach(),
                out.variance_explained.detach(),
                out.constraint.detach().reshape(1).to(out.mse.dtype),
                out.aux.detach().reshape(1).to(out.mse.dtype),
            ]
        )
        if self.parallel is not None:
            values = self.parallel.sum(values.float()) / self.parallel.size
        loss, mse, explained, rest = values.split([1, n_levels, n_levels, 2])
        return StepLog(
            step=self.step,
            tokens=self.step * self.config.batch_size,
            loss=float(loss[0]),
            lr=float(self.scheduler.get_last_lr()[0]),
            mse=mse.tolist(),
            l0=out.l0.tolist(),
            variance_explained=explained.tolist(),
            sparsity_weight=(self.sparsity.weights * self._controlled).tolist(),
            constraint=float(rest[0]),
            aux=float(rest[1]),
            dead_fraction=[float((c >= window).float().mean()) for c in self.tokens_since_fired],
        )


def _parameter_groups(model: HSAE, config: HSAEConfig) -> list[dict[str, Any]]:
    thresholds = [p for level in model.levels for p in level.threshold_parameters()]
    threshold_ids = {id(p) for p in thresholds}
    others = [p for p in model.parameters() if id(p) not in threshold_ids]
    return [
        {"params": others, "lr": config.lr},
        {"params": thresholds, "lr": config.lr * config.threshold_lr_multiplier},
    ]


def _postfix(log: StepLog) -> str:
    l0 = "/".join(f"{v:.0f}" for v in log.l0)
    fve = "/".join(f"{v:.2f}" for v in log.variance_explained)
    return f"loss={log.loss:.3g} L0={l0} FVE={fve}"


def train(
    config: HSAEConfig,
    activations: Tensor | Iterable[Tensor],
    progress: bool = True,
    on_log: Callable[[StepLog], None] | None = None,
) -> HSAE:
    """Train an HSAE (or, with ``mode="independent"``, the baseline) and return it.

    ``activations`` is a float tensor [N, d_in] of raw activations, drawn in shuffled order
    epoch after epoch until ``config.train_tokens`` tokens have been seen, or any iterable of
    [n, d_in] tensors. Under ``torchrun`` every process passes the same activations and takes
    its share of each global batch of ``config.batch_size`` rows (docs/scale.md).
    """
    if not isinstance(config, HSAEConfig):
        raise ConfigError(f"config must be an HSAEConfig, got {type(config).__name__}")
    batches = as_batches(activations, config.batch_size, config.seed, config.d_in)
    trainer = Trainer(config, rank_share(batches))
    return trainer.fit(progress=progress, on_log=on_log)
