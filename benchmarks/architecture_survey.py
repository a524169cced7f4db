"""Which causal-LM architectures hsae can harvest from: every model type in transformers'
AutoModelForCausalLM mapping, offline, no weights downloaded.

    python benchmarks/architecture_survey.py [--json benchmarks/results/architectures.json]

Two checks per architecture:

1. structure: the model is built on the meta device from its default config (full size, no
   memory) and ``decoder_layers`` must find its block list;
2. capture: a shrunken version (hidden 64, 3 blocks, vocabulary 512, ... where the config has
   such fields) is built on the CPU with random weights, and the residual captured after blocks
   0 and 1 must equal ``output_hidden_states[1]`` and ``[2]`` exactly. A config that cannot be
   shrunk this generic way is reported as "not built", not as a failure of hsae.
"""

from __future__ import annotations

import argparse
import time
import warnings
from types import SimpleNamespace
from typing import Any

import torch

from hsae.activations.models import (
    LanguageModel,
    capture_residual,
    check_capture,
    decoder_layers,
)
from hsae.errors import HSAEError

MAX_PARAMETERS = 20_000_000  # a config the generic shrinking leaves larger is skipped
SMALL = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "num_hidden_layers": 3,
    "n_layer": 3,
    "num_layers": 3,
    "decoder_layers": 3,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "word_embed_proj_dim": 64,
    "moe_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "rotary_dim": 8,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def _structure(model_type: str) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:
        return {"structure": "not built", "why": _short(error)}
    try:
        blocks = decoder_layers(model)
    except Exception as error:
        return {"structure": "not found", "class": type(model).__name__, "why": _short(error)}
    path = next(name for name, module in model.named_modules() if module is blocks)
    return {"structure": "found", "class": type(model).__name__, "blocks": path, "n": len(blocks)}


def _capture(model_type: str) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
        small = {k: v for k, v in SMALL.items() if k in defaults}
        for key, sub in defaults.items():  # composite configs: shrink text/vision/... parts too
            if isinstance(sub, dict) and "model_type" in sub:
                small[key] = sub | {k: v for k, v in SMALL.items() if k in sub}
        config = AutoConfig.for_model(model_type, **small)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return {"capture": "not built", "why": f"{size / 1e6:.0f}M parameters after shrinking"}
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        blocks = decoder_layers(model)
        if len(blocks) < 2:
            return {"capture": "not built", "why": f"{len(blocks)} block(s) after shrinking"}
        vocab = int(getattr(model.config.get_text_config(), "vocab_size", 512) or 512)
        ids = torch.randint(3, max(4, min(vocab, 512)), (2, 8))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            hidden = model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
        states = hidden.hidden_states
    except Exception as error:
        return {"capture": "not built", "why": _short(error)}
    ids_only = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    lm = LanguageModel(
        model, ids_only, model_type, states[0].shape[-1], len(blocks), torch.device("cpu"),
        torch.float32,
    )  # fmt: skip
    try:
        check_capture(lm, 0)
        probe = "accepted"
    except HSAEError as error:
        probe = f"refused: {error}"
    matches = []  # for each captured block, the hidden_states entries it equals exactly
    try:
        for layer in (0, 1):
            captured = capture_residual(lm, ids, mask, layer)
            matches.append(
                [k for k, state in enumerate(states) if state.shape == captured.shape
                 and torch.equal(captured, state)]
            )  # fmt: skip
    except Exception as error:
        return {"capture": "error", "why": _short(error)}
    if all(layer + 1 in found for layer, found in enumerate(matches)):
        return {"capture": "equal", "probe": probe}
    if all(found for found in matches):
        shifted = ", ".join(f"block {i} = hidden_states{found}" for i, found in enumerate(matches))
        why = f"{len(states)} states; {shifted}"
        return {"capture": "equal, other index", "why": why, "probe": probe}
    why = f"{len(states)} hidden states for {len(blocks)} blocks"
    return {"capture": "differs", "why": why, "probe": probe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the per-architecture results here")
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    args = parser.parse_args()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.only:
        types = [t for t in types if t in args.only.split(",")]
    results = {}
    start = time.perf_counter()
    for model_type in types:
        results[model_type] = _structure(model_type) | _capture(model_type)
        row = results[model_type]
        probe = row.get("probe", "-")[:8]
        print(
            f"{model_type:26s} {row['structure']:10s} {row['capture']:19s} {probe:9s}"
            f"{row.get('why', '')}"
        )
    counts: dict[str, dict[str, int]] = {"structure": {}, "capture": {}, "probe": {}}
    for row in results.values():
        for check in counts:
            outcome = row.get(check, "not run").split(":")[0]
            counts[check][outcome] = counts[check].get(outcome, 0) + 1
    print(f"\n{len(types)} architectures (transformers {transformers.__version__}), "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    for check, by_outcome in counts.items():
        print(f"{check}: " + ", ".join(f"{k} {v}" for k, v in sorted(by_outcome.items())))
    if args.json:
        from hsae.io import write_json

        write_json(args.json, {"transformers": transformers.__version__, "results": results})


if __name__ == "__main__":
    main()
