"""Feature absorption on first-letter spelling (Chanin et al. 2024, as SAEBench scores it).

This module owns the whole metric (docs/absorption.md):

* the language-model side, done once per run (:func:`prepare_absorption`): a vocabulary of
  single-token words, one in-context spelling prompt per word, the residual stream at the word
  token, a train/test split and a logistic-regression first-letter probe on raw activations;
* the SAE side, per level (:func:`absorption_metrics`): k-sparse probing over the latents finds
  each letter's main latent(s) (several when the F1 keeps jumping: feature splitting), then for
  every test word the probe classifies correctly, :func:`word_absorption` measures how much of
  the probe projection is carried by other, probe-aligned latents instead of the main ones.

The reported score is ``1 - mean absorption fraction`` (higher is better, as in the paper).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from torch import Tensor
from tqdm.auto import tqdm

from hsae.activations.models import LanguageModel, model_description, validate_layer
from hsae.activations.prompts import activations_at, encode_prompts
from hsae.errors import HSAEError
from hsae.io import read_bundle, write_bundle
from hsae.model import HSAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SILENT = 1e-8
"""A main latent whose code is below this is silent (full absorption needs all of them silent)."""

# Word-start markers of SentencePiece ("▁dog") and byte-level BPE ("Ġdog") vocabularies.
BUNDLE = "absorption_data"
_WORD_TOKEN = re.compile(r"^[\u2581\u0120]([a-z]+)$")


class AbsorptionError(HSAEError, ValueError):
    """Invalid absorption settings, or data the metric cannot be computed on."""


@dataclass(frozen=True)
class AbsorptionSettings:
    """The language-model side: vocabulary, prompts, split and ground-truth probe."""

    n_words: int = 3000
    """Words sampled from the pool (all of them when the pool is smaller)."""
    vocab_pool: int | None = 20000
    """Candidates kept before sampling: the lowest token ids (roughly the most frequent
    merges), None for every candidate. Gemma's 262k vocabulary is mostly rare fragments."""
    min_word_length: int = 2
    min_words_per_letter: int = 20
    """Letters with fewer sampled words are dropped (their words too)."""
    test_fraction: float = 0.2
    icl_examples: int = 10
    """In-context examples before the word (SAEBench: 10), drawn from the same split."""
    template: str = "{word} has the first letter:"
    """One example; each in-context example is followed by its answer (" D")."""
    separator: str = "\n"
    probe_c: float = 10.0
    """Inverse L2 strength of the ground-truth probe (on centred activations of unit mean
    norm)."""
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        _require(self.n_words >= 2, f"n_words must be >= 2, got {self.n_words}")
        _require(
            self.vocab_pool is None or self.vocab_pool >= 2,
            f"vocab_pool must be >= 2 or None, got {self.vocab_pool}",
        )
        _require(self.min_word_length >= 1, "min_word_length must be >= 1")
        _require(self.min_words_per_letter >= 2, "min_words_per_letter must be >= 2")
        _require(
            0.0 < self.test_fraction < 1.0,
            f"test_fraction must lie in (0, 1), got {self.test_fraction}",
        )
        _require(self.icl_examples >= 0, "icl_examples must be >= 0")
        _require(
            self.template.count("{word}") == 1,
            f"template must contain '{{word}}' exactly once, got {self.template!r}",
        )
        _require(self.probe_c > 0, f"probe_c must be > 0, got {self.probe_c}")
        _require(self.batch_size >= 1, "batch_size must be >= 1")


