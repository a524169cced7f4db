"""Labelled contexts for the probing-style evaluations, and their language-model activations.

This module owns the data that sparse probing (:mod:`hsae.evaluation.probing`) and taxonomy
alignment (:mod:`hsae.evaluation.taxonomy`) share, so the language model runs once per
evaluation:

* :func:`wordnet_contexts`: noun contexts from the shipped WordNet data, labelled with their
  synset id and lexicographer category ("noun.animal", "noun.artifact", ...), capped per category
  with a seed.
* :func:`text_contexts` / :func:`hf_contexts`: any labelled (text, label) set, read at the last
  token (the latter streams a Hugging Face dataset; it needs the network and ``datasets``).
* :func:`prepare_contexts` / :func:`prepare_lexicon`: one LM pass, keeping one activation row per
  context, in raw units.

Which line is which synset: the shipped corpus holds one line "lemma: gloss" per synset of every
part of speech, without ids. A line is taken as a noun synset only when it is exact: its lemma
heads exactly one corpus line and is the first lemma of exactly one noun synset (then no verb or
adjective line can share it). That keeps 56,542 of the 82,115 noun synsets.

The prompt is ``template`` filled with the lemma and the gloss (without WordNet's quoted usage
examples); the activation is read at the last token of the lemma's last occurrence. The default
"{gloss}: {lemma}" puts the definition first, so the causal model has seen what the word means
when it reaches the word (with the corpus order "lemma: gloss" the lemma's last token would see
the bare lemma only).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from hsae.activations.corpora import (
    NounSynset,
    load_noun_taxonomy,
    open_corpus,
    parse_hf_spec,
)
from hsae.activations.models import HarvestError, LanguageModel
from hsae.activations.prompts import activations_at, encode_prompts
from hsae.errors import HSAEError
from hsae.io import read_bundle, write_bundle

DEFAULT_TEMPLATE = "{gloss}: {lemma}"
BUNDLE = "lexicon_data"


class LexiconError(HSAEError, ValueError):
    """Bad settings or data for the labelled contexts (unknown class, template, too few items)."""


@dataclass(frozen=True)
class LexiconSettings:
    """How the WordNet contexts are chosen and phrased."""

    per_class: int = 200
    """At most this many contexts per lexicographer category."""
    min_per_class: int = 50
    """Categories with fewer usable synsets are left out (unless named in ``lexnames``)."""
    lexnames: tuple[str, ...] | None = None
    """Categories to keep, e.g. ("noun.animal", "noun.food"); None: every large enough one."""
    template: str = DEFAULT_TEMPLATE
    """Prompt with "{lemma}" (required) and optionally "{gloss}"."""
    seed: int = 0
    batch_size: int = 64


@dataclass(frozen=True)
class LabelledContext:
    """One prompt: ``text``, whose activation is read at the last token of ``prefix`` (a prefix
    of ``text``), with its class ``label``; ``synset_id`` and ``lemma`` for WordNet contexts."""

    text: str
    prefix: str
    label: str
    synset_id: str = ""
    lemma: str = ""


@dataclass
class LexiconData:
    """Activations [n, d_model] (raw units) of labelled contexts, with integer ``labels`` [n]
    indexing ``class_names``."""

    activations: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    contexts: tuple[LabelledContext, ...]
    layer: int
    dropped: int = 0
    """Contexts whose prefix did not tokenise as a prefix of the text (left out)."""

    def __post_init__(self) -> None:
        n = len(self.contexts)
        if self.activations.shape[0] != n or self.labels.shape != (n,):
            raise LexiconError(
                f"{n} contexts but activations {tuple(self.activations.shape)} and labels "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.contexts)

    @property
    def synset_ids(self) -> list[str]:
        return [context.synset_id for context in self.contexts]

    def save(self, folder: str | Path) -> Path:
        """Write ``lexicon_data.safetensors`` and ``lexicon_data.json`` into ``folder``."""
        tensors = {"activations": self.activations, "labels": self.labels}
        meta = {
            "class_names": list(self.class_names),
            "contexts": [asdict(context) for context in self.contexts],
            "layer": self.layer,
            "dropped": self.dropped,
        }
        return write_bundle(folder, BUNDLE, tensors, meta)

    @classmethod
    def load(cls, folder: str | Path) -> LexiconData:
        bundle = read_bundle(folder, BUNDLE)
        if bundle is None:
            raise LexiconError(f"{folder} holds no {BUNDLE}.json")
        tensors, meta = bundle
        return cls(
            activations=tensors["activations"],
            labels=tensors["labels"],
            class_names=tuple(meta["class_names"]),
            contexts=tuple(LabelledContext(**context) for context in meta["contexts"]),
            layer=int(meta["layer"]),
            dropped=int(meta["dropped"]),
        )

    def describe(self) -> dict[str, object]:
        """Sizes for a JSON report: contexts, per-class counts, layer, dropped."""
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return {
            "contexts": len(self),
            "layer": self.layer,
            "dropped": self.dropped,
            "per_class": dict(zip(self.class_names, counts, strict=True)),
        }


# --------------------------------------------------------------------------- WordNet contexts


def _clean_lemma(lemma: str) -> str:
    return lemma.split("(")[0].replace("_", " ")


def _definition(gloss: str) -> str:
    """The gloss without WordNet's quoted usage examples ('...; "example"')."""
    return gloss.split('; "')[0].strip()


