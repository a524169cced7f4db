"""Real activations: language models, corpora, the on-disk activation cache, harvesting and
streaming. See docs/activations.md."""

from hsae.activations.cache import (
    ActivationCache,
    ActivationReader,
    CacheError,
    TokenInfo,
)
from hsae.activations.corpora import (
    ContextBuilder,
    CorpusError,
    NounSynset,
    TextSource,
    load_noun_taxonomy,
    open_corpus,
)
from hsae.activations.harvest import (
    ActivationStream,
    HarvestConfig,
    harvest,
    stream_activations,
)
from hsae.activations.models import (
    HarvestError,
    LanguageModel,
    ModelLoadError,
    capture_residual,
    check_capture,
    decoder_layers,
    load_language_model,
    load_tokenizer,
)

__all__ = [
    "ActivationCache",
    "ActivationReader",
    "ActivationStream",
    "CacheError",
    "ContextBuilder",
    "CorpusError",
    "HarvestConfig",
    "HarvestError",
    "LanguageModel",
    "ModelLoadError",
    "NounSynset",
    "TextSource",
    "TokenInfo",
    "capture_residual",
    "check_capture",
    "decoder_layers",
    "harvest",
    "load_language_model",
    "load_noun_taxonomy",
    "load_tokenizer",
    "open_corpus",
    "stream_activations",
]
