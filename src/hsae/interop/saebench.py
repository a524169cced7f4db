"""SAEBench bridge: one HSAE level presented as a SAEBench custom SAE, and the paper's Table 1.

This module owns :class:`SAEBenchSAE` (the interface SAEBench's ``custom_saes`` README and
``BaseSAE`` ask for: ``encode``/``decode``/``forward``, ``W_enc`` [d_in, d_sae], ``W_dec``
[d_sae, d_in] with unit-norm rows, ``b_enc``, ``b_dec``, ``threshold``, ``device``, ``dtype``
and a ``cfg`` with every field of SAEBench's ``CustomSAEConfig``), :func:`saebench_saes` (the
``selected_saes`` list for a run folder), :func:`run_saebench` (SAEBench's evaluations behind
Table 1, on a GPU machine) and :func:`table1` (their numbers, HSAE beside baseline).
``sae_bench`` itself is imported only by :func:`run_saebench`.

Units. SAEBench feeds raw activations and needs unit-norm decoder rows, so the level is
rewritten with its codes in raw units: with scale c, pre_raw = pre / c, threshold_raw = theta / c,
b_dec_raw = b_dec / c, W_enc and W_dec unchanged; b_dec is folded into the encoder bias
(b_enc_raw = b_enc / c - b_dec_raw W_enc) exactly as in SAEBench's own ``JumpReluSAE``, whose
state dict this module's matches. Codes are the HSAE's codes divided by c; active sets and
reconstructions are the HSAE's. A "batchtopk" level is presented as JumpReLU with its learned
inference threshold; a "topk" level as threshold 0 followed by each token's top k
(``architecture="topk"``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hsae.interop.saelens import InteropError, Provenance, run_provenance, trained_models
from hsae.io import write_json
from hsae.model import HSAE, load_hsae

TABLE1_EVALS = ("core", "absorption", "autointerp", "ravel", "scr", "sparse_probing")
TABLE1_COLUMNS = {
    "explained_variance_legacy": ("core", ("reconstruction_quality", "explained_variance_legacy")),
    "absorption": ("absorption", ("mean", "mean_absorption_fraction_score")),
    "autointerp": ("autointerp", ("autointerp", "autointerp_score")),
    "ravel": ("ravel", ("ravel", "disentanglement_score")),
    "scr_20": ("scr", ("scr_metrics", "scr_metric_threshold_20")),
    "sparse_probing_top5": ("sparse_probing", ("sae", "sae_top_5_test_accuracy")),
}
"""Table 1 column -> (SAEBench eval, path inside ``eval_result_metrics``)."""


@dataclass
class SAEBenchConfig:
    """The fields of SAEBench's ``CustomSAEConfig``, filled from the run's provenance."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = "jumprelu"
    apply_b_dec_to_input: bool = False
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = "relu"
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = False
    """Off unless asked for (``trust_remote_code=True``): SAEBench would run the dataset's own
    Python from the Hub."""
    seqpos_slice: tuple[int | None, ...] = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SAEBenchSAE(nn.Module):
    """One HSAE level as a SAEBench custom SAE on raw activations (see the module docstring)."""

    def __init__(
        self,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        cfg: SAEBenchConfig,
        k: int | None = None,
    ):
        """``k``: keep only each token's k largest activations (a TopK level; threshold 0)."""
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(W_enc.detach().clone())
        self.b_enc = nn.Parameter(b_enc.detach().clone())
        self.W_dec = nn.Parameter(W_dec.detach().clone())
        self.b_dec = nn.Parameter(b_dec.detach().clone())
        self.threshold = nn.Parameter(threshold.detach().clone())
        self.cfg = cfg
        self.device: torch.device = self.W_enc.device
        self.dtype: torch.dtype = self.W_enc.dtype
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        self.cfg.device = str(self.device)

    @classmethod
    def from_hsae(
        cls, model: HSAE, level: int, provenance: Provenance, trust_remote_code: bool = False
    ) -> SAEBenchSAE:
        """Level ``level`` of ``model``, float32 on CPU (move it with ``.to``);
        ``trust_remote_code`` fills the cfg's ``dataset_trust_remote_code``."""
        if not 0 <= level < model.n_levels:
            raise InteropError(f"level must lie in [0, {model.n_levels - 1}], got {level}")
        c = model.activation_scale.detach().double().cpu()
        part = model.levels[level]
        exported = part.export_tensors()
        k = part.saelens_fields().get("k") if part.saelens_architecture == "topk" else None
        threshold = exported.get("threshold", torch.zeros(part.n_features))
        W_enc = part.W_enc.detach().double().cpu()
        b_dec = part.b_dec.detach().double().cpu() / c
        b_enc = part.b_enc.detach().double().cpu() / c - b_dec @ W_enc
        cfg = SAEBenchConfig(
            model_name=provenance.model_name,
            d_in=model.config.d_in,
            d_sae=model.config.level_sizes[level],
            hook_layer=provenance.layer,
            hook_name=provenance.hook_name,
            context_size=provenance.context_size,
            prepend_bos=provenance.prepend_bos,
            dataset_path=provenance.dataset_path,
            dataset_trust_remote_code=trust_remote_code,
            architecture="topk" if k is not None else "jumprelu",
        )
        return cls(
            W_enc.float(),
            b_enc.float(),
            part.W_dec.detach().float().cpu(),
            b_dec.float(),
            (threshold.detach().double().cpu() / c).float(),
            cfg,
            k,
        )

    def encode(self, x: Tensor) -> Tensor:
        pre = x.to(self.dtype) @ self.W_enc + self.b_enc
        acts = torch.relu(pre) * (pre > self.threshold)
        if self.k is None:
            return acts
        values, index = acts.topk(self.k, dim=-1)
        return torch.zeros_like(acts).scatter_(-1, index, values)

    def decode(self, feature_acts: Tensor) -> Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def to(self, *args: Any, **kwargs: Any) -> SAEBenchSAE:
        """Move or cast like ``nn.Module.to`` and keep ``device``, ``dtype`` and cfg in step."""
        super().to(*args, **kwargs)
        self.device = self.W_enc.device
        self.dtype = self.W_enc.dtype
        self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        self.cfg.device = str(self.device)
        return self

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """SAEBench's requirement: every decoder row has unit norm."""
        norms = self.W_dec.float().norm(dim=1)
        tolerance = 1e-2 if self.dtype in (torch.bfloat16, torch.float16) else 1e-5
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tolerance))


