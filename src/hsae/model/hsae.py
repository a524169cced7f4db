"""The HSAE: L levels, the forest linking them, the training loss, save and load.

The levels are of one kind (``HSAEConfig.level``, built through ``hsae.model.levels.LEVEL_KINDS``).
The training objective (``hsae-method.md`` section 2) is assembled in :meth:`HSAE.training_loss`:
sum over levels of reconstruction error + lambda_l * L0_l (only for kinds trained with a sparsity
penalty, e.g. JumpReLU; TopK kinds fix their L0 themselves), plus rho times the parent-children
constraint, plus the auxiliary loss that revives dead features. ``mode="independent"`` (the
baseline) drops the constraint and the perturbation, so the levels train independently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from hsae.config import ArchitectureConfig, HSAEConfig
from hsae.errors import HSAEError
from hsae.io import sha256_file, write_json, write_safetensors
from hsae.model import forest as forest_ops
from hsae.model import navigation
from hsae.model.hierarchy_losses import (
    BorrowedChildren,
    DecoderProducts,
    SiblingPairs,
    StackForest,
    dense_parent_children_constraint,
    has_children,
    native_constraint_applies,
    normalise_with_products,
    perturbed_reconstruction,
    sibling_pairs,
    stack_constraint,
    stack_forest,
)
from hsae.model.kernels import BorrowedBackward, GradientAddend, squared_error
from hsae.model.level import BatchGroup, Level, LevelCodes
from hsae.model.levels import LEVEL_KINDS

WEIGHTS_FILE = "hsae.safetensors"
CONFIG_FILE = "hsae_config.json"
FORMAT_VERSION = 2
MAX_CONFIG_BYTES = 1 << 20
"""A saved model's config file is a few kB; anything above this is refused unread."""


class ModelFileError(HSAEError, ValueError):
    """A saved model folder is missing a file, or a file is corrupt; the message names it."""


class ModelNotFoundError(ModelFileError, FileNotFoundError):
    """No saved model where one was expected."""


def _stamp(tensors: Iterable[Tensor]) -> tuple[tuple[int, int], ...]:
    """Each tensor's (address, version): it changes when the tensor is replaced or written in
    place, which is when what was computed from it must be computed again."""
    return tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)


@dataclass(frozen=True)
class LossWeights:
    """The weights of the loss's terms, all in one place (the trainer owns their values)."""

    sparsity: Tensor
    """[L] lambda_l of each level's L0 penalty (the sparsity controller's current values)."""
    rho: float = 0.0
    """Weight of the parent-children constraint (used when the model is an HSAE)."""
    aux: float = 0.0
    """Weight of the dead-feature auxiliary loss."""


@dataclass
class TrainingLoss:
    """The scalar to minimise and its parts (detached floats for logging)."""

    total: Tensor
    mse: Tensor
    """[L] batch-mean squared reconstruction error per level."""
    l0: Tensor
    """[L] batch-mean number of active features per level."""
    variance_explained: Tensor
    """[L] SAEBench-legacy variance explained per level on this batch."""
    constraint: Tensor
    aux: Tensor
    fired: list[Tensor] = field(default_factory=list)
    """Per level, [n_l] booleans: which features fired on this batch."""
    active: list[Tensor] = field(default_factory=list)
    """Per level, [batch, n_l] booleans (kept only when asked for, e.g. for co-activation)."""


