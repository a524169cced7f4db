"""SAELens bridge: export HSAE levels as SAELens SAE folders, import JumpReLU folders back.

Each level is exported as the SAELens architecture its kind names
(``Level.saelens_architecture``): "jumprelu" levels as "jumprelu" SAEs, "topk" levels as
"topk" SAEs with their ``k``, "batchtopk" levels as "jumprelu" SAEs whose threshold is the
learned inference threshold (what SAELens itself saves a BatchTopK SAE as). Import reads
JumpReLU SAEs only.

This module owns the SAELens on-disk format (``cfg.json`` + ``sae_weights.safetensors``, the
SAELens 6 layout that ``sae_lens.SAE.load_from_disk`` reads), the forest sidecar written beside
the exported levels (``forest.json``, which SAELens ignores), the provenance of a run folder
(model, hook, context size, dataset) and :class:`InteropError`, the one exception every
malformed export or import raises. It never imports ``sae_lens``: the format is written and read
by hand, and the tests check it with the real package.

Scale folding. An HSAE works on ``c x`` (``c`` = the activation scale): pre = (c x - b_dec) W_enc
+ b_enc and x_hat = (a W_dec + b_dec) / c. The exported SAE works on raw ``x`` with the same
codes ``a``: W_enc' = c W_enc, b_dec' = b_dec / c, W_dec' = W_dec / c, b_enc' = b_enc,
threshold' = threshold. Import inverts this for a chosen ``c``, then (by default) folds the
decoder row norms into the encoder and threshold so decoder rows are unit-norm, the invariant
HSAE training keeps; that leaves reconstructions and active sets unchanged and scales each
feature's activation by its row norm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from hsae.config import HSAEConfig
from hsae.errors import HSAEError
from hsae.io import (
    check_output_path,
    read_json,
    staging_folder,
    swap_in,
    write_json,
    write_safetensors,
)
from hsae.layout import ACTIVATIONS_DIR, ARCHIVE_RECORD, CACHE_MANIFEST, MODEL_NAMES, RUN_FILE
from hsae.model import HSAE, load_hsae
from hsae.model import forest as forest_ops
from hsae.model.hsae import CONFIG_FILE
from hsae.model.levels import JumpReLULevel

SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
FOREST_FILE = "forest.json"
FOREST_FORMAT = "hsae-forest"
FOREST_FORMAT_VERSION = 1
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version whose format the exported ``cfg.json`` follows (6.x: fields + metadata)."""
MAX_CFG_BYTES = 1 << 20
"""A SAELens ``cfg.json`` is a few kB; a larger one is refused unread."""
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
MIN_THRESHOLD = torch.finfo(torch.float32).tiny
"""Thresholds <= 0 become this: with the ReLU SAELens applies, both give relu(pre)."""


class InteropError(HSAEError, ValueError):
    """A folder cannot be exported or imported as asked; the message names file and problem."""


@dataclass(frozen=True)
class Provenance:
    """Where a run's activations came from, in the terms SAELens and SAEBench use."""

    model_name: str
    layer: int
    context_size: int | None = None
    prepend_bos: bool = True
    dataset_path: str = ""

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "layer": self.layer,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "dataset_path": self.dataset_path,
        }


@dataclass
class SAELensWeights:
    """One SAELens JumpReLU SAE read from disk, in raw units, float32, b_dec applied to input."""

    folder: Path
    cfg: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.tensors["W_enc"].shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.tensors["W_enc"].shape[1])


# --- provenance ----------------------------------------------------------------------------