def exact_noun_lines(
    corpus: Iterable[str], taxonomy: Mapping[str, NounSynset]
) -> dict[str, tuple[str, str]]:
    """Synset id -> (lemma, gloss) for the corpus lines that identify one noun synset exactly."""
    glosses: dict[str, list[str]] = defaultdict(list)
    for line in corpus:
        lemma, sep, gloss = line.partition(": ")
        if sep:
            glosses[lemma].append(gloss)
    heads: dict[str, list[str]] = defaultdict(list)
    for synset in taxonomy.values():
        heads[_clean_lemma(synset.lemmas[0])].append(synset.synset_id)
    return {
        ids[0]: (lemma, glosses[lemma][0])
        for lemma, ids in heads.items()
        if len(ids) == 1 and len(glosses.get(lemma, ())) == 1
    }


def render(template: str, lemma: str, gloss: str) -> tuple[str, str]:
    """(text, prefix): the filled template and its part up to the end of the last lemma."""
    if "{lemma}" not in template:
        raise LexiconError(f"template {template!r} has no {{lemma}} placeholder")
    head, _, tail = template.rpartition("{lemma}")
    prefix = (head + "{lemma}").format(lemma=lemma, gloss=_definition(gloss))
    return prefix + tail.format(lemma=lemma, gloss=_definition(gloss)), prefix


def wordnet_contexts(
    settings: LexiconSettings | None = None,
    taxonomy: Mapping[str, NounSynset] | None = None,
    corpus: Iterable[str] | None = None,
) -> list[LabelledContext]:
    """Noun contexts labelled with their lexicographer category, at most ``per_class`` each,
    chosen with ``seed``; grouped by category in sorted order."""
    settings = settings or LexiconSettings()
    taxonomy = taxonomy if taxonomy is not None else load_noun_taxonomy()
    lines = exact_noun_lines(corpus if corpus is not None else open_corpus(None), taxonomy)
    by_class: dict[str, list[str]] = defaultdict(list)
    for synset_id in sorted(lines):
        by_class[taxonomy[synset_id].lexname].append(synset_id)
    rng = random.Random(settings.seed)
    contexts: list[LabelledContext] = []
    for lexname in _chosen_classes(by_class, settings):
        chosen = rng.sample(by_class[lexname], min(settings.per_class, len(by_class[lexname])))
        for synset_id in sorted(chosen):
            lemma, gloss = lines[synset_id]
            text, prefix = render(settings.template, lemma, gloss)
            contexts.append(LabelledContext(text, prefix, lexname, synset_id, lemma))
    return contexts


def _chosen_classes(by_class: Mapping[str, list[str]], settings: LexiconSettings) -> list[str]:
    if settings.lexnames is None:
        return sorted(c for c, ids in by_class.items() if len(ids) >= settings.min_per_class)
    unknown = [c for c in settings.lexnames if c not in by_class]
    if unknown:
        raise LexiconError(f"no usable synsets for {unknown}; known: {sorted(by_class)}")
    return sorted(settings.lexnames)


