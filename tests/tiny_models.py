"""Tiny random causal LMs of many transformers architectures, built offline from config classes
(no Hub access), plus a tiny byte-level BPE tokenizer trained in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 320
HIDDEN = 32
LAYERS = 3

# Settings most decoder configs accept; each family's entry adds or renames what it needs.
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the tiny tokenizer's
_COMMON |= _IDS
_GPT2 = {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_positions": 128}
_GPT2 |= _IDS

# family -> (config class path, settings); one per architecture family the issue names, plus a
# few more (MoE, parallel-attention, bigcode) to show the search is not tuned to a list.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", _GPT2),
    "llama": ("LlamaConfig", _COMMON),
    "qwen2": ("Qwen2Config", _COMMON),
    "qwen3": ("Qwen3Config", _COMMON | {"head_dim": 8}),
    "gemma": ("GemmaConfig", _COMMON | {"head_dim": 8}),
    "gemma2": ("Gemma2Config", _COMMON | {"head_dim": 8, "sliding_window": 4}),
    "gemma3_text": ("Gemma3TextConfig", _COMMON | {"head_dim": 8, "sliding_window": 4}),
    "gemma3_multimodal": ("Gemma3Config", {}),  # built in tiny_config: text + vision configs
    "gpt_neox": ("GPTNeoXConfig", _COMMON),
    "phi": ("PhiConfig", _COMMON),
    "phi3": ("Phi3Config", _COMMON),
    "mistral": ("MistralConfig", _COMMON | {"head_dim": 8}),
    "mixtral": (
        "MixtralConfig",
        _COMMON | {"head_dim": 8, "num_local_experts": 2, "num_experts_per_tok": 1},
    ),
    "falcon": ("FalconConfig", _COMMON | {"num_kv_heads": 2, "new_decoder_architecture": True}),
    "olmo2": ("Olmo2Config", _COMMON),
    "opt": (
        "OPTConfig",
        {
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "ffn_dim": 64,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": HIDDEN,
        }
        | _IDS,
    ),
    "gptj": ("GPTJConfig", _GPT2 | {"rotary_dim": 4}),
    "bloom": (
        "BloomConfig",
        {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": LAYERS} | _IDS,
    ),
    "gpt_bigcode": ("GPTBigCodeConfig", _GPT2),
    "stablelm": ("StableLmConfig", _COMMON),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        _COMMON | {"head_dim": 8, "num_experts": 2, "num_experts_per_tok": 1},
    ),
}


def tiny_config(family: str) -> Any:
    import transformers

    name, settings = FAMILIES[family]
    if family == "gemma3_multimodal":
        text = tiny_config("gemma3_text").to_dict()
        vision = {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": LAYERS,  # as many blocks as the text model: must not confuse
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
        }
        return transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4
        )
    return getattr(transformers, name)(**settings)


def tiny_model(family: str, seed: int = 0) -> Any:
    """A random float32 model of ``family`` (eval mode), the way AutoModelForCausalLM builds it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


_TOKENIZER: Any = None


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer (vocabulary VOCAB) with <bos>, <eos> and <pad>, trained here."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=["<pad>", "<bos>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        text = "the cat sat on the mat. a dog ran in the park; birds sing at dawn. " * 20
        core.train_from_iterator([text], trainer)
        _TOKENIZER = PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
        )
    return _TOKENIZER


def save_tiny(family: str, folder: Path, seed: int = 0) -> Path:
    """A local transformers folder (model + tokenizer) that load_language_model accepts."""
    tiny_model(family, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
