"""Steering along the tree: run the language model with HSAE features added, clamped or zeroed.

The hierarchy's use is control at two grains: push the model with a parent (coarse) or with one
of its children (fine). Everything here acts on the residual stream after the hooked block
(the run's layer), at every real token (BOS and padding stay clean) or at chosen positions::

    lm = load_language_model()                        # hsae.activations
    with steered(lm, model, layer, [add(0, 12, 40.0)]):
        text = greedy_continuation(lm, "My favourite animal is")
    with spliced(lm, model, level=2, layer=layer):    # the level-2 reconstruction replaces h
        logits = lm.model(**inputs).logits

Units. ``model.encode`` returns activations in the model's scaled units and ``model.decode``
maps them back to the caller's raw units, dividing by the activation scale. A feature's
contribution to a raw residual is therefore ``a_i * d_i / scale`` (``d_i`` its unit decoder
row), and the edits follow the same rule: ``add(level, i, s)`` adds ``s * d_i / scale`` (as if
the feature's activation rose by ``s``), ``clamp(level, i, v)`` adds ``(v - a_i) * d_i / scale``
(``a_i`` encoded from the incoming residual) and ``zero(level, i)`` subtracts
``a_i * d_i / scale``. Several edits act on the same incoming residual and their changes add
up. How much is a lot: a strength near the feature's own largest activation is already a strong
push (on Gemma 3 270M's middle layer a few times that breaks the text), far below the
residual's mean norm (``sqrt(d_model)`` in these units); :func:`max_activations` measures it,
and ``hsae steer`` uses it as the default strength of each feature.

:func:`logit_effect` is the report-time view of a feature's direction: the tokens whose logits
the direction raises and lowers most when put straight through the final norm and the LM head
(the "logit lens"). It is the direct effect only: it ignores every block after the hooked one.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hsae.activations.models import LanguageModel, decoder_layers
from hsae.errors import HSAEError
from hsae.evaluation.splice import replaced_output
from hsae.evaluation.splice import spliced as spliced_block
from hsae.model import HSAE
from hsae.model.navigation import check_node

Mode = Literal["add", "clamp", "zero"]
Strength = float | Mapping[tuple[int, int], float]


class SteeringError(HSAEError, ValueError):
    """A steering request that cannot be run (feature or level out of range, no children...)."""


@dataclass(frozen=True)
class Edit:
    """One change to the residual stream: ``mode`` on feature ``feature`` of ``level``.

    ``value`` is the strength added (``add``) or the activation to hold (``clamp``), both in
    the feature's activation units (those of ``model.encode``); ``zero`` ignores it.
    """

    level: int
    feature: int
    mode: Mode = "add"
    value: float = 0.0


def add(level: int, feature: int, strength: float) -> Edit:
    """Add ``strength * d_i / scale`` to the residual (raise the feature's activation by it)."""
    return Edit(level, feature, "add", float(strength))


def clamp(level: int, feature: int, value: float) -> Edit:
    """Hold the feature's activation at ``value``: add ``(value - a_i) * d_i / scale``."""
    return Edit(level, feature, "clamp", float(value))


def zero(level: int, feature: int) -> Edit:
    """Remove the feature's contribution: subtract ``a_i * d_i / scale``."""
    return Edit(level, feature, "zero")


def validate_edits(model: HSAE, edits: Sequence[Edit]) -> None:
    """Raise :class:`SteeringError` (one line) for an edit the model cannot carry out."""
    for edit in edits:
        if edit.mode not in ("add", "clamp", "zero"):
            raise SteeringError(f"edit mode must be add, clamp or zero, got {edit.mode!r}")
        check_node(model.config.level_sizes, edit.level, edit.feature, SteeringError)


def direction(model: HSAE, level: int, feature: int) -> Tensor:
    """What one unit of the feature's activation adds to a raw residual: ``d_i / scale``
    (float32 [d_in], on the model's device)."""
    check_node(model.config.level_sizes, level, feature, SteeringError)
    return model.levels[level].W_dec[feature].detach().float() / model.activation_scale


@torch.no_grad()
def steering_delta(model: HSAE, x: Tensor, edits: Sequence[Edit]) -> Tensor:
    """The change [n, d_in] (float32, model's device) the edits make to raw residuals ``x``."""
    x = x.to(model.activation_scale.device, torch.float32)
    delta = torch.zeros_like(x)
    encoded: dict[int, Tensor] = {}
    for edit in edits:
        row = direction(model, edit.level, edit.feature)
        if edit.mode == "add":
            delta += edit.value * row
            continue
        if edit.level not in encoded:
            encoded[edit.level] = model.encode_level(x, edit.level)
        acts = encoded[edit.level][:, edit.feature]
        coefficient = -acts if edit.mode == "zero" else edit.value - acts
        delta += coefficient.unsqueeze(1) * row
    return delta


class TokenMask:
    """Which positions of each forward pass an intervention touches.

    A forward pre-hook on the language model's base (the transformer under the LM head) records
    the input ids, attention mask and cache positions of each call; calling the object on the
    hooked block's output [batch, seq, d] gives a [batch, seq] mask: attended tokens that are
    not BOS, restricted to ``positions`` (indices into the token sequence the model was given,
    BOS included) when set. It follows
    cached generation too (``lm.model.generate``): each step's new token has its own position.
    """

    def __init__(self, lm: LanguageModel, positions: Sequence[int] | None = None) -> None:
        self.bos = lm.bos_token_id
        self.positions = None if positions is None else torch.as_tensor(list(positions))
        self.ids: Tensor | None = None
        self.mask: Tensor | None = None
        self.cache_position: Tensor | None = None

    def record(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ids = kwargs.get("input_ids", args[0] if args else None)
        self.mask = kwargs.get("attention_mask")
        self.cache_position = kwargs.get("cache_position")

    def __call__(self, hidden: Tensor) -> Tensor:
        batch, seq = hidden.shape[:2]
        keep = torch.ones((batch, seq), dtype=torch.bool, device=hidden.device)
        mask = self.mask if isinstance(self.mask, Tensor) and self.mask.ndim == 2 else None
        if mask is not None:
            keep &= mask[:, -seq:].to(hidden.device).bool()
        if isinstance(self.ids, Tensor) and self.ids.shape[-1] == seq and self.bos is not None:
            keep &= self.ids.to(hidden.device) != self.bos
        if self.positions is not None:
            if isinstance(self.cache_position, Tensor) and self.cache_position.numel() == seq:
                absolute = self.cache_position.to(hidden.device)
            else:
                start = mask.shape[1] - seq if mask is not None else 0
                absolute = torch.arange(start, start + seq, device=hidden.device)
            keep &= torch.isin(absolute, self.positions.to(hidden.device)).unsqueeze(0)
        return keep

    @contextmanager
    def tracking(self, lm: LanguageModel) -> Iterator[TokenMask]:
        base = getattr(lm.model, "base_model", lm.model)
        handle = base.register_forward_pre_hook(self.record, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def _block(lm: LanguageModel, model: HSAE, layer: int) -> torch.nn.Module:
    if not 0 <= layer < lm.n_layers:
        raise SteeringError(f"layer must lie in [0, {lm.n_layers - 1}] for {lm.name}, got {layer}")
    if model.config.d_in != lm.d_model:
        raise SteeringError(
            f"the HSAE reads {model.config.d_in}-dim activations but {lm.name} has d_model "
            f"{lm.d_model}"
        )
    return decoder_layers(lm.model)[layer]


@contextmanager
def steered(
    lm: LanguageModel,
    model: HSAE,
    layer: int,
    edits: Sequence[Edit],
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Within the context, every forward pass of ``lm.model`` has the ``edits`` applied to the
    residual stream after block ``layer`` (the layer the HSAE was trained on), at every real
    token, or only at ``positions`` (token indices, BOS = 0)."""
    validate_edits(model, edits)
    block = _block(lm, model, layer)
    edits = list(edits)

    def replace(hidden: Tensor) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        changed = flat + steering_delta(model, flat, edits).to(flat.device)
        return changed.reshape(hidden.shape)

    with TokenMask(lm, positions).tracking(lm) as keep, replaced_output(block, keep, replace):
        yield


@contextmanager
def spliced(
    lm: LanguageModel,
    model: HSAE,
    level: int,
    layer: int,
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Within the context, the residual after block ``layer`` is replaced by the model's
    level-``level`` reconstruction at every real token (or at ``positions``): the same splice
    as the evaluation's spliced CE loss (:func:`hsae.evaluation.splice.spliced`)."""
    if not 0 <= level < model.n_levels:
        raise SteeringError(f"level must lie in [0, {model.n_levels - 1}], got {level}")
    block = _block(lm, model, layer)
    with TokenMask(lm, positions).tracking(lm) as keep, spliced_block(block, model, level, keep):
        yield


# --------------------------------------------------------------------------- generation


def prompt_ids(lm: LanguageModel, prompt: str) -> Tensor:
    """[1, n] token ids of ``prompt`` with BOS first, as the harvest feeds text to the model."""
    from hsae.activations.prompts import encode_prompts, pad_prompts

    tokens = encode_prompts(lm, [prompt])[0]
    if not tokens:
        raise SteeringError("the prompt is empty")
    return pad_prompts([tokens], lm)[0].to(lm.device)


@torch.no_grad()
def greedy_continuation(lm: LanguageModel, prompt: str, max_new_tokens: int = 24) -> str:
    """The model's greedy continuation of ``prompt`` (under whatever hooks are active), without
    a KV cache, so every step re-runs the whole sequence through the hooks; stops at EOS."""
    if max_new_tokens < 1:
        raise SteeringError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = prompt_ids(lm, prompt)
    start = ids.shape[1]
    eos = lm.tokenizer.eos_token_id
    extra = {"logits_to_keep": 1} if _accepts(lm.model, "logits_to_keep") else {}
    for _ in range(max_new_tokens):
        mask = torch.ones_like(ids)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        following = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, following], dim=1)
        if eos is not None and int(following) == eos:
            break
    return lm.tokenizer.decode(ids[0, start:].tolist(), skip_special_tokens=True)


def _accepts(module: Any, argument: str) -> bool:
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class Continuation:
    """One line of a steering comparison."""

    label: str
    """"clean", or the steered feature as "level:index"."""
    role: str
    """"clean", "feature" (the one asked for) or "child"."""
    edits: list[Edit]
    text: str
    lens: dict[str, list[tuple[str, float]]] | None = None
    """The steered feature's :func:`logit_effect` (when asked for)."""


def steering_plan(
    model: HSAE,
    level: int,
    feature: int,
    strength: Strength,
    children: bool = False,
) -> list[tuple[str, str, list[Edit]]]:
    """(label, role, edits) of each line of :func:`compare_steering`, validated."""
    check_node(model.config.level_sizes, level, feature, SteeringError)
    nodes = [(level, feature)]
    if children:
        if level == model.n_levels - 1:
            raise SteeringError(
                f"feature {level}:{feature} is in the last level, which has no children"
            )
        kids = model.children(level, feature).tolist()
        if not kids:
            raise SteeringError(f"feature {level}:{feature} has no children in level {level + 1}")
        nodes += [(level + 1, kid) for kid in kids]
    steps: list[tuple[str, str, list[Edit]]] = [("clean", "clean", [])]
    for n, (lv, index) in enumerate(nodes):
        value = strength if isinstance(strength, int | float) else strength.get((lv, index))
        if value is None:
            raise SteeringError(f"no strength given for feature {lv}:{index}")
        role = "feature" if n == 0 else "child"
        steps.append((f"{lv}:{index}", role, [add(lv, index, float(value))]))
    return steps


def max_activations(
    model: HSAE, x: Tensor, nodes: Sequence[tuple[int, int]], batch_size: int = 4096
) -> dict[tuple[int, int], float]:
    """Each node's largest activation on raw activations ``x`` [n, d_in] (0.0 if it never
    fires there): the natural size of a steering strength for that feature."""
    levels = sorted({level for level, _ in nodes})
    best: dict[tuple[int, int], float] = {}
    for level in levels:
        picked = torch.tensor([i for lv, i in nodes if lv == level], dtype=torch.long)
        top = torch.zeros(len(picked))
        for start in range(0, x.shape[0], batch_size):
            acts = model.encode_level(x[start : start + batch_size], level).cpu()[:, picked]
            top = torch.maximum(top, acts.max(0).values)
        best |= {(level, int(i)): float(v) for i, v in zip(picked, top, strict=True)}
    return best


def compare_steering(
    lm: LanguageModel,
    model: HSAE,
    layer: int,
    prompt: str,
    level: int,
    feature: int,
    strength: Strength,
    children: bool = False,
    max_new_tokens: int = 24,
    lens_k: int = 0,
) -> list[Continuation]:
    """Greedy continuations of ``prompt``: clean, with ``strength`` of the feature added, and
    (``children=True``) with ``strength`` of each of its children in the next level.

    ``strength``: one value for every feature, or a mapping (level, index) -> value (e.g.
    :func:`max_activations`). ``lens_k`` > 0 also gives each steered feature's top
    ``lens_k`` :func:`logit_effect`.
    """
    steps = steering_plan(model, level, feature, strength, children)
    results = []
    for label, role, edits in steps:
        with steered(lm, model, layer, edits):
            text = greedy_continuation(lm, prompt, max_new_tokens)
        lens = None
        if edits and lens_k > 0:
            lens = logit_effect(lm, model, edits[0].level, edits[0].feature, lens_k)
        results.append(Continuation(label, role, edits, text, lens))
    return results


# --------------------------------------------------------------------------- logit lens


def final_norm(lm: LanguageModel) -> torch.nn.Module | None:
    """The norm applied to the last block's output before the LM head (None if not found)."""
    base = getattr(lm.model, "base_model", lm.model)
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


@torch.no_grad()
def logit_lens_scores(lm: LanguageModel, vectors: Tensor) -> Tensor:
    """[n, vocab] direct effect of raw-residual directions ``vectors`` [n, d] on the logits:
    ``W_U (norm(v) - norm(0))``. The final norm's gain (and centring, for a LayerNorm) is
    applied, the normalisation by the residual's size is not (it only rescales); the blocks
    between the hooked layer and the head are ignored."""
    head = lm.model.get_output_embeddings()
    weight = head.weight
    v = vectors.to(weight.device, weight.dtype)
    norm = final_norm(lm)
    if norm is not None:
        v = norm(v) - norm(torch.zeros_like(v))
    return (v @ weight.t()).float()


@dataclass(frozen=True)
class LensTops:
    """Top tokens of many directions at once (:func:`top_logit_effects`): [n, k] ids and
    scores, strongest first; suppressed scores are the (negative) logit changes."""

    promoted_ids: Tensor
    promoted_scores: Tensor
    suppressed_ids: Tensor
    suppressed_scores: Tensor


@torch.no_grad()
def top_logit_effects(
    lm: LanguageModel, vectors: Tensor, k: int = 10, max_elements: int = 1 << 25
) -> LensTops:
    """:func:`logit_effect` of many raw-residual directions ``vectors`` [n, d] at once: one
    :func:`logit_lens_scores` matmul per chunk of rows (each chunk's [rows, vocab] scores hold
    at most ``max_elements`` numbers), the ``k`` highest and lowest tokens per row kept.
    Tokens past the tokenizer's length (padding rows of the head) are never picked."""
    if k < 1:
        raise SteeringError(f"k must be >= 1, got {k}")
    head = lm.model.get_output_embeddings().weight
    vocab = min(int(head.shape[0]), len(lm.tokenizer))
    rows = max(1, max_elements // max(vocab, 1))
    k = min(k, vocab)
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for start in range(0, vectors.shape[0], rows):
        scores = logit_lens_scores(lm, vectors[start : start + rows])[:, :vocab]
        top, bottom = scores.topk(k, dim=1), (-scores).topk(k, dim=1)
        parts.append((top.indices, top.values, bottom.indices, -bottom.values))
        del scores
    if not parts:
        empty = torch.zeros((0, k))
        return LensTops(empty.long(), empty, empty.long(), empty)
    joined = [torch.cat([part[i] for part in parts]).cpu() for i in range(4)]
    return LensTops(*joined)


@torch.no_grad()
def logit_effect(
    lm: LanguageModel, model: HSAE, level: int, feature: int, k: int = 10
) -> dict[str, list[tuple[str, float]]]:
    """The ``k`` tokens the feature's direction promotes and suppresses most through the LM
    head (:func:`logit_lens_scores` of its decoder row): ``{"promoted": [(token, score), ...],
    "suppressed": [...]}``, strongest first. Scores compare tokens within one feature."""
    if k < 1:
        raise SteeringError(f"k must be >= 1, got {k}")
    scores = logit_lens_scores(lm, direction(model, level, feature).unsqueeze(0))[0]
    scores = scores[: len(lm.tokenizer)] if len(lm.tokenizer) < scores.numel() else scores
    top, bottom = scores.topk(k), (-scores).topk(k)
    decode = lm.tokenizer.decode
    return {
        "promoted": [
            (decode([i]), round(float(s), 4))
            for i, s in zip(top.indices.tolist(), top.values.tolist(), strict=True)
        ],
        "suppressed": [
            (decode([i]), round(-float(s), 4))
            for i, s in zip(bottom.indices.tolist(), bottom.values.tolist(), strict=True)
        ],
    }


# --------------------------------------------------------------------------- runs


def parse_feature(text: str) -> tuple[int, int]:
    """``"LEVEL:INDEX"`` -> (level, index)."""
    level, _, index = text.partition(":")
    if not (level.strip().isdigit() and index.strip().isdigit()):
        raise SteeringError(f"a feature is written LEVEL:INDEX (e.g. 0:12), got {text!r}")
    return int(level), int(index)


def format_comparison(prompt: str, lines: Sequence[Continuation], which: str = "hsae") -> str:
    """The comparison as text: one row per continuation (label | text), then the logit lens."""
    names = [
        f"{line.label} parent"
        if line.role == "feature" and any(other.role == "child" for other in lines)
        else f"{line.label} child"
        if line.role == "child"
        else line.label
        for line in lines
    ]
    names = [
        f"{name} +{line.edits[0].value:.3g}" if line.edits else name
        for name, line in zip(names, lines, strict=True)
    ]
    width = max(len(name) for name in names)
    out = [f"prompt: {prompt!r} ({which}; greedy continuations; +S: strength added)"]
    out += [f"{name:<{width}} | {line.text!r}" for name, line in zip(names, lines, strict=True)]
    for line in lines:
        if line.lens:
            up = " ".join(repr(token) for token, _ in line.lens["promoted"])
            down = " ".join(repr(token) for token, _ in line.lens["suppressed"])
            out.append(f"{line.label} logit lens: promotes {up}; suppresses {down}")
    return "\n".join(out)


def steer_run(
    run_dir: Any,
    level: int,
    feature: int,
    prompt: str,
    strength: float | None = None,
    children: bool = False,
    max_new_tokens: int = 24,
    which: str = "hsae",
    lm: LanguageModel | None = None,
    lens_k: int = 0,
) -> list[Continuation]:
    """:func:`compare_steering` on a run folder's model, at the run's layer, with the run's
    language model (loaded by its settings unless ``lm`` is given). ``strength`` None: each
    feature at its own largest activation on the run's held-out activations."""
    from hsae.layout import MODEL_NAMES
    from hsae.runs import Run

    if which not in MODEL_NAMES:
        raise SteeringError(f"which must be one of {list(MODEL_NAMES)}, got {which!r}")
    if max_new_tokens < 1:
        raise SteeringError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    run = Run.open(run_dir)
    model = run.load(which)  # type: ignore[arg-type]
    plan = steering_plan(model, level, feature, 0.0, children)  # refuse bad requests first
    cache = run.cache()
    layer = int(cache.manifest["layer"])
    chosen: Strength
    if strength is None:
        nodes = [(edits[0].level, edits[0].feature) for _, _, edits in plan if edits]
        heldout = cache.all_activations("heldout")[: run.config.eval_tokens]
        chosen = max_activations(model, heldout, nodes)
    else:
        chosen = float(strength)
    if lm is None:
        from hsae.activations import load_language_model

        device = None if run.config.device == "auto" else run.config.device
        lm = load_language_model(run.config.model, device=device)
    model = model.to(lm.device)
    return compare_steering(
        lm, model, layer, prompt, level, feature, chosen, children, max_new_tokens, lens_k
    )
