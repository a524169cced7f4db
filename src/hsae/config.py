"""Validated settings of an HSAE run: the one place every hyper-parameter is declared and checked.

:class:`ArchitectureConfig` is what a model is and travels with it when saved;
:class:`HSAEConfig` extends it with how the model is trained (the trainer's settings), as
sparsify nests its coder config inside its training config.

Defaults follow ``hsae-method.md`` (the paper's values) unless a comment says otherwise.
A bad value is refused before any work starts with a single message that names the field and
the allowed range (:class:`ConfigError`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hsae.errors import ConfigError

Similarity = Literal["encoder", "decoder", "coactivation", "conditional", "hybrid"]
TreeVariant = Literal["partial", "full", "binary", "fixed"]
Autocast = Literal["auto", "bf16", "off"]
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


class _Settings(BaseModel):
    """Validated settings: a bad value raises one :class:`ConfigError` naming the field."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_format_validation_error(error)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool(cls, value, info)


class ArchitectureConfig(_Settings):
    """What an HSAE *is*: the settings that travel with a saved model.

    Sizes: ``d_in`` is the activation width, ``level_sizes`` the dictionary size of each level,
    strictly increasing. How the model is trained (loss weights, forest schedule, controller,
    optimiser, device) lives in :class:`HSAEConfig`, which extends this class.
    """

    d_in: int
    """Width of the activations (the LLM's d_model)."""
    level_sizes: list[int] = [2048, 4096, 8192, 16384]
    """Dictionary size of each level, strictly increasing (paper: 2048 ... 16384)."""
    mode: str = "hsae"
    """"hsae", or a baseline: "independent" (the same levels trained without constraint or
    perturbation, forest post hoc) or "matryoshka" (one BatchTopK dictionary trained on nested
    prefixes at the level sizes; needs level "batchtopk"). Baselines are registered in
    hsae.layout.BASELINES."""
    level: str = "jumprelu"
    """Architecture of every level (docs/method.md, "Level kinds"): "jumprelu" (learned
    per-feature thresholds, lambda * L0 steered to target_l0 by the sparsity controller),
    "topk" (each token keeps its k = round(target_l0) largest activations; no penalty, no
    controller) or "batchtopk" (the batch keeps its k x batch largest, k = target_l0 per token
    on average; inference uses a learned threshold). Kinds are registered in
    hsae.model.levels.LEVEL_KINDS."""
    target_l0: float = 50.0
    """L0 every level aims at (at most the smallest level size): the sparsity controller's
    target for "jumprelu" levels, k = round(target_l0) for "topk", the mean k for "batchtopk"."""
    bandwidth: float = 0.3
    """Width eps of the rectangle kernel of the JumpReLU straight-through estimator, in the
    units of the scaled activations (mean norm sqrt(d_in), so active latents are O(1-10)).
    The constraint can switch a parent on only through this band (docs/synthetic.md)."""
    similarity: Similarity = "decoder"
    """Forest similarity: "encoder" cosine, "decoder" cosine or "coactivation" frequency.
    The paper uses encoder cosine and found the three comparable; decoder cosine gave both
    HSAE and baseline far better P(parent given child) on the synthetic benchmark. Our option
    "conditional": P(parent fires | child fires) - P(parent fires), and "hybrid": decoder cosine
    times P(parent fires | child fires), both from firing EMAs tracked during training
    (``hsae.model.forest.ConditionalTracker``; docs/synthetic.md)."""
    sparse_kernels: bool = True
    """Use the sparsity-exploiting decoder/backward path (same maths as the dense reference)."""

    @field_validator("d_in")
    @classmethod
    def _positive_width(cls, value: int) -> int:
        return _positive_int(value)

    @field_validator("level_sizes")
    @classmethod
    def _increasing_sizes(cls, sizes: list[int]) -> list[int]:
        if not sizes:
            raise ValueError("needs at least one level")
        if any(size < 1 for size in sizes):
            raise ValueError(f"every size must be >= 1, got {sizes}")
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError(f"sizes must be strictly increasing, got {sizes}")
        return sizes

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        from hsae.layout import BASELINES

        modes = ("hsae", *BASELINES)
        if value not in modes:
            choices = ", ".join(repr(name) for name in modes)
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value

    @field_validator("level")
    @classmethod
    def _known_level_kind(cls, value: str) -> str:
        from hsae.model.levels import LEVEL_KINDS  # the registry; imported when first checked

        if value not in LEVEL_KINDS:
            choices = ", ".join(repr(name) for name in LEVEL_KINDS)
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value

    @field_validator("bandwidth", "target_l0")
    @classmethod
    def _positive_model_value(cls, value: float) -> float:
        return _strictly_positive(value)

    @model_validator(mode="after")
    def _target_fits(self) -> ArchitectureConfig:
        smallest = self.level_sizes[0]
        if self.target_l0 > smallest:
            raise ValueError(
                f"target_l0 = {self.target_l0} exceeds the smallest level size {smallest}; "
                f"allowed range is (0, {smallest}]"
            )
        return self

    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def uses_hierarchy_losses(self) -> bool:
        """Whether levels are linked during training (an HSAE of two levels or more)."""
        return self.mode == "hsae" and self.n_levels > 1

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class HSAEConfig(ArchitectureConfig):
    """Every setting of an HSAE (or independent-baseline) training run: the architecture
    (:class:`ArchitectureConfig`, saved with the model) plus how it is trained.

    Training length is ``train_tokens`` drawn in batches of ``batch_size``.
    """

    # --- loss -----------------------------------------------------------------------------
    rho: float = 0.3
    """Weight of the parent-children constraint (>= 0). Paper: 0.01 over ~100k steps; short
    runs need more weight to shape the features in time (docs/synthetic.md)."""
    perturbation_rate: float = 0.05
    """r: probability that a parent is replaced by its children in its level's reconstruction."""
    aux_coefficient: float = 1.0 / 32.0
    """Weight of the auxiliary loss that revives dead features (0 disables it)."""
    dead_after_tokens: int | None = None
    """A feature that has not fired for this many tokens counts as dead (None: train_tokens/10)."""

    # --- forest -----------------------------------------------------------------------------
    tree: TreeVariant = "partial"
    """"partial" (quantile filter), "full" (no filter), "binary" (<= 2 children), "fixed"."""
    unassigned_quantile: float = 0.2
    """q: share of children with the weakest best similarity left without a parent."""
    update_interval: int | None = None
    """Steps between forest rebuilds (paper: 5000). None: a twentieth of the run. Must be
    less than the run's steps, or an HSAE would never build its forest."""
    forest_warmup: float = 0.0
    """Share of the run, in [0, 1), trained before the first forest rebuild, which then comes at
    step max(update_interval, forest_warmup x steps) and the later ones every update_interval
    steps. 0 (the paper): the first rebuild after update_interval steps. Before the first
    rebuild no link exists, so the constraint and the perturbation do nothing and the levels
    learn as independent SAEs: a longer warm-up lets them settle first (our option)."""
    coactivation_every: int = 10
    """With a similarity read from firing rates ('coactivation', 'conditional', 'hybrid'),
    update the firing EMAs every this many steps."""
    coactivation_momentum: float = 0.99
    """Momentum of the co-firing EMA."""

    # --- sparsity controller ------------------------------------------------------------------
    adaptive_sparsity: bool = True
    """Steer lambda per level to reach target_l0 (off: lambda stays at sparsity_init)."""
    sparsity_init: float | None = None
    """Initial sparsity weight lambda per level (None: chosen from d_in and target_l0)."""
    l0_ema_momentum: float = 0.999
    """Momentum of the L0 EMA the controller watches."""
    l0_decay_rate: float = 0.001
    """eta of the desired trajectory dL0 = -eta (L0 - target), per step."""
    sparsity_adjust: float = 0.03
    """Largest change of log lambda in one step (lambda moves by at most about 3% a step)."""

    # --- optimisation ----------------------------------------------------------------------
    train_tokens: int = 100_000_000
    """Tokens to train on (steps = train_tokens // batch_size)."""
    batch_size: int = 1024
    """Tokens per optimisation step."""
    lr: float = 3e-4
    """Adam learning rate (peak of the warm-up + cosine schedule)."""
    adam_beta1: float = 0.0
    """Adam beta1."""
    adam_beta2: float = 0.995
    """Adam beta2."""
    threshold_lr_multiplier: float = 30.0
    """The log-thresholds' learning rate is lr times this. Adam moves log(theta) by about lr
    per step whatever the gradient's size, so at lr=3e-4 a threshold could change by only
    0.03% a step; the multiplier lets thresholds follow the sparsity weight within short runs."""
    warmup_fraction: float = 0.1
    """Share of the steps spent in linear learning-rate warm-up."""
    activation_scale: float | None = None
    """Constant c multiplying raw activations so their mean norm is sqrt(d_in); None: estimate."""
    seed: int = 0
    """Seed of initialisation, data order and perturbation draws."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:N"."""
    autocast: Autocast = "auto"
    """bf16 autocast of the training step's matmuls: "auto" on CUDA only, "bf16" on any
    device, "off" never. Parameters, Adam's state, thresholds, L0 and the loss stay float32."""
    compile: CompileMode = "off"
    """torch.compile the training loss and its backward with this mode: "default" fuses the
    step's elementwise work into few kernels; "reduce-overhead" (and "max-autotune") also
    replays it as CUDA graphs on a GPU. Needs sparse_kernels false (the support-only kernels
    have data-dependent shapes). Each variant of the step (before and after the first forest,
    logged or not) compiles once, taking tens of seconds, and its first step is checked
    against the eager step's gradients; for GPU runs, whose eager step is bound by kernel
    launches: on an H200, "reduce-overhead" made the step 3-8x faster (docs/scale.md). On a
    CPU it gains nothing: the support-only kernels are faster there."""

    # --- validation ----------------------------------------------------------------------
    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        from hsae.devices import device_problem

        problem = device_problem(value, check_available=False)  # checked again where it is used
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("batch_size", "coactivation_every")
    @classmethod
    def _positive_count(cls, value: int) -> int:
        return _positive_int(value)

    @field_validator("train_tokens")
    @classmethod
    def _positive_tokens(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1 token")
        return value

    @field_validator("perturbation_rate", "unassigned_quantile", "warmup_fraction", "adam_beta1")
    @classmethod
    def _unit_interval(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ValueError(f"must lie in [0, 1], got {value}")
        return value

    @field_validator("forest_warmup")
    @classmethod
    def _warmup_share(cls, value: float) -> float:
        if not 0.0 <= value < 1.0 or math.isnan(value):
            raise ValueError(f"must lie in [0, 1), got {value}")
        return value

    @field_validator("adam_beta2", "l0_ema_momentum", "coactivation_momentum")
    @classmethod
    def _momentum(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"must lie in [0, 1), got {value}")
        return value

    @field_validator("rho", "aux_coefficient")
    @classmethod
    def _non_negative(cls, value: float) -> float:
        if not value >= 0.0 or math.isinf(value):
            raise ValueError(f"must be a finite number >= 0, got {value}")
        return value

    @field_validator("lr", "l0_decay_rate", "sparsity_adjust", "threshold_lr_multiplier")
    @classmethod
    def _positive_value(cls, value: float) -> float:
        return _strictly_positive(value)

    @field_validator("activation_scale", "sparsity_init")
    @classmethod
    def _optional_positive(cls, value: float | None) -> float | None:
        if value is not None and (not value > 0.0 or math.isinf(value)):
            raise ValueError(f"must be a finite number > 0 (or null to choose it), got {value}")
        return value

    @field_validator("update_interval", "dead_after_tokens")
    @classmethod
    def _optional_positive_int(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be >= 1 (or null to choose it), got {value}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> HSAEConfig:
        if self.compile != "off" and self.sparse_kernels:
            raise ValueError(
                f"compile = {self.compile!r} needs sparse_kernels = false: the support-only "
                "kernels work on data-dependent shapes, which torch.compile cannot fuse; the "
                "dense path computes the same loss with static shapes"
            )
        if self.train_tokens < self.batch_size:
            raise ValueError(
                f"train_tokens = {self.train_tokens} is less than one batch "
                f"(batch_size = {self.batch_size})"
            )
        if self.uses_hierarchy_losses and self.forest_update_interval >= self.total_steps:
            needed = (self.forest_update_interval + 1) * self.batch_size
            raise ValueError(
                f"update_interval = {self.forest_update_interval} leaves the HSAE without a "
                f"forest: train_tokens = {self.train_tokens} gives {self.total_steps} steps of "
                f"batch_size {self.batch_size} and the first rebuild comes at step "
                f"update_interval; allowed: update_interval in [1, {self.total_steps - 1}] or "
                f"train_tokens >= {needed}"
            )
        return self

    # --- derived values ----------------------------------------------------------------------
    def architecture(self) -> ArchitectureConfig:
        """The part of these settings a saved model keeps (what the model is)."""
        return ArchitectureConfig(**self.model_dump(include=set(ArchitectureConfig.model_fields)))

    @property
    def total_steps(self) -> int:
        return max(1, self.train_tokens // self.batch_size)

    @property
    def forest_update_interval(self) -> int:
        if self.update_interval is not None:
            return self.update_interval
        return max(1, self.total_steps // 20)

    @property
    def first_rebuild_step(self) -> int:
        """The step after which the forest is first rebuilt."""
        return max(self.forest_update_interval, int(self.forest_warmup * self.total_steps))

    @property
    def dead_window_tokens(self) -> int:
        if self.dead_after_tokens is not None:
            return self.dead_after_tokens
        return max(self.batch_size, min(10_000_000, self.train_tokens // 10))

    @property
    def effective_quantile(self) -> float:
        """Share of children left unassigned at each rebuild (the full tree keeps them all)."""
        return 0.0 if self.tree == "full" else self.unassigned_quantile

    def initial_sparsity_weight(self) -> float:
        if self.sparsity_init is not None:
            return self.sparsity_init
        # Reconstruction error is O(d_in) for activations of mean norm sqrt(d_in); this puts
        # the L0 penalty at the target at 1% of the total variance. Larger starts pushed the
        # thresholds of real (Gemma) activations far past the target before the controller
        # could react, leaving a quarter of the features dead.
        return 0.01 * self.d_in / self.target_l0

    @classmethod
    def from_json(cls, text: str) -> HSAEConfig:
        return cls(**json.loads(text))


def refuse_bool(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Pydantic reads True as 1: refuse a boolean given for a field (or list item) that is not
    a boolean, so ``batch_size=True`` is an error rather than a batch of one token."""
    field = model.model_fields.get(info.field_name or "")
    if field is None or field.annotation is bool:
        return value
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, bool) for item in items):
        raise ValueError(f"expected a number, not a boolean: {value!r}")
    return value


def _positive_int(value: int) -> int:
    if value < 1:
        raise ValueError("must be a positive integer (>= 1)")
    return value


def _strictly_positive(value: float) -> float:
    if not value > 0.0 or math.isinf(value):
        raise ValueError(f"must be a finite number > 0, got {value}")
    return value


def _format_validation_error(error: ValidationError) -> str:
    messages = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        text = str(item["msg"]).removeprefix("Value error, ")
        messages.append(f"{field}: {text}")
    return "invalid HSAE configuration: " + "; ".join(messages)