class HSAE(nn.Module):
    """Hierarchical sparse autoencoder: levels of growing size and a forest between them.

    Also the independent baseline (``mode="independent"``). Another model trained beside it
    (e.g. :class:`hsae.model.matryoshka.MatryoshkaSAE`) subclasses it and names the modes it
    implements in ``modes``; :meth:`class_for` finds the class of a saved model's mode.
    """

    modes: ClassVar[tuple[str, ...]] = ("hsae", "independent")
    """The ``ArchitectureConfig.mode`` values this class builds."""
    _classes: ClassVar[dict[str, type[HSAE]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for mode in cls.__dict__.get("modes", ()):
            HSAE._classes[mode] = cls

    @staticmethod
    def class_for(mode: str) -> type[HSAE]:
        """The model class of ``mode`` (HSAE itself unless a subclass registered the mode)."""
        return HSAE._classes.get(mode, HSAE)

    @classmethod
    def adapt_training_config(cls, config: HSAEConfig) -> HSAEConfig:
        """A run's settings as this model trains them (a subclass may fix, e.g., its level
        kind); HSAE trains them as given."""
        return config

    def __init__(self, config: ArchitectureConfig, seed: int | None = None):
        """Levels of ``config`` with random decoder directions drawn with ``seed``.

        ``config`` may be a full :class:`HSAEConfig`: the model keeps only its architecture,
        and its ``seed`` is used when ``seed`` is None.
        """
        super().__init__()
        if isinstance(config, HSAEConfig):
            seed = config.seed if seed is None else seed
            config = config.architecture()
        self.config = config
        self.training_config: HSAEConfig | None = None
        """How the model was trained, when known (set by the trainer, saved with the model)."""
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        kind = LEVEL_KINDS[config.level]
        self.levels: nn.ModuleList = nn.ModuleList(
            kind(config.d_in, size, generator, config.target_l0) for size in config.level_sizes
        )
        for level, links in enumerate(forest_ops.empty_forest(config.level_sizes)):
            self.register_buffer(f"parents_{level}", links)
        self.register_buffer("activation_scale", torch.tensor(1.0))
        self._pairs: dict[tuple[int, bool], tuple[Any, SiblingPairs]] = {}
        """Sibling pairs of each level pair's forest for the dense constraint, by (level,
        padded), keyed by the parents buffer's (address, version): recomputed only when the
        forest changes."""
        self._host_forest: dict[int, tuple[Any, Tensor]] = {}
        """Host copies of the parents buffers, keyed as ``_pairs`` (:meth:`host_parents`)."""
        self._host_with_children: dict[int, tuple[Any, Tensor]] = {}
        self._parent_links: dict[int, tuple[Any, tuple[Tensor, Tensor]]] = {}
        """Which features of each level have children, on the host (:meth:`host_with_children`)."""
        self._stack_forest: dict[None, tuple[Any, StackForest]] = {}
        """The forest numbered across levels (:meth:`stack_forest`), keyed by None."""
        self._products: tuple[Any, StackForest, DecoderProducts] | None = None
        """The decoder products of the last :meth:`normalise_decoders`, with the decoders'
        (address, version) after it and the forest they were taken for (:meth:`_constraint`
        reads them only while both are unchanged)."""
        self._fused_constraint = False
        """Whether the last training loss took the constraint on the fused CPU kernel (then
        :meth:`normalise_decoders` computes the products it reads)."""

    # --- public API ------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def scale(self) -> float:
        return float(self.activation_scale)

    def parents(self, level: int) -> Tensor:
        """Parent index in ``level`` of every feature of ``level + 1`` (-1: unassigned)."""
        if not 0 <= level < self.n_levels - 1:
            raise IndexError(f"level must lie in [0, {self.n_levels - 2}], got {level}")
        return getattr(self, f"parents_{level}")

    def set_parents(self, level: int, links: Tensor) -> None:
        self.parents(level).copy_(links)

    def forest(self) -> list[Tensor]:
        return [self.parents(level) for level in range(self.n_levels - 1)]

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """Per-level activations [batch, n_l] for raw activations ``x`` [batch, d_in]."""
        scaled = x.to(self.activation_scale.device, torch.float32) * self.activation_scale
        return [level.encode(scaled, self.config.bandwidth) for level in self.levels]

    @torch.no_grad()
    def encode_level(self, x: Tensor, level: int) -> Tensor:
        """Activations [batch, n_level] of one level for raw activations ``x``."""
        scaled = x.to(self.activation_scale.device, torch.float32) * self.activation_scale
        return self.levels[level].encode(scaled, self.config.bandwidth)

    @torch.no_grad()
    def decode(self, codes: Tensor, level: int) -> Tensor:
        """Reconstruction, in the caller's (raw) units, of ``codes`` [batch, n_level]."""
        return self.levels[level].decode(codes.float()) / self.activation_scale

    @torch.no_grad()
    def encode_in_batches(self, x: Tensor, batch_size: int = 4096) -> list[Tensor]:
        """Per-level activations [n, n_l], on the CPU, of raw ``x`` of any length, encoded
        ``batch_size`` rows at a time (what evaluations on thousands of prompts need)."""
        chunks = [self.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return [
            torch.cat([chunk[level].cpu() for chunk in chunks]) for level in range(self.n_levels)
        ]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> list[Tensor]:
        return [self.decode(codes, level) for level, codes in enumerate(self.encode(x))]

    # --- walking the forest (hsae.model.navigation) ----------------------------------------
    @overload
    def children(self) -> Iterator[nn.Module]: ...

    @overload
    def children(self, level: int, index: int) -> Tensor: ...

    def children(self, level: int | None = None, index: int | None = None) -> Any:
        """Indices in ``level + 1`` of the children of feature ``index`` of ``level`` (a
        LongTensor). Without arguments, ``nn.Module.children()``: the submodules, as PyTorch
        itself calls it."""
        if level is None and index is None:
            return super().children()
        if level is None or index is None:
            raise navigation.NavigationError("children(level, index) needs both arguments")
        return navigation.children(self.forest(), self.config.level_sizes, level, index)

    def ancestors(self, level: int, index: int) -> list[tuple[int, int]]:
        """(level, index) of the feature's parent, grandparent, ... up to its root."""
        return navigation.ancestors(self.forest(), self.config.level_sizes, level, index)

    def subtree(self, level: int, index: int) -> list[tuple[int, int]]:
        """(level, index) of the feature and all its descendants, breadth first."""
        return navigation.subtree(self.forest(), self.config.level_sizes, level, index)

    def roots(self) -> list[tuple[int, int]]:
        """(level, index) of every tree's root: level 0 and the unassigned deeper features."""
        return navigation.roots(self.forest(), self.config.level_sizes)

    def nodes(self) -> Iterator[tuple[int, int]]:
        """Every (level, index) once, tree by tree, each tree depth first."""
        return navigation.walk(self.forest(), self.config.level_sizes)

    def forest_table(
        self, frequencies: Sequence[Any] | None = None, labels: Mapping[Any, str] | None = None
    ) -> list[dict[str, Any]]:
        """One dict per feature (level, feature, parent, n_children, frequency, label):
        ``pandas.DataFrame(model.forest_table())``; see :func:`navigation.forest_table`."""
        return navigation.forest_table(self.forest(), self.config.level_sizes, frequencies, labels)

    # --- training -------------------------------------------------------------------------
    def training_loss(
        self,
        x: Tensor,
        weights: LossWeights,
        substituted: list[Tensor] | None = None,
        dead: list[Tensor] | None = None,
        keep_active: bool = False,
        exact_metrics: bool = True,
        group: BatchGroup | None = None,
        pairs: Sequence[SiblingPairs] | None = None,
        borrowed: Sequence[BorrowedChildren] | None = None,
    ) -> TrainingLoss:
        """Loss on a batch ``x`` already in scaled units, weighted by ``weights``.

        ``substituted[l]`` flags the level-l parents replaced by their children this step
        (None: no perturbation); ``dead[l]`` flags level-l features the auxiliary loss revives.
        The loss uses the perturbed reconstructions; the reported ``mse`` and
        ``variance_explained`` are those of the model itself (unperturbed), which costs one
        more decode of each perturbed level; ``exact_metrics=False`` skips it and reports the
        perturbed ones (the trainer does so on steps it does not log).

        ``group``: in data-parallel training, the processes sharing the global batch, ``x``
        being this process's equal share of it. Every term is then this process's part of the
        global batch's loss, so that the mean of the processes' gradients is the gradient of
        the global loss; the reported metrics are this process's (the trainer averages them).

        ``pairs``: each level pair's :meth:`sibling_pairs`, for the dense path's constraint
        (None: read from the cache here; a compiled step passes them in, as the cache's
        bookkeeping cannot be traced). ``borrowed``: per perturbed level, the children of its
        substituted parents (:func:`hierarchy_losses.borrowed_children`, computed with the
        draw on the host), whose columns alone the dense path decodes.
        """
        cfg = self.config
        fused = cfg.sparse_kernels
        codes = [self._encode_for_training(level, x, fused, group) for level in self.levels]
        energy = centred_energy(x) if group is None else centred_energy(x, group)
        zero = x.new_zeros(())
        total, aux_total, constraint = zero, zero, zero
        mses, l0s, explained, fired, active_masks = [], [], [], [], []
        # The order in which the graph is built sets the order of the backward (autograd runs
        # the most recently created node first), and so the order in which a decoder's
        # gradients arrive: the borrowed children's row-sparse one must come first, so that the
        # child level's dense one is added onto it in place (a sparse gradient arriving after a
        # dense one makes autograd copy the whole dense [n, d] tensor: 26 ms a step at d = 2304).
        # Hence the levels are built from the last to the first, each child level's own
        # decoding before its parent's borrowing. The constraint's dense decoder gradients
        # either go into the levels' own decodes' (the fused CPU kernel, through addends: it is
        # then built after them, so that its backward runs first) or come first (built before).
        hierarchy = cfg.uses_hierarchy_losses and weights.rho > 0
        addends: list[GradientAddend] | None = None
        if (
            hierarchy
            and fused
            and native_constraint_applies(codes, [level.W_dec for level in self.levels])
        ):
            addends = [GradientAddend() for _ in self.levels]
        elif hierarchy:
            constraint = self._constraint(codes, fused, pairs)
        # The borrowed children's backward is handed to the child level's own decode (built
        # just before, one level down) where the fused CPU kernels allow.
        handed: BorrowedBackward | None = None
        perturbs = [self._perturbs(index, substituted, fused) for index in range(self.n_levels)]
        for index in reversed(range(self.n_levels)):
            level = self.levels[index]
            perturbed = perturbs[index]
            addend = None if addends is None else addends[index]
            flags = None
            if fused and index > 0 and perturbs[index - 1]:
                flags = self._borrowed_flags(index, substituted)  # type: ignore[arg-type]
            lending = None if flags is None else BorrowedBackward(flags, codes[index].values)
            if perturbed:
                keep = ~substituted[index]  # type: ignore[index]
                own = level.decode_columns(
                    codes[index], keep, fused, addend=addend, borrowed=lending
                )
                decoded = perturbed_reconstruction(
                    level,
                    codes[index],
                    self.levels[index + 1],
                    codes[index + 1],
                    self.parents(index),
                    substituted[index],  # type: ignore[index]
                    fused,
                    child_decodes_itself=True,  # level index + 1 decodes below
                    with_bias=False,
                    borrowed=None if borrowed is None else borrowed[index],
                    own=own,
                    borrowed_backward=handed,
                )
            else:
                decoded = level.decode_columns(
                    codes[index], None, fused, addend=addend, borrowed=lending
                )
            if handed is not None:  # its token, untaken, would tie its decode's graph in a cycle
                handed.token = None
            handed = lending
            sq_error = squared_error(decoded, level.b_dec, x)
            if level.uses_sparsity_controller:
                penalty = level.sparsity_loss(codes[index], cfg.bandwidth)
                total = total + sq_error.mean() + weights.sparsity[index] * penalty
            else:
                total = total + sq_error.mean()
            if perturbed and exact_metrics:
                with torch.no_grad():
                    own = level.decode_columns(codes[index], None, fused)
                    own_error = squared_error(own, level.b_dec, x)
            else:
                own_error = sq_error.detach()
            mses.append(own_error.mean())
            l0s.append(level.l0(codes[index]))
            explained.append(per_token_variance_explained(own_error, energy).mean())
            fired.append(level.fired(codes[index]))
            if keep_active:
                active_masks.append(level.active(codes[index]))
            if dead is not None and weights.aux > 0 and (not fused or bool(dead[index].any())):
                residual = (x - decoded - level.b_dec).detach()
                aux = self._dead_feature_loss(level, x, residual, dead[index], group, fused)
                total = total + weights.aux * aux
                aux_total = aux_total + aux.detach()
        if addends is not None:
            constraint = self._constraint(codes, fused, pairs, addends)
        if hierarchy:
            total = total + weights.rho * constraint
        return TrainingLoss(
            total=total,
            mse=torch.stack(mses[::-1]),
            l0=torch.stack(l0s[::-1]),
            variance_explained=torch.stack(explained[::-1]),
            constraint=constraint.detach(),
            aux=aux_total,
            fired=fired[::-1],
            active=active_masks[::-1],
        )

    def _encode_for_training(
        self, level: Level, x: Tensor, fused: bool, group: BatchGroup | None
    ) -> LevelCodes:
        if group is not None and level.batch_dependent:
            return level.encode_for_training(  # type: ignore[call-arg]
                x, self.config.bandwidth, fused, group=group
            )
        return level.encode_for_training(x, self.config.bandwidth, fused)

    def _borrowed_flags(self, index: int, substituted: list[Tensor]) -> Tensor:
        """Which of level ``index``'s features stand in for their substituted parents in level
        ``index - 1``'s perturbed reconstruction (for the
        :class:`~hsae.model.kernels.BorrowedBackward` of level ``index``'s decode)."""
        has_parent, link = self._per_forest(
            self._parent_links,
            index - 1,
            index - 1,
            lambda: (self.parents(index - 1) >= 0, self.parents(index - 1).clamp(min=0)),
        )
        return substituted[index - 1].index_select(0, link).logical_and_(has_parent)

    def _perturbs(self, index: int, substituted: list[Tensor] | None, fused: bool = True) -> bool:
        """Whether level ``index`` takes the perturbed reconstruction this step: when it swaps
        some parents for their children; on the dense path whenever a draw exists (with none
        substituted it equals the plain one, and nothing is read back to the host)."""
        if substituted is None or index >= self.n_levels - 1:
            return False
        return not fused or bool(substituted[index].any())

    def _constraint(
        self,
        codes: list[LevelCodes],
        fused: bool = True,
        pairs: Sequence[SiblingPairs] | None = None,
        addends: Sequence[GradientAddend] | None = None,
    ) -> Tensor:
        """The constraint over all level pairs: from the supports on the fast path (all pairs in
        one pass), from dense activations on the dense reference path (an independent check of
        the former). ``addends``: the levels' decodes' (:func:`stack_constraint`)."""
        if fused:
            decoders = [level.W_dec for level in self.levels]
            self._fused_constraint = native_constraint_applies(codes, decoders)
            return stack_constraint(
                codes,
                decoders,
                [self.parents(index) for index in range(self.n_levels - 1)],
                self.stack_forest(),
                addends,
                self._current_products() if self._fused_constraint else None,
            )
        total = codes[0].pre.new_zeros(())
        for index in range(self.n_levels - 1):
            total = total + dense_parent_children_constraint(
                codes[index].acts,
                codes[index + 1].acts,
                self.levels[index].W_dec,
                self.levels[index + 1].W_dec,
                self.parents(index),
                self.sibling_pairs(index) if pairs is None else pairs[index],
            )
        return total

    def host_parents(self, level: int) -> Tensor:
        """A host (CPU) copy of :meth:`parents`, read from the device once per forest."""
        parents = self.parents(level)
        if parents.device.type == "cpu":
            return parents
        return self._per_forest(self._host_forest, level, level, parents.cpu)

    def host_with_children(self, level: int) -> Tensor:
        """[level size] bool, on the host: which of ``level``'s features have at least one
        child (:func:`hsae.model.hierarchy_losses.has_children` of :meth:`host_parents`), once
        per forest: the perturbation draw's mask, every step."""
        return self._per_forest(
            self._host_with_children,
            level,
            level,
            lambda: has_children(self.host_parents(level), self.config.level_sizes[level]),
        )

    def sibling_pairs(self, level: int, padded: bool = False) -> SiblingPairs:
        """The sibling pairs among the children of ``level``'s features, computed once per
        forest (:func:`hsae.model.hierarchy_losses.sibling_pairs`; ``padded``: to a power of
        two, for a compiled step)."""
        parents = self.parents(level)
        return self._per_forest(
            self._pairs,
            (level, padded),
            level,
            lambda: sibling_pairs(parents, pad_to_power_of_two=padded),
        )

    def stack_forest(self) -> StackForest:
        """The forest with the features numbered across levels, for the constraint
        (:func:`hsae.model.hierarchy_losses.stack_forest`), computed once per forest."""
        return self._per_forest(
            self._stack_forest,
            None,
            None,
            lambda: stack_forest(
                [self.parents(index) for index in range(self.n_levels - 1)],
                self.config.level_sizes,
            ),
        )

    def _per_forest(self, cache: dict[Any, Any], key: Any, level: int | None, compute: Any) -> Any:
        """``cache[key]``, computed again only when ``level``'s parents buffer (any level's
        when None) has changed (another address or version) since it was stored."""
        levels = range(self.n_levels - 1) if level is None else (level,)
        stamp = _stamp(self.parents(index) for index in levels)
        cached = cache.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, compute())
            cache[key] = cached
        return cached[1]

    def _dead_feature_loss(
        self,
        level: Level,
        x: Tensor,
        residual: Tensor,
        dead: Tensor,
        group: BatchGroup | None = None,
        fused: bool = True,
    ) -> Tensor:
        """AuxK-style revival: the top dead latents (by ReLU pre-activation) fit the residual.

        Normalised by the residual's centred energy over the whole batch; with a ``group``
        that energy is the global batch's, and the result is scaled so that the processes'
        mean is the global value (the dead set is the same on every process).

        ``fused=False`` (the dense path) computes the same value with fixed shapes and nothing
        read back to the host: every latent's pre-activation with the live ones masked to 0,
        the top k of those, and the result multiplied by whether any latent is dead. The
        latents it picks beyond the dead ones have value 0, so they add nothing to the fit and
        get no gradient; the price is a full encoder product per level and step."""
        k_max = max(1, self.config.d_in // 2)
        centred = x - level.b_dec.detach()
        if fused:
            dead_index = dead.nonzero(as_tuple=True)[0]
            k = min(k_max, dead_index.numel())
            pre = centred @ level.W_enc[:, dead_index] + level.b_enc[dead_index]
            values, chosen = pre.relu().topk(k, dim=1)
            fitted = nn.functional.embedding_bag(
                chosen,
                level.W_dec[dead_index],
                mode="sum",
                per_sample_weights=values.to(level.W_dec.dtype),
            )
            any_dead = None
        else:
            # The top k as a dense code and one decoder product: matmuls both ways, where
            # embedding_bag's backward over [batch, k] bags sorts every entry.
            pre = centred @ level.W_enc + level.b_enc
            values, chosen = (pre.relu() * dead).topk(min(k_max, level.n_features), dim=1)
            codes = torch.zeros_like(pre).scatter(1, chosen, values)
            fitted = codes.to(level.W_dec.dtype) @ level.W_dec
            any_dead = dead.any().to(residual.dtype)
        if group is not None and group.size > 1:
            n_global = residual.shape[0] * group.size
            mean = group.sum(residual.sum(0)) / n_global
            energy = group.sum((residual - mean).pow(2).sum().reshape(1))[0].clamp(min=1e-8)
            aux = group.size * (fitted - residual).pow(2).sum() / energy
        else:
            residual_energy = (residual - residual.mean(0)).pow(2).sum().clamp(min=1e-8)
            aux = (fitted - residual).pow(2).sum() / residual_energy
        return aux if any_dead is None else aux * any_dead

    @torch.no_grad()
    def build_forest(
        self,
        similarity: str,
        quantile: float,
        max_children: int | None,
        tracker: forest_ops.CoactivationTracker | None = None,
    ) -> list[Tensor]:
        """A new forest by ``similarity`` (parameters untouched): the HSAE's periodic rebuild
        and the independent baseline's post-hoc forest (:func:`forest_ops.rebuild_forest`)."""
        return forest_ops.rebuild_forest(
            list(self.levels), similarity, quantile, max_children, tracker
        )

    @torch.no_grad()
    def normalise_decoders(self) -> None:
        """Every decoder row to unit norm. After a training loss that took the constraint on
        the fused CPU kernel, in one pass that also keeps the products the next one reads
        (:func:`hsae.model.hierarchy_losses.normalise_with_products`; the same rows)."""
        self._products = None
        if self._fused_constraint and all(
            type(level).normalise_decoder is Level.normalise_decoder for level in self.levels
        ):
            forest = self.stack_forest()
            products = normalise_with_products(
                [level.W_dec for level in self.levels],
                [level.decoder_norms() for level in self.levels],
                forest,
            )
            if products is not None:
                self._products = (self._decoders_stamp(), forest, products)
                return
        for level in self.levels:
            level.normalise_decoder()

    def _decoders_stamp(self) -> tuple[tuple[int, int], ...]:
        return _stamp(level.W_dec for level in self.levels)

    def _current_products(self) -> DecoderProducts | None:
        """The last normalisation's products if neither the decoders nor the forest changed
        since (another address or version, another forest)."""
        if self._products is None:
            return None
        stamp, forest, products = self._products
        if stamp != self._decoders_stamp() or forest is not self.stack_forest():
            self._products = None
            return None
        return products

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``hsae.safetensors`` (weights, forest, scale) and ``hsae_config.json``.

        The config is written last and records the weights' sha256, so :func:`load_hsae`
        detects a corrupt file, or weights and config from two different saves.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor for name, tensor in self.state_dict().items()}
        # No safetensors metadata: its order varies between processes, and the same model must
        # give the same bytes (and sha256) wherever it is saved. The format is in the config.
        write_safetensors(folder / WEIGHTS_FILE, tensors)
        write_json(
            folder / CONFIG_FILE,
            {
                "format_version": FORMAT_VERSION,
                "config": self.config.model_dump(),
                "training": (
                    None if self.training_config is None else self.training_config.model_dump()
                ),
                "sha256": {WEIGHTS_FILE: sha256_file(folder / WEIGHTS_FILE)},
            },
        )
        return folder


def load_hsae(path: str | Path, device: str | torch.device = "cpu") -> HSAE:
    """Load a model written by :meth:`HSAE.save` (exact round trip).

    Raises :class:`ModelFileError` naming the file when a file is missing, unreadable, corrupt
    (sha256 mismatch) or inconsistent. Folders saved before checksums were recorded load
    without the check.
    """
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise ModelNotFoundError(f"no saved HSAE at {folder}: missing {required.name}")
    payload = _read_config_file(config_path)
    try:
        config = ArchitectureConfig(**_architecture_values(payload["config"]))
        training = read_training_config(payload)
    except (KeyError, TypeError, HSAEError) as error:
        raise ModelFileError(f"{config_path}: not a valid saved HSAE config: {error}") from None
    expected = payload.get("sha256", {}).get(WEIGHTS_FILE)
    if expected is not None and sha256_file(weights_path) != expected:
        raise ModelFileError(
            f"{weights_path} is corrupt or was replaced (sha256 differs from the one recorded "
            f"in {CONFIG_FILE}); save the model again or restore the file"
        )
    model = HSAE.class_for(config.mode)(config)
    model.training_config = training
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(
            f"{weights_path} is not a readable safetensors file: {error}"
        ) from None
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ModelFileError(f"{weights_path} lacks tensors: {sorted(missing)}")
    try:
        model.load_state_dict(state)
        forest_ops.validate_forest(model.forest(), config.level_sizes)
    except (RuntimeError, ValueError) as error:
        message = str(error).replace("\n", " ").strip()
        raise ModelFileError(f"{weights_path} does not match {CONFIG_FILE}: {message}") from None
    return model.to(device)


def _architecture_values(values: dict[str, Any]) -> dict[str, Any]:
    """The architecture's fields of a saved config (format 1 saved every training setting)."""
    return {k: v for k, v in values.items() if k in ArchitectureConfig.model_fields}


def read_training_config(payload: dict[str, Any]) -> HSAEConfig | None:
    """How a saved model was trained, from its parsed ``hsae_config.json`` (None: unknown).
    Format 1 files kept every setting under ``config``; format 2 keeps them under
    ``training`` beside the architecture."""
    if payload.get("format_version", 1) == 1:
        return HSAEConfig(**payload["config"])
    training = payload.get("training")
    return None if training is None else HSAEConfig(**training)


def saved_training_config(folder: str | Path) -> HSAEConfig | None:
    """:func:`read_training_config` of the model saved in ``folder``."""
    return read_training_config(_read_config_file(Path(folder) / CONFIG_FILE))


def saved_activation_scale(folder: str | Path) -> float:
    """The activation scale c of the model saved in ``folder``, read without loading it."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as weights:
        return float(weights.get_tensor("activation_scale"))


def _read_config_file(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes; not a model config")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelFileError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
        raise ModelFileError(f"{path} is not a saved HSAE config (no 'config' object)")
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {version!r} is not one this hsae reads ({FORMAT_VERSION})"
        )
    checksums = payload.get("sha256", {})
    if not isinstance(checksums, dict):
        raise ModelFileError(f"{path}: 'sha256' must be an object of file checksums")
    return payload


def centred_energy(x: Tensor, group: BatchGroup | None = None) -> Tensor:
    """||x - batch_mean(x)||^2 per token: the denominator of variance explained. With a
    ``group``, ``x`` is one process's share and the mean is the global batch's."""
    if group is None or group.size == 1:
        return (x - x.mean(0)).pow(2).sum(-1)
    mean = group.sum(x.sum(0)) / (x.shape[0] * group.size)
    return (x - mean).pow(2).sum(-1)


def per_token_variance_explained(sq_error: Tensor, energy: Tensor) -> Tensor:
    """SAEBench legacy, per token: 1 - ||x - x_hat||^2 / ||x - batch_mean(x)||^2.

    ``sq_error`` is ||x - x_hat||^2 and ``energy`` is :func:`centred_energy` of the batch;
    average the result for the batch's value.
    """
    return 1.0 - sq_error / energy.clamp(min=1e-8)
