"""The Matryoshka BatchTopK SAE baseline (Bussmann et al. 2025, "Learning multi-level features
with Matryoshka sparse autoencoders"), shown to the rest of the package as levels.

One dictionary of ``max(level_sizes)`` latents with a BatchTopK activation over the whole
dictionary (k = ``target_l0`` active latents per token on average, as SAELens's ``k``), trained
on the sum over nested prefixes of each prefix's reconstruction error: prefix ``l`` is the first
``level_sizes[l]`` latents, decoded alone (its codes are the full dictionary's codes restricted
to it, plus ``b_dec``). The last prefix is the whole dictionary, so the loss is SAELens's
``MatryoshkaBatchTopKTrainingSAE`` loss with ``matryoshka_widths = level_sizes``: the full
reconstruction's error plus every inner width's (``tests/test_matryoshka.py`` checks the two
agree on the same weights and batch). The dead-latent term is the package's own AuxK loss on
the whole dictionary (the one every level kind uses), not SAELens's.

Presented as levels: level ``l`` is the prefix of size ``level_sizes[l]``
(:class:`MatryoshkaPrefix`, whose weights are views of the one dictionary, never copies), so
its codes, reconstruction, L0 and variance explained are the prefix's, and every metric, the
report, the explorer and the SAELens export work unchanged. Because the dictionary's BatchTopK
is shared, small prefixes have a lower L0 than ``target_l0`` (the whole dictionary has it).

The forest is built post hoc, once after training, between consecutive prefixes' *new*
latents: each latent of level ``l + 1`` that is not in level ``l`` (indices
``level_sizes[l] .. level_sizes[l+1] - 1``) gets a parent among level ``l``'s latents by the
run's similarity and quantile filter, the rule the independent baseline's forest uses. The
latents of level ``l + 1`` that *are* level ``l``'s (the first ``level_sizes[l]``) stay
unassigned (-1): they are the same latents, shown at level ``l``; linking each to itself would
make every hierarchy metric trivially perfect for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from hsae.config import ArchitectureConfig, ConfigError, HSAEConfig
from hsae.model import forest as forest_ops
from hsae.model.hierarchy_losses import BorrowedChildren, SiblingPairs
from hsae.model.hsae import (
    HSAE,
    LossWeights,
    TrainingLoss,
    centred_energy,
    per_token_variance_explained,
)
from hsae.model.level import BatchGroup, LevelCodes
from hsae.model.levels.batchtopk import BatchTopKLevel


class MatryoshkaPrefix(BatchTopKLevel):
    """The first ``n_features`` latents of a shared BatchTopK dictionary, as a level.

    Its weights are views of the dictionary's (no copy, not in any state dict); its inference
    threshold is the dictionary's one threshold, so its codes are the dictionary's codes
    restricted to the prefix.
    """

    def __init__(self, dictionary: BatchTopKLevel, n_features: int):
        nn.Module.__init__(self)
        self.d_in = dictionary.d_in
        self.n_features = n_features
        self.k = dictionary.k
        # Not a submodule: the dictionary's tensors belong to the model, once.
        object.__setattr__(self, "_dictionary", dictionary)

    @property
    def dictionary(self) -> BatchTopKLevel:
        return self._dictionary  # type: ignore[no-any-return]

    @property
    def W_enc(self) -> Tensor:  # type: ignore[override]  # noqa: N802
        return self.dictionary.W_enc[:, : self.n_features]

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]  # noqa: N802
        return self.dictionary.W_dec[: self.n_features]

    @property
    def b_enc(self) -> Tensor:  # type: ignore[override]
        return self.dictionary.b_enc[: self.n_features]

    @property
    def b_dec(self) -> Tensor:  # type: ignore[override]
        return self.dictionary.b_dec

    @property
    def inference_threshold(self) -> Tensor:  # type: ignore[override]
        return self.dictionary.inference_threshold

    def encode_for_training(self, x: Tensor, bandwidth: float, fused: bool) -> LevelCodes:
        """The dictionary's training forward (batch top-k over every latent), restricted to
        the prefix."""
        codes = self.dictionary.encode_for_training(x, bandwidth, fused)
        keep = codes.cols < self.n_features
        return LevelCodes(
            acts=codes.acts[:, : self.n_features],
            pre=codes.pre[:, : self.n_features],
            rows=codes.rows[keep],
            cols=codes.cols[keep],
            values=codes.values[keep],
        )

    @torch.no_grad()
    def initialise_from_data(self, x: Tensor, target_l0: float) -> None:
        """The dictionary's start (b_dec at the data mean, threshold from the whole batch
        selection); the same whichever prefix asks."""
        self.dictionary.initialise_from_data(x, target_l0)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.dictionary.normalise_decoder()


class MatryoshkaSAE(HSAE):
    """A Matryoshka BatchTopK SAE whose levels are the nested prefixes of one dictionary."""

    modes: ClassVar[tuple[str, ...]] = ("matryoshka",)

    def __init__(self, config: ArchitectureConfig, seed: int | None = None):
        """One BatchTopK dictionary of ``max(level_sizes)`` latents (k = ``target_l0``), its
        decoder directions drawn with ``seed``; ``config.level`` must be "batchtopk"."""
        nn.Module.__init__(self)
        if isinstance(config, HSAEConfig):
            seed = config.seed if seed is None else seed
            config = config.architecture()
        if config.level != BatchTopKLevel.kind:
            raise ConfigError(
                "invalid HSAE configuration: level: mode 'matryoshka' trains one BatchTopK "
                f"dictionary, so level must be 'batchtopk', got {config.level!r}"
            )
        self.config = config
        self.training_config: HSAEConfig | None = None
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.dictionary = BatchTopKLevel(
            config.d_in, config.level_sizes[-1], generator, config.target_l0
        )
        prefixes = [MatryoshkaPrefix(self.dictionary, size) for size in config.level_sizes]
        object.__setattr__(self, "_prefixes", prefixes)
        for level, links in enumerate(forest_ops.empty_forest(config.level_sizes)):
            self.register_buffer(f"parents_{level}", links)
        self.register_buffer("activation_scale", torch.tensor(1.0))

    @classmethod
    def adapt_training_config(cls, config: HSAEConfig) -> HSAEConfig:
        """The run's settings with the level kind this model trains (one BatchTopK dictionary)."""
        return HSAEConfig(**config.model_dump() | {"level": BatchTopKLevel.kind})

    @property
    def levels(self) -> list[MatryoshkaPrefix]:  # type: ignore[override]
        """Level ``l``: the prefix of the first ``level_sizes[l]`` latents."""
        return list(self._prefixes)  # type: ignore[attr-defined]

    @torch.no_grad()
    def encode(self, x: Tensor) -> list[Tensor]:
        """Per-level activations: the dictionary's codes, computed once, cut at each prefix."""
        scaled = x.to(self.activation_scale.device, torch.float32) * self.activation_scale
        full = self.dictionary.encode(scaled, self.config.bandwidth)
        return [full[:, :size].contiguous() for size in self.config.level_sizes]

    @torch.no_grad()
    def normalise_decoders(self) -> None:
        self.dictionary.normalise_decoder()

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
        """Sum over prefixes of the prefix's batch-mean squared error, plus ``weights.aux``
        times the AuxK loss of the whole dictionary's dead latents (``dead[-1]``).
        ``substituted``, ``pairs``, ``borrowed`` and the sparsity weights do not apply (no
        forest in training, no sparsity penalty). ``group``: as for :meth:`HSAE.training_loss`
        (the BatchTopK cut, the variance explained's centring and the AuxK normalisation over
        the global batch)."""
        cfg = self.config
        dictionary = self.dictionary
        codes = self._encode_for_training(dictionary, x, cfg.sparse_kernels, group)
        active = dictionary.active(codes)
        fired_all = active.any(0)
        energy = centred_energy(x, group)
        columns = torch.arange(dictionary.n_features, device=x.device)
        recon = dictionary.b_dec.expand_as(x)
        total = x.new_zeros(())
        mses, l0s, explained, fired, active_masks = [], [], [], [], []
        start = 0
        for size in cfg.level_sizes:
            block = (columns >= start) & (columns < size)
            recon = recon + dictionary.decode_columns(codes, block, cfg.sparse_kernels)
            sq_error = (recon - x).pow(2).sum(-1)
            total = total + sq_error.mean()
            own_error = sq_error.detach()
            mses.append(own_error.mean())
            l0s.append(active[:, :size].sum().to(x.dtype) / x.shape[0])
            explained.append(per_token_variance_explained(own_error, energy).mean())
            fired.append(fired_all[:size])
            if keep_active:
                active_masks.append(active[:, :size])
            start = size
        aux_total = x.new_zeros(())
        if dead is not None and weights.aux > 0 and bool(dead[-1].any()):
            aux = self._dead_feature_loss(dictionary, x, (x - recon).detach(), dead[-1], group)
            total = total + weights.aux * aux
            aux_total = aux.detach()
        return TrainingLoss(
            total=total,
            mse=torch.stack(mses),
            l0=torch.stack(l0s),
            variance_explained=torch.stack(explained),
            constraint=x.new_zeros(()),
            aux=aux_total,
            fired=fired,
            active=active_masks,
        )

    @torch.no_grad()
    def build_forest(
        self,
        similarity: str,
        quantile: float,
        max_children: int | None,
        tracker: forest_ops.CoactivationTracker | None = None,
    ) -> list[Tensor]:
        """Parents for each level's new latents among the previous prefix's latents; the
        latents a level shares with the previous one stay unassigned (module docstring)."""
        sizes = self.config.level_sizes
        links = []
        for index in range(self.n_levels - 1):
            parent_size, child_size = sizes[index], sizes[index + 1]
            new = _Block(self.dictionary, parent_size, child_size)
            scores = forest_ops.tracker_scores(similarity, tracker, index)
            if scores is not None:
                scores = scores[parent_size:]
            best_index, best_score = forest_ops.best_parents(
                similarity, self.levels[index], new, scores
            )
            level_links = torch.full(
                (child_size,), forest_ops.UNASSIGNED, dtype=torch.long, device=best_index.device
            )
            level_links[parent_size:] = forest_ops.link_children(
                best_index, best_score, quantile, max_children
            )
            links.append(level_links)
        return links


class _Block:
    """Latents ``start .. end - 1`` of a dictionary, with what the similarities read."""

    def __init__(self, dictionary: BatchTopKLevel, start: int, end: int):
        self.W_enc = dictionary.W_enc[:, start:end]
        self.W_dec = dictionary.W_dec[start:end]