def run_provenance(run_dir: str | Path, model_name: str | None = None) -> Provenance:
    """Provenance of a run folder (or an extracted run archive); ``model_name`` overrides."""
    folder = Path(run_dir)
    manifest_path = folder / ACTIVATIONS_DIR / CACHE_MANIFEST
    archive_path = folder / ARCHIVE_RECORD
    if manifest_path.is_file():
        values = _from_manifest(_read_json_object(manifest_path))
    elif archive_path.is_file():
        values = dict(_read_json_object(archive_path).get("provenance") or {})
    elif (folder / RUN_FILE).is_file():
        values = _from_run_config(_read_json_object(folder / "run.json").get("config") or {})
    else:
        raise InteropError(f"{folder} is not a run folder (no run.json, manifest or archive.json)")
    if model_name is not None:
        values["model_name"] = model_name
    if values.get("layer") is None:
        raise InteropError(f"{folder}: the layer is unknown (no harvested activations recorded)")
    return Provenance(
        model_name=str(values.get("model_name") or "unknown"),
        layer=int(values["layer"]),
        context_size=values.get("context_size"),
        prepend_bos=bool(values.get("prepend_bos", True)),
        dataset_path=str(values.get("dataset_path") or ""),
    )


def _from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    model = manifest.get("model") or {}
    dataset = manifest.get("dataset") or {}
    return {
        "model_name": model.get("name") if isinstance(model, dict) else model,
        "layer": manifest.get("layer"),
        "context_size": manifest.get("context_length"),
        "prepend_bos": manifest.get("bos_prepended", True),
        "dataset_path": _dataset_path(dataset.get("spec"), dataset.get("kind")),
    }


def _from_run_config(config: dict[str, Any]) -> dict[str, Any]:
    from hsae.activations.models import EMBEDDED_MODEL

    return {
        "model_name": config.get("model") or EMBEDDED_MODEL,
        "layer": config.get("layer"),
        "context_size": config.get("context_length"),
        "prepend_bos": True,
        "dataset_path": _dataset_path(config.get("dataset"), None),
    }


def _dataset_path(spec: str | None, kind: str | None) -> str:
    if spec is None or kind == "builtin" or spec == "builtin":
        return "hsae:builtin-wordnet"
    return str(spec)


# --- export --------------------------------------------------------------------------------