@dataclass(frozen=True)
class AbsorptionCriteria:
    """The SAE side: k-sparse probing and the absorption thresholds (SAEBench defaults)."""

    max_k: int = 10
    f1_jump: float = 0.03
    """A k-sparse probe whose test F1 beats the best smaller k by more than this adds a main
    latent (feature splitting); the first k that does not stops the search."""
    min_probe_f1: float = 0.6
    """Letters whose ground-truth probe has a lower test F1 are not scored."""
    min_letters: int = 20
    """Fewer scored letters than this marks the result unreliable (SAEBench refuses to run)."""
    l1_decay: float = 0.01
    l1_steps: int = 300
    l1_lr: float = 0.01
    absorber_cos: float = 0.1
    """A latent can absorb only if its decoder's cosine with the probe is at least this."""
    max_absorbers: int = 3
    projection_share: float = 0.4
    """Absorbers must carry at least this share of the word's probe projection."""
    full_absorption_cos: float = 0.025
    subtract_decoder_bias: bool = False
    """False (SAEBench): project the raw x on the probe. True: project x - b_dec, the part the
    latents reconstruct, so the constant offset b_dec . p (it differs per letter) does not
    shift the thresholds (docs/absorption.md)."""

    def __post_init__(self) -> None:
        _require(self.max_k >= 1, f"max_k must be >= 1, got {self.max_k}")
        _require(self.f1_jump >= 0, "f1_jump must be >= 0")
        _require(0.0 <= self.min_probe_f1 <= 1.0, "min_probe_f1 must lie in [0, 1]")
        _require(self.min_letters >= 1, "min_letters must be >= 1")
        _require(self.l1_decay >= 0 and self.l1_lr > 0, "l1_decay >= 0 and l1_lr > 0")
        _require(self.l1_steps >= 1, "l1_steps must be >= 1")
        _require(self.max_absorbers >= 1, "max_absorbers must be >= 1")
        _require(0.0 < self.projection_share <= 1.0, "projection_share must lie in (0, 1]")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AbsorptionError(message)


# --- data: words, activations and the ground-truth probe -----------------------------------


@dataclass
class AbsorptionData:
    """Everything the metric needs from the language model; SAE-independent, reusable."""

    layer: int
    letters: list[str]
    train_words: list[str]
    test_words: list[str]
    train_x: Tensor
    """[n_train, d_model] raw residual stream at the word token."""
    test_x: Tensor
    train_labels: Tensor
    """Index into ``letters`` of each word's first letter."""
    test_labels: Tensor
    probe_weight: Tensor
    """[n_letters, d_model] one-vs-rest logistic probe, in raw activation units."""
    probe_bias: Tensor
    probe_accuracy: float
    """Test accuracy of the argmax over letters."""
    probe_f1: list[float]
    """Test F1 of each letter's probe (positive when its logit is > 0)."""
    settings: AbsorptionSettings = field(default_factory=AbsorptionSettings)
    model: dict[str, Any] = field(default_factory=dict)

    def probe_logits(self, x: Tensor) -> Tensor:
        return x @ self.probe_weight.T + self.probe_bias

    def save(self, folder: str | Path) -> Path:
        """Write ``absorption_data.safetensors`` and ``absorption_data.json`` into ``folder``."""
        names = ("train_x", "test_x", "train_labels", "test_labels", "probe_weight", "probe_bias")
        meta = {
            "layer": self.layer,
            "letters": self.letters,
            "train_words": self.train_words,
            "test_words": self.test_words,
            "probe_accuracy": self.probe_accuracy,
            "probe_f1": self.probe_f1,
            "settings": asdict(self.settings),
            "model": self.model,
        }
        return write_bundle(folder, BUNDLE, {name: getattr(self, name) for name in names}, meta)

    @classmethod
    def load(cls, folder: str | Path) -> AbsorptionData:
        bundle = read_bundle(folder, BUNDLE)
        if bundle is None:
            raise AbsorptionError(f"{folder} holds no {BUNDLE}.json")
        tensors, meta = bundle
        meta["settings"] = AbsorptionSettings(**meta["settings"])
        return cls(**meta, **tensors)


def first_letter_vocabulary(tokenizer: Any, settings: AbsorptionSettings) -> list[tuple[int, str]]:
    """(token id, word) of sampled single-token lowercase words that start with a space,
    restricted to letters with at least ``min_words_per_letter`` of them, sorted by id."""
    candidates = sorted(
        (token_id, match.group(1))
        for token, token_id in tokenizer.get_vocab().items()
        if (match := _WORD_TOKEN.match(token)) and len(match.group(1)) >= settings.min_word_length
    )
    if settings.vocab_pool is not None:
        candidates = candidates[: settings.vocab_pool]
    if len(candidates) < 2:
        raise AbsorptionError("the tokenizer has no single-token lowercase words with a space")
    rng = np.random.default_rng(settings.seed)
    n = min(settings.n_words, len(candidates))
    chosen = sorted(rng.choice(len(candidates), size=n, replace=False).tolist())
    words = [candidates[i] for i in chosen]
    counts = {letter: sum(w[0] == letter for _, w in words) for letter in LETTERS}
    kept = {letter for letter, count in counts.items() if count >= settings.min_words_per_letter}
    if len(kept) < 2:
        raise AbsorptionError(
            f"only {len(kept)} letters have {settings.min_words_per_letter} words among "
            f"{n} sampled; raise n_words or lower min_words_per_letter"
        )
    return [(token_id, word) for token_id, word in words if word[0] in kept]


