"""The HSAE: L JumpReLU levels, the forest linking them, the training loss, save and load.

The training objective (``hsae-method.md`` section 2) is assembled in :meth:`HSAE.training_loss`:
sum over levels of reconstruction error + lambda_l * L0_l, plus rho times the parent-children
constraint, plus the auxiliary loss that revives dead features. ``mode="independent"`` (the
baseline) drops the constraint and the perturbation, so the levels train independently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from hsae.config import HSAEConfig
from hsae.io import write_json, write_safetensors
from hsae.model import forest as forest_ops
from hsae.model.hierarchy_losses import parent_children_constraint, perturbed_reconstruction
from hsae.model.level import JumpReLULevel, LevelCodes

WEIGHTS_FILE = "hsae.safetensors"
CONFIG_FILE = "hsae_config.json"
FORMAT_VERSION = 1


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
    """Hierarchical sparse autoencoder: levels of growing size and a forest between them."""

    def __init__(self, config: HSAEConfig):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        self.levels = nn.ModuleList(
            JumpReLULevel(config.d_in, size, generator) for size in config.level_sizes
        )
        for level, links in enumerate(forest_ops.empty_forest(config.level_sizes)):
            self.register_buffer(f"parents_{level}", links)
        self.register_buffer("activation_scale", torch.tensor(1.0))

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

    # --- training -------------------------------------------------------------------------
    def training_loss(
        self,
        x: Tensor,
        sparsity_weights: Tensor,
        substituted: list[Tensor] | None = None,
        dead: list[Tensor] | None = None,
        keep_active: bool = False,
        exact_metrics: bool = True,
    ) -> TrainingLoss:
        """Loss on a batch ``x`` already in scaled units.

        ``substituted[l]`` flags the level-l parents replaced by their children this step
        (None: no perturbation); ``dead[l]`` flags level-l features the auxiliary loss revives.
        The loss uses the perturbed reconstructions; the reported ``mse`` and
        ``variance_explained`` are those of the model itself (unperturbed), which costs one
        more decode of each perturbed level; ``exact_metrics=False`` skips it and reports the
        perturbed ones (the trainer does so on steps it does not log).
        """
        cfg = self.config
        fused = cfg.sparse_kernels
        codes = [level.encode_for_training(x, cfg.bandwidth, fused) for level in self.levels]
        energy = centred_energy(x)
        zero = x.new_zeros(())
        total, aux_total, constraint = zero, zero, zero
        mses, l0s, explained, fired, active_masks = [], [], [], [], []
        for index, level in enumerate(self.levels):
            perturbed = self._perturbs(index, substituted)
            if perturbed:
                recon = perturbed_reconstruction(
                    level,
                    codes[index],
                    self.levels[index + 1],
                    codes[index + 1],
                    self.parents(index),
                    substituted[index],  # type: ignore[index]
                    fused,
                )
            else:
                recon = self._plain_reconstruction(index, codes, fused)
            sq_error = (recon - x).pow(2).sum(-1)
            l0 = level.l0(codes[index], cfg.bandwidth)
            total = total + sq_error.mean() + sparsity_weights[index] * l0
            if perturbed and exact_metrics:
                with torch.no_grad():
                    own_error = (self._plain_reconstruction(index, codes, fused) - x).pow(2).sum(-1)
            else:
                own_error = sq_error.detach()
            mses.append(own_error.mean())
            l0s.append(l0.detach())
            explained.append(per_token_variance_explained(own_error, energy).mean())
            active = codes[index].pre > level.threshold.detach()
            fired.append(active.any(0))
            if keep_active:
                active_masks.append(active)
            if dead is not None and cfg.aux_coefficient > 0 and bool(dead[index].any()):
                aux = self._dead_feature_loss(level, x, (x - recon).detach(), dead[index])
                total = total + cfg.aux_coefficient * aux
                aux_total = aux_total + aux.detach()
        if cfg.uses_hierarchy_losses and cfg.rho > 0:
            constraint = self._constraint(codes)
            total = total + cfg.rho * constraint
        return TrainingLoss(
            total=total,
            mse=torch.stack(mses),
            l0=torch.stack(l0s),
            variance_explained=torch.stack(explained),
            constraint=constraint.detach(),
            aux=aux_total,
            fired=fired,
            active=active_masks,
        )

    def _perturbs(self, index: int, substituted: list[Tensor] | None) -> bool:
        """Whether level ``index`` swaps some parents for their children this step."""
        return (
            substituted is not None and index < self.n_levels - 1 and bool(substituted[index].any())
        )

    def _plain_reconstruction(self, index: int, codes: list[LevelCodes], fused: bool) -> Tensor:
        level = self.levels[index]
        return level.decode_columns(codes[index], None, fused) + level.b_dec

    def _constraint(self, codes: list[LevelCodes]) -> Tensor:
        total = codes[0].acts.new_zeros(())
        for index in range(self.n_levels - 1):
            total = total + parent_children_constraint(
                codes[index],
                codes[index + 1],
                self.levels[index].W_dec,
                self.levels[index + 1].W_dec,
                self.parents(index),
            )
        return total

    def _dead_feature_loss(
        self, level: JumpReLULevel, x: Tensor, residual: Tensor, dead: Tensor
    ) -> Tensor:
        """AuxK-style revival: the top dead latents (by ReLU pre-activation) fit the residual."""
        dead_index = dead.nonzero(as_tuple=True)[0]
        k = min(max(1, self.config.d_in // 2), dead_index.numel())
        pre = (x - level.b_dec.detach()) @ level.W_enc[:, dead_index] + level.b_enc[dead_index]
        values, chosen = pre.relu().topk(k, dim=1)
        fitted = nn.functional.embedding_bag(
            chosen, level.W_dec[dead_index], mode="sum", per_sample_weights=values
        )
        residual_energy = (residual - residual.mean(0)).pow(2).sum().clamp(min=1e-8)
        return (fitted - residual).pow(2).sum() / residual_energy

    @torch.no_grad()
    def normalise_decoders(self) -> None:
        for level in self.levels:
            level.normalise_decoder()

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``hsae.safetensors`` (weights, forest, scale) and ``hsae_config.json``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor for name, tensor in self.state_dict().items()}
        metadata = {"format": "hsae", "format_version": str(FORMAT_VERSION)}
        write_safetensors(folder / WEIGHTS_FILE, tensors, metadata)
        write_json(
            folder / CONFIG_FILE,
            {"format_version": FORMAT_VERSION, "config": self.config.model_dump()},
        )
        return folder


def load_hsae(path: str | Path, device: str | torch.device = "cpu") -> HSAE:
    """Load a model written by :meth:`HSAE.save` (exact round trip)."""
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"no saved HSAE at {folder}: missing {required.name}")
    payload = json.loads(config_path.read_text(encoding="utf-8"))
    config = HSAEConfig(**payload["config"])
    model = HSAE(config)
    state = load_file(str(weights_path), device=str(device))
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{weights_path} lacks tensors: {sorted(missing)}")
    model.load_state_dict(state)
    forest_ops.validate_forest(model.forest(), config.level_sizes)
    return model.to(device)


def centred_energy(x: Tensor) -> Tensor:
    """||x - batch_mean(x)||^2 per token: the denominator of variance explained."""
    return (x - x.mean(0)).pow(2).sum(-1)


def per_token_variance_explained(sq_error: Tensor, energy: Tensor) -> Tensor:
    """SAEBench legacy, per token: 1 - ||x - x_hat||^2 / ||x - batch_mean(x)||^2.

    ``sq_error`` is ||x - x_hat||^2 and ``energy`` is :func:`centred_energy` of the batch;
    average the result for the batch's value.
    """
    return 1.0 - sq_error / energy.clamp(min=1e-8)