def saebench_saes(
    run_dir: str | Path,
    model_name: str | None = None,
    levels: Sequence[int] | None = None,
    trust_remote_code: bool = False,
) -> list[tuple[str, SAEBenchSAE]]:
    """SAEBench's ``selected_saes`` for a run: ``("{which}_level_{l}_{d_sae}", sae)`` pairs for
    the HSAE and, when trained, the baseline (``levels``: which levels; None: all).
    ``trust_remote_code``: let SAEBench run a dataset's loading script (off by default)."""
    folder = Path(run_dir)
    models = trained_models(folder)
    provenance = run_provenance(folder, model_name)
    selected = []
    for which in models:
        model = load_hsae(folder / which)
        for level in range(model.n_levels) if levels is None else levels:
            sae = SAEBenchSAE.from_hsae(model, level, provenance, trust_remote_code)
            selected.append((f"{which}_level_{level}_{sae.cfg.d_sae}", sae))
    return selected


def run_saebench(
    run_dir: str | Path,
    out: str | Path,
    evals: Sequence[str] = TABLE1_EVALS,
    model_name: str | None = None,
    levels: Sequence[int] | None = None,
    device: str = "cuda",
    llm_batch_size: int = 32,
    llm_dtype: str = "bfloat16",
    api_key: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Run SAEBench's evaluations on a run's levels (needs ``pip install sae-bench``, a GPU, the
    language model and datasets from the Hub; autointerp needs an OpenAI key, and is skipped
    without one) and return :func:`table1` of the results under ``out`` (also ``table1.json``).
    ``trust_remote_code=True`` lets SAEBench run a dataset's own loading code from the Hub;
    it is off unless asked for."""
    unknown = sorted(set(evals) - set(TABLE1_EVALS))
    if unknown:
        raise InteropError(f"unknown SAEBench eval(s) {unknown}; choose from {TABLE1_EVALS}")
    check_transformerlens_name(run_provenance(run_dir, model_name).model_name)
    if importlib.util.find_spec("sae_bench") is None:
        raise InteropError("SAEBench is not installed here; pip install sae-bench (see interop.md)")
    selected = saebench_saes(run_dir, model_name, levels, trust_remote_code)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(llm_dtype, torch.float32)
    selected = [(name, sae.to(device=device, dtype=dtype)) for name, sae in selected]
    name = selected[0][1].cfg.model_name
    root = Path(out)
    for eval_name in evals:
        if eval_name == "autointerp" and api_key is None:
            continue
        _run_one_eval(eval_name, name, selected, root, device, llm_batch_size, llm_dtype, api_key)
    table = table1(root)
    write_json(root / "table1.json", table)
    return table


def check_transformerlens_name(name: str) -> None:
    """Refuse, in one line and before any download, a model name TransformerLens does not know:
    SAEBench loads the language model with ``HookedTransformer.from_pretrained*(name)``, which
    accepts only TransformerLens's official names and their aliases. Nothing is checked where
    TransformerLens is not installed (SAEBench, which needs it, is then missing too)."""
    if importlib.util.find_spec("transformer_lens") is None:
        return
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise InteropError(
            f"TransformerLens does not know the model {name!r}, and SAEBench loads the model "
            "through it: pass --model-name (model_name=) with one of its official names, e.g. "
            "'google/gemma-2-2b' (transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
        ) from None


def _run_one_eval(
    eval_name: str,
    model_name: str,
    selected: list[tuple[str, Any]],
    root: Path,
    device: str,
    batch: int,
    dtype: str,
    api_key: str | None,
) -> None:
    """Call one SAEBench evaluation as its own ``run_all_evals_custom_saes`` script does."""
    common = {"model_name": model_name, "random_seed": 42}
    llm = common | {"llm_batch_size": batch, "llm_dtype": dtype}
    folder = str(root / eval_name)
    Path(folder).mkdir(parents=True, exist_ok=True)
    if eval_name == "core":
        from sae_bench.evals.core import main as core

        core.multiple_evals(
            selected_saes=selected,
            n_eval_reconstruction_batches=200,
            n_eval_sparsity_variance_batches=2000,
            eval_batch_size_prompts=16,
            compute_featurewise_density_statistics=True,
            compute_featurewise_weight_based_metrics=True,
            exclude_special_tokens_from_reconstruction=True,
            dataset="Skylion007/openwebtext",
            context_size=128,
            output_folder=folder,
            dtype=dtype,
            device=device,
        )
    elif eval_name == "absorption":
        from sae_bench.evals.absorption import main as absorption

        config = absorption.AbsorptionEvalConfig(**llm)
        absorption.run_eval(config, selected, device, folder)
    elif eval_name == "autointerp":
        from sae_bench.evals.autointerp import main as autointerp

        config = autointerp.AutoInterpEvalConfig(**llm)
        autointerp.run_eval(config, selected, device, api_key, folder)
    elif eval_name == "ravel":
        from sae_bench.evals.ravel import main as ravel

        config = ravel.RAVELEvalConfig(**(llm | {"llm_batch_size": max(1, batch // 4)}))
        ravel.run_eval(config, selected, device, folder)
    elif eval_name == "scr":
        from sae_bench.evals.scr_and_tpp import main as scr_and_tpp

        config = scr_and_tpp.ScrAndTppEvalConfig(perform_scr=True, **llm)
        scr_and_tpp.run_eval(config, selected, device, str(root), clean_up_activations=True)
    elif eval_name == "sparse_probing":
        from sae_bench.evals.sparse_probing import main as sparse_probing

        config = sparse_probing.SparseProbingEvalConfig(**llm)
        sparse_probing.run_eval(config, selected, device, folder, clean_up_activations=True)


def table1(results_dir: str | Path) -> dict[str, dict[str, dict[str, float | None]]]:
    """Table 1 from SAEBench result files under ``results_dir/{eval}/``: for each SAE name
    (``hsae_level_3_16384``, ``baseline_level_3_16384``, ...) each column's value, None where
    that eval has not been run. ``absorption`` is reported as 1 - mean absorption fraction."""
    root = Path(results_dir)
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for column, (eval_name, keys) in TABLE1_COLUMNS.items():
        for path in sorted((root / eval_name).glob("*_custom_sae_eval_results.json")):
            name = path.name.removesuffix("_custom_sae_eval_results.json")
            which = name.split("_level_")[0]
            value = _metric(path, keys)
            if column == "absorption" and value is not None:
                value = 1.0 - value
            row = table.setdefault(which, {}).setdefault(name, dict.fromkeys(TABLE1_COLUMNS))
            row[column] = value
    return table


def _metric(path: Path, keys: tuple[str, ...]) -> float | None:
    try:
        node: Any = json.loads(path.read_text(encoding="utf-8"))["eval_result_metrics"]
        for key in keys:
            node = node[key]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InteropError(f"{path} is not a SAEBench result file: {error}") from None
    return None if node is None else float(node)


def table1_markdown(table: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """:func:`table1` as a markdown table, one row per SAE, HSAE rows first."""
    columns = list(TABLE1_COLUMNS)
    lines = ["| SAE | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for which in sorted(table, key=lambda name: name != "hsae"):
        for name, row in sorted(table[which].items()):
            cells = ["n/a" if row[c] is None else f"{row[c]:.3f}" for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