def export_saelens(
    run_dir: str | Path,
    out: str | Path,
    model_name: str | None = None,
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Write every level of the run's HSAE (and baseline) as a SAELens SAE folder.

    Layout: ``OUT/{hsae,baseline}/level_{l}/{cfg.json,sae_weights.safetensors}`` and
    ``OUT/{hsae,baseline}/forest.json``. Returns the level folders written, per model.

    An existing non-empty ``OUT`` is refused unless ``overwrite`` (which replaces
    ``OUT/hsae`` and ``OUT/baseline`` and leaves anything else there alone); a run folder's
    own files are never written over. The export is built in a hidden staging folder and
    renamed into place when complete, so a killed export leaves no partial ``OUT``.
    """
    folder = Path(run_dir)
    models = trained_models(folder)
    provenance = run_provenance(folder, model_name)
    root = check_output_path(out, overwrite=overwrite, folder=True, runs=[folder])
    for which in models:
        check_output_path(root / which, overwrite=True, folder=True, runs=[folder])
    loaded = {which: load_hsae(folder / which) for which in models}
    written = {}
    with staging_folder(root) as stage:
        for which, model in loaded.items():
            levels = export_model_saelens(model, stage / which, provenance, which)
            written[which] = [root / which / level.name for level in levels]
        if not root.exists():
            swap_in(stage, root)
        else:
            for which in loaded:
                swap_in(stage / which, root / which)
    return written


def trained_models(run_dir: str | Path) -> list[str]:
    """Which of "hsae" and "baseline" the run folder holds; refuse a folder with neither."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InteropError(f"{folder} does not exist or is not a folder")
    models = [which for which in MODEL_NAMES if (folder / which / CONFIG_FILE).is_file()]
    if not models:
        raise InteropError(f"{folder} holds no trained model (no hsae/{CONFIG_FILE})")
    return models


def export_model_saelens(
    model: HSAE, out: str | Path, provenance: Provenance, which: str = "hsae"
) -> list[Path]:
    """Write each level of ``model`` to ``out/level_{l}`` and its forest to ``out/forest.json``."""
    root = Path(out)
    folders = []
    for level in range(model.n_levels):
        target = root / f"level_{level}"
        weights = saelens_tensors(model, level)
        write_safetensors(target / SAE_WEIGHTS_FILE, weights)
        write_json(target / SAE_CFG_FILE, saelens_cfg(model, level, provenance, which))
        folders.append(target)
    write_json(root / FOREST_FILE, forest_sidecar(model, [f.name for f in folders], which))
    return folders


def saelens_tensors(model: HSAE, level: int) -> dict[str, Tensor]:
    """The level's weights (``Level.export_tensors``) folded into raw units (module docstring):
    W_enc times c, W_dec and b_dec divided by c, the others (b_enc, threshold) unchanged."""
    c = model.activation_scale.detach().float().cpu()
    tensors = {}
    for name, tensor in model.levels[level].export_tensors().items():
        value = tensor.detach().float().cpu()
        if name == "W_enc":
            value = value * c
        elif name in ("W_dec", "b_dec"):
            value = value / c
        tensors[name] = value.contiguous().clone()
    return tensors


def saelens_cfg(model: HSAE, level: int, provenance: Provenance, which: str) -> dict[str, Any]:
    """A SAELens 6 ``cfg.json`` for one level, with HSAE details under ``metadata.hsae``."""
    from hsae import __version__

    part = model.levels[level]
    return {
        "architecture": part.saelens_architecture,
        **part.saelens_fields(),
        "d_in": model.config.d_in,
        "d_sae": model.config.level_sizes[level],
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": provenance.model_name,
            "hook_name": provenance.hook_name,
            "hook_layer": provenance.layer,
            "hook_head_index": None,
            "context_size": provenance.context_size,
            "prepend_bos": provenance.prepend_bos,
            "dataset_path": provenance.dataset_path,
            "model_from_pretrained_kwargs": {},
            "hsae": {
                "hsae_version": __version__,
                "model": which,
                "mode": model.config.mode,
                "level_kind": model.config.level,
                "level": level,
                "level_sizes": list(model.config.level_sizes),
                "activation_scale": model.scale,
                "forest_file": f"../{FOREST_FILE}",
            },
        },
    }


def forest_sidecar(model: HSAE, level_folders: list[str], which: str) -> dict[str, Any]:
    """``parents[l][j]``: index in level l of the parent of level-(l+1) feature j (-1: none)."""
    return {
        "format": FOREST_FORMAT,
        "format_version": FOREST_FORMAT_VERSION,
        "model": which,
        "mode": model.config.mode,
        "similarity": model.config.similarity,
        "levels": level_folders,
        "level_sizes": list(model.config.level_sizes),
        "activation_scale": model.scale,
        "parents": [links.cpu().tolist() for links in model.forest()],
    }


# --- import --------------------------------------------------------------------------------


def read_saelens(folder: str | Path) -> SAELensWeights:
    """Read and check a SAELens JumpReLU SAE folder; raise :class:`InteropError` if unusable."""
    root = Path(folder)
    cfg = _read_cfg(root)
    tensors = _read_tensors(root)
    _check_cfg_and_shapes(root, cfg, tensors)
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x W_enc + b_enc equals (x - b_dec) W_enc + (b_enc + b_dec W_enc).
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    return SAELensWeights(folder=root, cfg=cfg, tensors=tensors)