# --------------------------------------------------------------------------- other labelled text


def text_contexts(texts: Sequence[str], labels: Sequence[str]) -> list[LabelledContext]:
    """Generic labelled texts, each read at its last token."""
    if len(texts) != len(labels):
        raise LexiconError(f"{len(texts)} texts but {len(labels)} labels")
    return [LabelledContext(t, t, str(y)) for t, y in zip(texts, labels, strict=True)]


def hf_contexts(
    spec: str,
    *,
    text_field: str = "text",
    label_field: str = "label",
    per_class: int = 200,
    scan: int = 20000,
    max_chars: int = 1000,
    seed: int = 0,
) -> list[LabelledContext]:
    """Labelled texts from a Hugging Face dataset "NAME[:CONFIG][@SPLIT]" (needs the network and
    the optional ``datasets`` package): the first ``scan`` records, cut to ``max_chars``, then at
    most ``per_class`` per label chosen with ``seed``. Texts are read at their last token
    (SAEBench mean-pools over the tokens instead)."""
    try:
        import datasets
    except ImportError as exc:
        raise LexiconError("hf_contexts needs the optional `datasets` package") from exc
    name, config, split = parse_hf_spec(spec)
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    by_label: dict[str, list[str]] = defaultdict(list)
    for record in stream.take(scan):
        text, label = record.get(text_field), record.get(label_field)
        if isinstance(text, str) and text.strip() and label is not None:
            by_label[str(label)].append(text[:max_chars])
    if not by_label:
        raise LexiconError(f"{spec}: no records with fields {text_field!r} and {label_field!r}")
    rng = random.Random(seed)
    texts, labels = [], []
    for label in sorted(by_label):
        chosen = rng.sample(by_label[label], min(per_class, len(by_label[label])))
        texts += chosen
        labels += [label] * len(chosen)
    return text_contexts(texts, labels)


# --------------------------------------------------------------------------- activations


def locate(
    lm: LanguageModel, contexts: Sequence[LabelledContext]
) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids, read positions and indices of the contexts whose prefix tokenises as a prefix
    of their text (others are left out: a token straddles the boundary)."""
    for i, context in enumerate(contexts):
        if not context.text.startswith(context.prefix):
            raise LexiconError(f"context {i}: prefix {context.prefix!r} does not start its text")
    full = encode_prompts(lm, [c.text for c in contexts])
    heads = encode_prompts(lm, [c.prefix for c in contexts])
    kept = [i for i, (f, h) in enumerate(zip(full, heads, strict=True)) if h and f[: len(h)] == h]
    return [full[i] for i in kept], [len(heads[i]) - 1 for i in kept], kept


def prepare_contexts(
    lm: LanguageModel,
    layer: int,
    contexts: Sequence[LabelledContext],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> LexiconData:
    """Run the LM once over ``contexts``; keep one activation row per context."""
    if not contexts:
        raise LexiconError("no contexts to run")
    if not 0 <= layer < lm.n_layers:
        raise HarvestError(f"layer must lie in [0, {lm.n_layers - 1}], got {layer}")
    prompts, positions, kept = locate(lm, contexts)
    if not kept:
        raise LexiconError("no context could be located in its own tokenisation")
    chosen = tuple(contexts[i] for i in kept)
    class_names = tuple(sorted({c.label for c in chosen}))
    index = {name: i for i, name in enumerate(class_names)}
    rows = activations_at(lm, layer, prompts, positions, batch_size, progress)
    labels = torch.tensor([index[c.label] for c in chosen], dtype=torch.long)
    return LexiconData(rows, labels, class_names, chosen, layer, len(contexts) - len(kept))


def prepare_lexicon(
    lm: LanguageModel,
    layer: int,
    *,
    settings: LexiconSettings | None = None,
    progress: bool = True,
) -> LexiconData:
    """WordNet noun contexts (:func:`wordnet_contexts`) and their activations after ``layer``."""
    settings = settings or LexiconSettings()
    contexts = wordnet_contexts(settings)
    return prepare_contexts(lm, layer, contexts, batch_size=settings.batch_size, progress=progress)