def split_words(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and test indices, stratified by label so every letter has test words."""
    rng = np.random.default_rng(seed + 1)
    train: list[int] = []
    test: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = max(1, round(test_fraction * len(members)))
        test += members[:n_test].tolist()
        train += members[n_test:].tolist()
    return sorted(train), sorted(test)


def spelling_prompts(
    lm: LanguageModel,
    vocabulary: Sequence[tuple[int, str]],
    settings: AbsorptionSettings,
    seed: int,
) -> tuple[list[list[int]], int]:
    """One in-context prompt per word, built from token pieces so the word is its one token:
    ``sep [ex_1 suffix answer_1 sep] ... [ex_k suffix answer_k sep] word suffix``.

    ``vocabulary`` holds (token id, word); examples are other words of it. Returns the
    prompts and the (negative) position of the word token in each of them.
    """
    before, after = settings.template.split("{word}")
    sep, prefix, suffix = (
        encode_prompts(lm, [text])[0] if text else []
        for text in (settings.separator, before, after)
    )
    token_ids = [token_id for token_id, _ in vocabulary]
    letters = [word[0] for _, word in vocabulary]
    answers = {a: encode_prompts(lm, [" " + a.upper()])[0] for a in set(letters)}
    n_examples = min(settings.icl_examples, len(token_ids) - 1)
    rng = np.random.default_rng(seed)
    prompts = []
    for i, token_id in enumerate(token_ids):
        others = rng.choice(len(token_ids) - 1, size=n_examples, replace=False)
        others = others + (others >= i)  # skip the word itself
        ids = list(sep)
        for j in others.tolist():
            ids += prefix + [token_ids[j]] + suffix + answers[letters[j]] + sep
        prompts.append(ids + prefix + [token_id] + suffix)
    return prompts, -(len(suffix) + 1)


def fit_letter_probe(
    train_x: Tensor, train_labels: Tensor, n_letters: int, c: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes (balanced classes): weight and bias in raw activation units.

    They are fitted on centred activations divided by their mean norm (one scalar, so the
    probe's geometry is the raw one; residual streams such as Gemma's carry a few huge,
    nearly constant dimensions that would otherwise swamp the regularisation) and mapped back,
    so ``x @ weight.T + bias`` takes raw activations.
    """
    mean = train_x.double().mean(0)
    centred = train_x.double() - mean
    spread = float(centred.norm(dim=1).mean().clamp_min(1e-12))
    x = (centred / spread).numpy()
    labels = train_labels.numpy()
    weight = torch.empty(n_letters, train_x.shape[1], dtype=torch.float64)
    bias = torch.empty(n_letters, dtype=torch.float64)
    for letter in range(n_letters):
        fitted = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        fitted.fit(x, labels == letter)
        weight[letter] = torch.from_numpy(fitted.coef_[0]) / spread
        bias[letter] = float(fitted.intercept_[0]) - float(weight[letter] @ mean)
    return weight.float(), bias.float()


def build_absorption_data(
    layer: int,
    letters: Sequence[str],
    words: tuple[list[str], list[str]],
    activations: tuple[Tensor, Tensor],
    labels: tuple[Tensor, Tensor],
    settings: AbsorptionSettings | None = None,
    model: dict[str, Any] | None = None,
) -> AbsorptionData:
    """Fit the ground-truth probe on the train split and score it on the test split."""
    settings = settings or AbsorptionSettings()
    (train_x, test_x), (train_labels, test_labels) = activations, labels
    weight, bias = fit_letter_probe(train_x, train_labels, len(letters), settings.probe_c)
    logits = test_x @ weight.T + bias
    accuracy = float((logits.argmax(1) == test_labels).float().mean())
    positive = (logits > 0).numpy()
    f1 = [
        float(f1_score(test_labels.numpy() == i, positive[:, i], zero_division=0))
        for i in range(len(letters))
    ]
    return AbsorptionData(
        layer=layer,
        letters=list(letters),
        train_words=words[0],
        test_words=words[1],
        train_x=train_x,
        test_x=test_x,
        train_labels=train_labels,
        test_labels=test_labels,
        probe_weight=weight,
        probe_bias=bias,
        probe_accuracy=accuracy,
        probe_f1=f1,
        settings=settings,
        model=model or {},
    )


def prepare_absorption(
    lm: LanguageModel,
    layer: int,
    *,
    settings: AbsorptionSettings | None = None,
    progress: bool = False,
) -> AbsorptionData:
    """The language-model part of the metric, done once per (model, layer)."""
    settings = settings or AbsorptionSettings()
    validate_layer(lm, layer)
    vocabulary = first_letter_vocabulary(lm.tokenizer, settings)
    letters = sorted({word[0] for _, word in vocabulary})
    labels = np.array([letters.index(word[0]) for _, word in vocabulary])
    splits = split_words(labels, settings.test_fraction, settings.seed)
    xs, words = [], []
    for offset, indices in enumerate(splits):
        chosen = [vocabulary[i] for i in indices]
        prompts, position = spelling_prompts(lm, chosen, settings, settings.seed + offset)
        positions = [position] * len(prompts)
        xs.append(activations_at(lm, layer, prompts, positions, settings.batch_size, progress))
        words.append([word for _, word in chosen])
    split_labels = tuple(torch.from_numpy(labels[indices]) for indices in splits)
    return build_absorption_data(
        layer,
        letters,
        (words[0], words[1]),
        (xs[0], xs[1]),
        (split_labels[0], split_labels[1]),
        settings,
        model_description(lm),
    )


# --- the core: absorption of each word, given its codes and the letter's main latents -------


@dataclass
class WordAbsorption:
    fraction: Tensor
    """[n] share of the probe projection taken by absorbing latents, in [0, 1]."""
    full: Tensor
    """[n] bool: main latents silent and one aligned latent carries the projection."""


def word_absorption(
    codes: Tensor,
    decoder: Tensor,
    activations: Tensor,
    probe_direction: Tensor,
    main_latents: Sequence[int] | Tensor,
    criteria: AbsorptionCriteria | None = None,
) -> WordAbsorption:
    """Absorption of words of one letter, all of them positives of that letter's probe.

    ``codes`` [n, F] times ``decoder`` [F, d] is the reconstruction in the units of
    ``activations`` [n, d]. With p the unit probe direction, latent i contributes
    codes[:, i] * (decoder[i] . p) to the word's probe projection x . p. Absorbers are non-main
    latents with a positive contribution and decoder cosine >= ``absorber_cos``; the top
    ``max_absorbers`` sum to A. The fraction is 0 when the main latents already reach x . p
    or A < ``projection_share`` * x . p; 1 when the main latents contribute nothing (or less);
    else min(A, x.p - M) / (min(A, x.p - M) + M), M the main latents' contribution.
    """
    criteria = criteria or AbsorptionCriteria()
    if codes.ndim != 2 or decoder.ndim != 2 or codes.shape[1] != decoder.shape[0]:
        raise AbsorptionError(f"codes {tuple(codes.shape)} do not match decoder {decoder.shape}")
    direction = probe_direction.float() / probe_direction.float().norm().clamp_min(1e-12)
    along = decoder.float() @ direction
    cosine = along / decoder.float().norm(dim=1).clamp_min(1e-12)
    contribution = codes.float() * along
    total = activations.float() @ direction
    is_main = torch.zeros(decoder.shape[0], dtype=torch.bool)
    is_main[torch.as_tensor(main_latents, dtype=torch.long)] = True
    main = contribution[:, is_main].sum(1)
    can_absorb = (~is_main & (cosine >= criteria.absorber_cos)) & (contribution > 0)
    absorbing = torch.where(can_absorb, contribution, 0.0)
    top = absorbing.topk(min(criteria.max_absorbers, absorbing.shape[1]), dim=1).values.sum(1)
    absent = (total <= 0) | (main >= total) | (top < criteria.projection_share * total)
    taken = torch.minimum(top, total - main)
    partial = (taken / (taken + main).clamp_min(1e-12)).clamp(0.0, 1.0)
    fraction = torch.where(main <= 0, 1.0, partial)
    fraction = torch.where(absent, 0.0, fraction)
    silent = (codes[:, is_main].abs() < SILENT).all(1)
    best, best_latent = contribution.max(1)
    full = (
        silent
        & (cosine[best_latent] >= criteria.full_absorption_cos)
        & (total > 0)
        & (best >= criteria.projection_share * total)
    )
    return WordAbsorption(fraction=fraction, full=full)


# --- main latents: k-sparse probing with feature splitting ----------------------------------


@dataclass
class MainLatents:
    latents: list[int]
    """The letter's main latents (more than one: feature splitting)."""
    f1_by_k: list[float]
    """Test F1 of the k-sparse probe for k = 1, 2, ... as far as the search went."""


def l1_probe_weights(
    codes: Tensor, labels: Tensor, n_letters: int, criteria: AbsorptionCriteria
) -> Tensor:
    """[n_letters, F] weights of L1-regularised one-vs-rest logistic probes on SAE codes,
    trained together full-batch (Adam, learning rate decaying 1000x); they only rank latents."""
    target = torch.nn.functional.one_hot(labels, n_letters).float()
    positives = target.sum(0).clamp_min(1.0)
    pos_weight = (target.shape[0] - positives) / positives
    weight = torch.zeros(n_letters, codes.shape[1], requires_grad=True)
    bias = torch.zeros(n_letters, requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=criteria.l1_lr)
    gamma = 1e-3 ** (1.0 / criteria.l1_steps)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    x = codes.float()
    with torch.enable_grad():
        for _ in range(criteria.l1_steps):
            optimiser.zero_grad()
            loss = loss_fn(x @ weight.T + bias, target)
            loss = loss + criteria.l1_decay * weight.abs().sum(1).mean()
            loss.backward()
            optimiser.step()
            schedule.step()
    return weight.detach()


def k_sparse_f1(
    train_codes: np.ndarray, train_y: np.ndarray, test_codes: np.ndarray, test_y: np.ndarray
) -> float:
    """Test F1 of a balanced logistic probe on a few latents (positive when its logit > 0)."""
    if train_y.all() or not train_y.any():
        return 0.0
    fitted = LogisticRegression(max_iter=500, class_weight="balanced").fit(train_codes, train_y)
    return float(f1_score(test_y, fitted.decision_function(test_codes) > 0, zero_division=0))


def select_main_latents(
    train_codes: Tensor,
    train_labels: Tensor,
    test_codes: Tensor,
    test_labels: Tensor,
    letters: Sequence[int],
    n_letters: int,
    criteria: AbsorptionCriteria | None = None,
) -> dict[int, MainLatents]:
    """Main latents of each letter in ``letters``: the top-k latents of its L1 probe, k grown
    while the k-sparse probe's test F1 beats the best smaller k by more than ``f1_jump``."""
    criteria = criteria or AbsorptionCriteria()
    ranking = l1_probe_weights(train_codes, train_labels, n_letters, criteria)
    k_max = min(criteria.max_k, train_codes.shape[1])
    order = ranking.topk(k_max, dim=1).indices
    train_np, test_np = train_codes.double().numpy(), test_codes.double().numpy()
    found = {}
    for letter in letters:
        train_y, test_y = (train_labels == letter).numpy(), (test_labels == letter).numpy()
        best, chosen, history = -math.inf, [], []
        for k in range(1, k_max + 1):
            columns = order[letter, :k].tolist()
            score = k_sparse_f1(train_np[:, columns], train_y, test_np[:, columns], test_y)
            history.append(score)
            if score <= best + criteria.f1_jump:
                break
            best, chosen = score, columns
        found[letter] = MainLatents(latents=chosen, f1_by_k=history)
    return found


# --- per level and per model ------------------------------------------------------------------


def scored_letters(data: AbsorptionData, criteria: AbsorptionCriteria) -> list[int]:
    """Letters whose ground-truth probe is good enough to define absorption against."""
    return [i for i, f1 in enumerate(data.probe_f1) if f1 >= criteria.min_probe_f1]


def level_absorption(
    train_codes: Tensor,
    test_codes: Tensor,
    decoder: Tensor,
    data: AbsorptionData,
    criteria: AbsorptionCriteria | None = None,
    decoder_bias: Tensor | None = None,
) -> dict[str, Any]:
    """Absorption of one SAE given its codes on ``data``'s words and its decoder (rows in the
    raw activation units per unit code). ``decoder_bias`` (raw units), when given, is taken
    off the activations before they are projected on the probe. Means are over letters."""
    criteria = criteria or AbsorptionCriteria()
    letters = scored_letters(data, criteria)
    if not letters:
        raise AbsorptionError(
            f"no letter's probe reaches test F1 {criteria.min_probe_f1} "
            f"(best {max(data.probe_f1):.3f}); absorption is undefined for this model/layer"
        )
    main = select_main_latents(
        train_codes,
        data.train_labels,
        test_codes,
        data.test_labels,
        letters,
        len(data.letters),
        criteria,
    )
    positive = data.probe_logits(data.test_x) > 0
    explained = data.test_x if decoder_bias is None else data.test_x - decoder_bias
    per_letter = {}
    for letter in letters:
        rows = ((data.test_labels == letter) & positive[:, letter]).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        words = word_absorption(
            test_codes[rows],
            decoder,
            explained[rows],
            data.probe_weight[letter],
            main[letter].latents,
            criteria,
        )
        per_letter[data.letters[letter]] = {
            "absorption_fraction": float(words.fraction.mean()),
            "full_absorption_rate": float(words.full.float().mean()),
            "true_positives": int(rows.numel()),
            "main_latents": main[letter].latents,
            "k_sparse_f1": main[letter].f1_by_k,
        }
    return _summarise_level(per_letter, decoder.shape[0], criteria)


def _summarise_level(
    per_letter: dict[str, dict[str, Any]], n_features: int, criteria: AbsorptionCriteria
) -> dict[str, Any]:
    if not per_letter:
        raise AbsorptionError("no scored letter has a test word its probe classifies correctly")
    fractions = [entry["absorption_fraction"] for entry in per_letter.values()]
    full = [entry["full_absorption_rate"] for entry in per_letter.values()]
    mean_fraction = float(np.mean(fractions))
    return {
        "n_features": n_features,
        "score": 1.0 - mean_fraction,
        "mean_absorption_fraction": mean_fraction,
        "std_absorption_fraction": float(np.std(fractions, ddof=1)) if len(fractions) > 1 else 0.0,
        "full_absorption_rate": float(np.mean(full)),
        "letters": len(per_letter),
        "reliable": len(per_letter) >= criteria.min_letters,
        "mean_main_latents": float(np.mean([len(e["main_latents"]) for e in per_letter.values()])),
        "probe_true_positives": sum(entry["true_positives"] for entry in per_letter.values()),
        "per_letter": per_letter,
    }


@torch.no_grad()
def absorption_metrics(
    model: HSAE,
    data: AbsorptionData,
    criteria: AbsorptionCriteria | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Absorption of every level of ``model``, each level scored as its own SAE. JSON-able."""
    criteria = criteria or AbsorptionCriteria()
    if model.config.d_in != data.train_x.shape[1]:
        raise AbsorptionError(
            f"the model reads {model.config.d_in}-dim activations, the data has "
            f"{data.train_x.shape[1]}"
        )
    train_codes = model.encode_in_batches(data.train_x)
    test_codes = model.encode_in_batches(data.test_x)
    levels = []
    for level in tqdm(range(model.n_levels), desc="absorption", unit="level", disable=not progress):
        parameters = model.levels[level]
        decoder = parameters.W_dec.detach().float().cpu() / model.scale
        bias = parameters.b_dec.detach().float().cpu() / model.scale
        if not criteria.subtract_decoder_bias:
            bias = None
        result = level_absorption(
            train_codes[level].float(), test_codes[level].float(), decoder, data, criteria, bias
        )
        levels.append({"level": level, **result})
    return {
        "layer": data.layer,
        "words": {"train": len(data.train_words), "test": len(data.test_words)},
        "letters": data.letters,
        "scored_letters": [data.letters[i] for i in scored_letters(data, criteria)],
        "probe": {
            "accuracy": data.probe_accuracy,
            "mean_f1": float(np.mean(data.probe_f1)),
            "f1": dict(zip(data.letters, data.probe_f1, strict=True)),
        },
        "levels": levels,
        "summary": {
            "score": [entry["score"] for entry in levels],
            "full_absorption_rate": [entry["full_absorption_rate"] for entry in levels],
            "mean_score": float(np.mean([entry["score"] for entry in levels])),
        },
        "settings": asdict(data.settings),
        "criteria": asdict(criteria),
    }