def _read_cfg(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise InteropError(f"{root} is not a folder")
    path = root / SAE_CFG_FILE
    if not path.is_file():
        raise InteropError(f"{root} is not a SAELens SAE folder: missing {SAE_CFG_FILE}")
    cfg = _read_json_object(path, MAX_CFG_BYTES)
    architecture = cfg.get("architecture", "standard")
    if architecture != "jumprelu":
        raise InteropError(
            f"{path}: architecture is {architecture!r}; only 'jumprelu' SAEs can be imported"
        )
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise InteropError(
            f"{path}: normalize_activations is {normalize!r}; fold the normalisation into the "
            "weights first (SAELens: fold_activation_norm_scaling_factor) or export it with 'none'"
        )
    return cfg


def _read_tensors(root: Path) -> dict[str, Tensor]:
    path = root / SAE_WEIGHTS_FILE
    if not path.is_file():
        raise InteropError(f"{root} is not a SAELens SAE folder: missing {SAE_WEIGHTS_FILE}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InteropError(f"{path} is not a readable safetensors file: {error}") from None
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.allclose(
        scaling.float(), torch.ones_like(scaling.float())
    ):
        raise InteropError(f"{path}: a fine-tuning scaling_factor other than 1 is not supported")
    missing = [name for name in TENSOR_NAMES if name not in state]
    if missing:
        raise InteropError(f"{path} lacks tensor(s) {', '.join(missing)}")
    extra = sorted(set(state) - set(TENSOR_NAMES))
    if extra:
        raise InteropError(f"{path} has tensors a JumpReLU SAE does not: {', '.join(extra)}")
    return {name: state[name].float() for name in TENSOR_NAMES}


def _check_cfg_and_shapes(root: Path, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not isinstance(d_in, int) or not isinstance(d_sae, int) or d_in < 1 or d_sae < 1:
        raise InteropError(f"{root / SAE_CFG_FILE}: d_in and d_sae must be positive integers")
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InteropError(
                f"{root / SAE_WEIGHTS_FILE}: {name} has shape {tuple(tensors[name].shape)}, "
                f"expected {shape} for d_in={d_in}, d_sae={d_sae}"
            )
        if not bool(torch.isfinite(tensors[name]).all()):
            raise InteropError(f"{root / SAE_WEIGHTS_FILE}: {name} holds NaN or inf")


def level_from_saelens(
    sae: SAELensWeights, activation_scale: float = 1.0, fold_decoder_norms: bool = True
) -> JumpReLULevel:
    """An HSAE level (in units scaled by ``activation_scale``) equivalent to ``sae`` on raw x."""
    c = float(activation_scale)
    if not c > 0.0 or c == float("inf"):
        raise InteropError(f"activation_scale must be a finite number > 0, got {activation_scale}")
    t = sae.tensors
    W_enc, b_enc, threshold = t["W_enc"] / c, t["b_enc"].clone(), t["threshold"].clamp(min=0)
    W_dec, b_dec = t["W_dec"] * c, t["b_dec"] * c
    if fold_decoder_norms:
        norms = W_dec.norm(dim=1).clamp(min=1e-8)
        W_dec, W_enc = W_dec / norms[:, None], W_enc * norms
        b_enc, threshold = b_enc * norms, threshold * norms
    level = JumpReLULevel(sae.d_in, sae.d_sae)
    with torch.no_grad():
        level.W_enc.copy_(W_enc)
        level.b_enc.copy_(b_enc)
        level.W_dec.copy_(W_dec)
        level.b_dec.copy_(b_dec)
        level.log_threshold.copy_(threshold.clamp(min=MIN_THRESHOLD).log())
    return level


def forest_from_saelens(
    folders: list[str | Path],
    similarity: str = "encoder",
    activation_scale: float = 1.0,
    fold_decoder_norms: bool = True,
    **config: Any,
) -> HSAE:
    """An HSAE whose levels are the given SAELens JumpReLU SAEs (smallest first) and whose
    forest is built post hoc with :func:`hsae.model.forest.rebuild_forest`.

    ``config`` takes further :class:`hsae.HSAEConfig` settings (``tree``,
    ``unassigned_quantile``, ``target_l0``, training settings for continuing with
    ``Trainer(..., initialise_from_data=False)``).
    """
    if similarity in ("coactivation", "conditional"):
        raise InteropError(
            f"similarity={similarity!r} needs firing statistics from training; use 'encoder' "
            "or 'decoder' here"
        )
    saes = [read_saelens(folder) for folder in folders]
    model = _assemble(saes, activation_scale, fold_decoder_norms, similarity=similarity, **config)
    cfg = model.training_config
    assert cfg is not None  # _assemble records the settings it was given
    links = forest_ops.rebuild_forest(
        list(model.levels),
        cfg.similarity,
        cfg.effective_quantile,
        2 if cfg.tree == "binary" else None,
    )
    for level, level_links in enumerate(links):
        model.set_parents(level, level_links)
    return model


def load_saelens_export(folder: str | Path) -> HSAE:
    """The HSAE written by :func:`export_model_saelens` (levels + forest.json), round trip."""
    root = Path(folder)
    sidecar = _read_json_object(root / FOREST_FILE) if (root / FOREST_FILE).is_file() else None
    if sidecar is None or sidecar.get("format") != FOREST_FORMAT:
        raise InteropError(f"{root} holds no {FOREST_FILE} written by hsae export")
    saes = [read_saelens(root / name) for name in sidecar.get("levels", [])]
    model = _assemble(
        saes,
        float(sidecar["activation_scale"]),
        True,
        mode=sidecar.get("mode", "hsae"),
        similarity=sidecar.get("similarity", "encoder"),
    )
    try:
        parents = [torch.as_tensor(links, dtype=torch.long) for links in sidecar["parents"]]
        forest_ops.validate_forest(parents, model.config.level_sizes)
    except (KeyError, TypeError, ValueError) as error:
        raise InteropError(f"{root / FOREST_FILE}: malformed forest: {error}") from None
    for level, links in enumerate(parents):
        model.set_parents(level, links)
    return model


def _assemble(
    saes: list[SAELensWeights], activation_scale: float, fold: bool, **settings: Any
) -> HSAE:
    if not saes:
        raise InteropError("no SAELens folders given")
    widths = {sae.d_in for sae in saes}
    if len(widths) != 1:
        raise InteropError(f"the SAEs have different d_in ({sorted(widths)}); they must share one")
    sizes = [sae.d_sae for sae in saes]
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise InteropError(f"give the SAEs from smallest to largest d_sae, got sizes {sizes}")
    settings.setdefault("target_l0", min(50.0, float(sizes[0])))
    config = HSAEConfig(
        d_in=saes[0].d_in, level_sizes=sizes, activation_scale=activation_scale, **settings
    )
    model = HSAE(config)
    model.training_config = config  # the settings for building its forest or training on
    with torch.no_grad():
        for index, sae in enumerate(saes):
            imported = level_from_saelens(sae, activation_scale, fold)
            model.levels[index].load_state_dict(imported.state_dict())
        model.activation_scale.fill_(activation_scale)
    return model


def save_model_folder(model: HSAE, out: str | Path, overwrite: bool = False) -> Path:
    """``model.save(out)`` for a new folder: refuse a folder already holding a model (unless
    ``overwrite``), a non-empty one, a file, or a run folder's own model folder; a new folder
    is built beside ``out`` and renamed into place once complete."""
    target = check_model_out(out, overwrite)
    if target.exists():
        return model.save(target)  # overwrite: each file atomic, the checksummed config last
    with staging_folder(target) as stage:
        model.save(stage)
        swap_in(stage, target)
    return target


def check_model_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse ``out`` as a model folder to write (see :func:`save_model_folder`)."""
    target = Path(out)
    if (target / CONFIG_FILE).exists() and not overwrite:
        raise InteropError(
            f"{target} already holds a saved model; choose another --out or pass --overwrite"
        )
    return check_output_path(target, overwrite=overwrite, folder=True)


def _read_json_object(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise InteropError(f"{path} is larger than {max_bytes} bytes; refusing to read it")
    try:
        payload = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise InteropError(f"{path} is not valid JSON: {reason}") from None
    if not isinstance(payload, dict):
        raise InteropError(f"{path} must hold a JSON object")
    return payload
