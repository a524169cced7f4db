"""Report data: one vectorised pass over cached activations -> everything the explorer shows.

This module owns the numbers behind ``hsae report``: per-feature firing frequency, the top and
activation-weighted sampled contexts (per-feature ``torch.topk`` merged chunk by chunk; the
samples use Efraimidis-Spirakis keys ``log(u) / a``, so they are a weighted draw without
replacement kept by the same top-k merge), the tokens each feature fires on most, P(parent |
child) along the forest, the truncated forest itself, the context windows with per-token
activations, and the 2-D projection of sibling features against an unrelated one. The result is a
plain JSON-able dict; :mod:`hsae.report.html` renders it and :mod:`hsae.report.plots` draws it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from hsae.errors import HSAEError
from hsae.evaluation.contexts import (
    LevelStats,
    RowSource,
    ScanSettings,
    context_windows,
    feature_key,
    scan,
    window_activations,
)
from hsae.evaluation.suite import suite_charts
from hsae.io import read_json
from hsae.labels import load_labels
from hsae.layout import MODEL_NAMES, RunLayout, RunView, Which
from hsae.model import HSAE

Projection = Literal["auto", "umap", "pca", "none"]


class ReportError(HSAEError, ValueError):
    """The report cannot be built as asked (bad setting, missing stage, unreadable labels)."""


@dataclass(frozen=True)
class ReportSettings:
    """What the report scans and how much of it it embeds."""

    which: Which = "hsae"
    """Model whose forest is explored."""
    split: Literal["train", "heldout"] = "train"
    """Cache split the contexts come from."""
    max_tokens: int = 100_000
    """Activation rows scanned (the first rows of the split)."""
    max_features: int = 400
    """Features embedded in the page; the largest trees are kept whole until this is reached."""
    max_children: int = 16
    """Children shown per node (the most frequent ones)."""
    top_k: int = 10
    """Highest-activating contexts per feature."""
    n_sampled: int = 5
    """Contexts sampled in proportion to activation, per feature."""
    n_top_tokens: int = 8
    """Tokens each feature fires on most."""
    context_before: int = 12
    """Tokens shown before the activating token."""
    context_after: int = 4
    """Tokens shown after it."""
    chunk_size: int = 4096
    """Rows encoded at once."""
    projection: Projection = "auto"
    """2-D projection: UMAP when installed (auto), always UMAP, PCA, or none."""
    projection_points: int = 64
    """Sampled activations per feature in the projection."""
    logit_lens: int = 8
    """Tokens each feature's direction promotes and suppresses most through the LM head
    (computed with the run's language model when it loads here; 0 turns it off)."""
    seed: int = 0

    def __post_init__(self) -> None:
        minimum = {
            "max_tokens": 16,
            "max_features": 1,
            "max_children": 1,
            "top_k": 1,
            "n_sampled": 0,
            "n_top_tokens": 1,
            "context_before": 0,
            "context_after": 0,
            "chunk_size": 1,
            "projection_points": 2,
            "logit_lens": 0,
            "seed": 0,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ReportError(f"report setting {name} must be an integer >= {low}, got {value}")
        if self.which not in MODEL_NAMES:
            raise ReportError(f"which must be one of {', '.join(MODEL_NAMES)}, got {self.which}")
        if self.split not in ("train", "heldout"):
            raise ReportError(f"split must be train or heldout, got {self.split}")
        if self.projection not in ("auto", "umap", "pca", "none"):
            raise ReportError(f"projection must be auto, umap, pca or none, got {self.projection}")

    def scan_settings(self) -> ScanSettings:
        """What the scan keeps for the page: top contexts, and samples for contexts and UMAP."""
        return ScanSettings(
            max_tokens=self.max_tokens,
            top_k=self.top_k,
            n_samples=max(self.n_sampled, self.projection_points),
            chunk_size=self.chunk_size,
            seed=self.seed,
        )


# --------------------------------------------------------------------------- the forest


@dataclass
class ForestView:
    """The forest as lists, the trees chosen for the page and whether anything was left out."""

    parents: list[np.ndarray]
    """Per level, the parent index in the level above of each feature (-1: root)."""
    children: list[list[list[int]]]
    """Per level, per feature, its children in the next level, most frequent first."""
    descendants: list[np.ndarray]
    roots: list[tuple[int, int]]
    shown: list[tuple[int, int]]
    shown_trees: int
    truncated: bool


def forest_view(
    model: HSAE, frequency: list[np.ndarray], max_features: int, max_children: int
) -> ForestView:
    sizes = model.config.level_sizes
    parents = [np.full(sizes[0], -1, dtype=np.int64)]
    parents += [links.cpu().numpy().astype(np.int64) for links in model.forest()]
    children: list[list[list[int]]] = [[[] for _ in range(size)] for size in sizes]
    for level in range(1, len(sizes)):
        order = np.argsort(-frequency[level], kind="stable")
        for child in order[parents[level][order] >= 0]:
            children[level - 1][parents[level][child]].append(int(child))
    descendants = [np.zeros(size, dtype=np.int64) for size in sizes]
    for level in range(len(sizes) - 2, -1, -1):
        linked = parents[level + 1] >= 0
        np.add.at(
            descendants[level], parents[level + 1][linked], 1 + descendants[level + 1][linked]
        )
    roots = [
        (level, int(index))
        for level in range(len(sizes))
        for index in np.flatnonzero(parents[level] < 0)
    ]
    roots.sort(key=lambda node: (-descendants[node[0]][node[1]], -frequency[node[0]][node[1]]))
    shown: list[tuple[int, int]] = []
    trees, pruned = 0, False
    for root in roots:
        tree, cut = _tree_nodes(root, children, max_children)
        if len(shown) + len(tree) > max_features:
            if not shown:
                shown, trees, pruned = tree[:max_features], 1, True
            break
        shown += tree
        trees += 1
        pruned = pruned or cut
    truncated = pruned or trees < len(roots)
    return ForestView(parents, children, descendants, roots, shown, trees, truncated)


def _tree_nodes(
    root: tuple[int, int], children: list[list[list[int]]], max_children: int
) -> tuple[list[tuple[int, int]], bool]:
    """Nodes of one tree, breadth first, at most ``max_children`` per node."""
    nodes, frontier, cut = [root], [root], False
    while frontier:
        following = []
        for level, index in frontier:
            if level + 1 >= len(children):
                continue
            kids = children[level][index]
            cut = cut or len(kids) > max_children
            following += [(level + 1, kid) for kid in kids[:max_children]]
        nodes += following
        frontier = following
    return nodes, cut


# --------------------------------------------------------------------------- assembling


def build_report_data(
    run: RunView, settings: ReportSettings, tokenizer: Any = None, lm: Any = None
) -> dict[str, Any]:
    """Everything the page shows, as a JSON-able dict (see docs/report.md for the fields).

    ``lm``: the run's language model (a :class:`hsae.activations.LanguageModel`) for the logit
    lens; None loads it by the cache's model name, and a model that does not load here leaves
    the lens out with the reason in ``meta["logit_lens"]["note"]``."""
    started = time.perf_counter()
    if not run.trained(settings.which):
        raise ReportError(f"{run.folder} has no trained {settings.which} model yet")
    model = run.load(settings.which)
    cache = run.cache()
    if cache.n_tokens(settings.split) == 0:
        raise ReportError(f"{run.folder}: the activation cache has no {settings.split} tokens")
    labels, metrics = load_labels(run.folder), _metrics(run.folder)  # refuse bad files early
    source = RowSource(cache, settings.split)
    info = cache.token_info(settings.split)
    stats, scanned, vocab = scan(model, source, info.token_ids, settings.scan_settings())
    frequency = [(s.fires.double() / max(scanned, 1)).numpy() for s in stats]
    view = forest_view(model, frequency, settings.max_features, settings.max_children)
    lens, lens_meta = _logit_lens(run, cache, model, view.shown, settings, lm)
    features, contexts, token_ids = _features(
        model, source, info, stats, view, settings, vocab, lens
    )
    if tokenizer is None:
        from hsae.activations.models import load_tokenizer

        tokenizer = load_tokenizer(cache.manifest["model"]["name"])
    strings = [tokenizer.decode([int(token)]) for token in token_ids]
    _attach_labels(features, labels, settings.which)
    data = {
        "meta": _meta(run, cache, model, settings, view, scanned),
        "roots": [feature_key(*root) for root in view.roots if _shown(root, features)],
        "features": features,
        "contexts": contexts,
        "tokens": strings,
        "metrics": metrics,
        "projection": projection(model, source, stats, view, features, settings),
        "labels": {"judge": labels.get("judge")},
    }
    data["meta"]["logit_lens"] = lens_meta
    data["meta"]["seconds"] = round(time.perf_counter() - started, 2)
    return data


LensRow = tuple[list[int], list[float], list[int], list[float]]
"""One feature's logit lens: promoted token ids and scores, suppressed ids and scores."""


def _logit_lens(
    run: RunView,
    cache: Any,
    model: HSAE,
    nodes: list[tuple[int, int]],
    settings: ReportSettings,
    lm: Any,
) -> tuple[dict[tuple[int, int], LensRow], dict[str, Any]]:
    """Each shown feature's top promoted and suppressed tokens through the LM head (one
    batched matmul per chunk, :func:`hsae.steering.top_logit_effects`), or, when the language
    model is off or cannot be used here, no rows and the reason."""
    model_info = cache.manifest.get("model", {})
    name = model_info.get("name") if isinstance(model_info, dict) else model_info
    meta: dict[str, Any] = {"k": settings.logit_lens, "model": name, "note": ""}
    if settings.logit_lens == 0:
        meta["note"] = "the logit lens is off (logit_lens=0)"
        return {}, meta
    if lm is None:
        if not name:
            meta["note"] = "the activation cache does not name its language model"
            return {}, meta
        from hsae.activations import load_language_model

        device = getattr(run.config, "device", "auto")
        try:
            lm = load_language_model(name, device=None if device == "auto" else device)
        except (HSAEError, OSError, ImportError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            meta["note"] = f"the language model could not be loaded here: {reason}"
            return {}, meta
    if lm.d_model != model.config.d_in:
        meta["note"] = (
            f"the model reads {model.config.d_in}-dim activations but {lm.name} has d_model "
            f"{lm.d_model}"
        )
        return {}, meta
    from hsae.steering import top_logit_effects

    rows: dict[tuple[int, int], LensRow] = {}
    for level in sorted({level for level, _ in nodes}):
        picked = [index for lv, index in nodes if lv == level]
        weights = model.levels[level].W_dec.detach()[torch.tensor(picked, dtype=torch.long)]
        tops = top_logit_effects(lm, weights.float() / model.activation_scale, settings.logit_lens)
        up, down = tops.promoted_ids.tolist(), tops.suppressed_ids.tolist()
        up_s, down_s = tops.promoted_scores.tolist(), tops.suppressed_scores.tolist()
        for n, index in enumerate(picked):
            rows[(level, index)] = (up[n], _rounded(up_s[n]), down[n], _rounded(down_s[n]))
    return rows, meta


def _shown(node: tuple[int, int], features: dict[str, Any]) -> bool:
    return feature_key(*node) in features


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 4) for value in values]


def _features(
    model: HSAE,
    source: RowSource,
    info: Any,
    stats: list[LevelStats],
    view: ForestView,
    settings: ReportSettings,
    vocab: int,
    lens: dict[tuple[int, int], LensRow] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[int]]:
    shown_set = set(view.shown)
    features: dict[str, Any] = {}
    requests: list[tuple[str, str, int, int, float]] = []  # key, kind, level, row, value
    top_tokens = [level_stats.top_tokens(vocab, settings.n_top_tokens) for level_stats in stats]
    for level, index in view.shown:
        level_stats = stats[level]
        parent = int(view.parents[level][index])
        fires = int(level_stats.fires[index])
        key = feature_key(level, index)
        features[key] = {
            "level": level,
            "index": index,
            "fires": fires,
            "parent": feature_key(level - 1, parent) if parent >= 0 else None,
            "p_parent": _ratio(int(level_stats.with_parent[index]), fires) if parent >= 0 else None,
            "n_children": len(view.children[level][index]),
            "children": [
                feature_key(level + 1, kid)
                for kid in view.children[level][index]
                if (level + 1, kid) in shown_set
            ],
            "descendants": int(view.descendants[level][index]),
            "top_tokens": top_tokens[level].get(index, []),
            "lens": (lens or {}).get((level, index)),
            "top": [],
            "sampled": [],
        }
        for value, row in zip(
            level_stats.top_values[:, index].tolist(),
            level_stats.top_rows[:, index].tolist(),
            strict=True,
        ):
            if value > 0:
                requests.append((key, "top", level, row, value))
        for rank, (sample_key, row) in enumerate(
            zip(
                level_stats.sample_keys[:, index].tolist(),
                level_stats.sample_rows[:, index].tolist(),
                strict=True,
            )
        ):
            if rank < settings.n_sampled and sample_key > -np.inf:
                requests.append((key, "sampled", level, row, 0.0))
    contexts = _contexts(model, source, info, requests, features, settings)
    used = {t for ctx in contexts for t in ctx["t"]}
    used |= {t for f in features.values() for t, _ in f["top_tokens"]}
    used |= {t for f in features.values() if f["lens"] for t in f["lens"][0] + f["lens"][2]}
    token_ids = sorted(used)
    position = {token: i for i, token in enumerate(token_ids)}
    for ctx in contexts:
        ctx["t"] = [position[t] for t in ctx["t"]]
    for feature in features.values():
        feature["top_tokens"] = [[position[t], count] for t, count in feature["top_tokens"]]
        if feature["lens"]:
            up, up_s, down, down_s = feature["lens"]
            feature["lens"] = {
                "promoted": [[position[t], s] for t, s in zip(up, up_s, strict=True)],
                "suppressed": [[position[t], s] for t, s in zip(down, down_s, strict=True)],
            }
    return features, contexts, token_ids


def _contexts(
    model: HSAE,
    source: RowSource,
    info: Any,
    requests: list[tuple[str, str, int, int, float]],
    features: dict[str, Any],
    settings: ReportSettings,
) -> list[dict[str, Any]]:
    if not requests:
        return []
    rows = np.array([r[3] for r in requests], dtype=np.int64)
    levels = np.array([r[2] for r in requests], dtype=np.int64)
    indices = np.array([features[r[0]]["index"] for r in requests], dtype=np.int64)
    window, same = context_windows(
        rows, info.context_ids, settings.context_before, settings.context_after
    )
    width = window.shape[1]
    acts = np.zeros(window.shape, dtype=np.float32)
    for level in np.unique(levels):
        pick = levels == level
        flat_rows = window[pick].reshape(-1)
        flat_features = np.repeat(indices[pick], width)
        values = window_activations(
            model, source, int(level), flat_rows, flat_features, settings.chunk_size
        )
        acts[pick] = values.reshape(-1, width)
    contexts = []
    for n, (key, kind, _, row, _) in enumerate(requests):
        keep = same[n]
        tokens = info.token_ids[window[n][keep]].tolist()
        contexts.append(
            {
                "t": tokens,
                "a": [round(float(v), 3) + 0.0 for v in acts[n][keep]],
                "at": int(np.count_nonzero(keep[: settings.context_before])),
                "row": int(row),
            }
        )
        features[key][kind].append(len(contexts) - 1)
    return contexts


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def _attach_labels(features: dict[str, Any], labels: dict[str, Any], which: str) -> None:
    human = labels.get(which, {})
    auto = labels.get("auto", {}).get(which, {})
    for key, feature in features.items():
        feature["label"] = human.get(key)
        entry = auto.get(key)
        feature["auto_label"] = entry.get("label") if isinstance(entry, dict) else entry


def _meta(
    run: Any, cache: Any, model: HSAE, settings: ReportSettings, view: ForestView, scanned: int
) -> dict[str, Any]:
    model_info = cache.manifest.get("model", {})
    return {
        "run": run.folder.name,
        "model": model_info.get("name") if isinstance(model_info, dict) else model_info,
        "layer": cache.manifest.get("layer"),
        "which": settings.which,
        "split": settings.split,
        "tokens_scanned": scanned,
        "level_sizes": list(model.config.level_sizes),
        "total_features": int(sum(model.config.level_sizes)),
        "shown_features": len(view.shown),
        "total_trees": len(view.roots),
        "shown_trees": view.shown_trees,
        "truncated": view.truncated,
        "settings": asdict(settings),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _metrics(folder: Path) -> dict[str, Any] | None:
    path = RunLayout(Path(folder)).metrics
    if not path.is_file():
        return None
    try:
        metrics = read_json(path)
    except ValueError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None
    charts: dict[str, Any] = {}
    for name in MODEL_NAMES:
        entry = metrics.get(name)
        if not isinstance(entry, dict):
            continue
        hierarchy = entry.get("hierarchy", {})
        charts[name] = {
            "hierarchy": {
                key: hierarchy.get(key)
                for key in ("hamming_per_1k", "p_parent_given_child", "p_child_given_parent")
            },
            "l0": [level.get("l0") for level in entry.get("levels", [])],
            "variance_explained": [
                level.get("variance_explained") for level in entry.get("levels", [])
            ],
            "suite": suite_charts(metrics, name),
        }
    return charts


# --------------------------------------------------------------------------- projection


def projection(
    model: HSAE,
    source: RowSource,
    stats: list[LevelStats],
    view: ForestView,
    features: dict[str, Any],
    settings: ReportSettings,
) -> dict[str, Any] | None:
    """Sibling features of one parent and an unrelated feature, their activations in 2-D."""
    if settings.projection == "none":
        return None
    chosen = _projection_features(stats, view, features)
    if chosen is None:
        return {"note": "no parent with two firing children among the features shown"}
    groups, level = chosen
    rows, labels = [], []
    for group, index in enumerate(g[1] for g in groups):
        keys = stats[level].sample_keys[:, index]
        picked = stats[level].sample_rows[:, index][keys > -torch.inf][: settings.projection_points]
        rows.append(picked.numpy())
        labels += [group] * picked.numel()
    x = source.gather(np.concatenate(rows)) * model.scale
    points, method, note = _embed_2d(x, settings)
    return {
        "method": method,
        "note": note,
        "groups": [{"feature": feature_key(level, index), "role": role} for role, index in groups],
        "points": [
            [round(float(a), 4), round(float(b), 4), g]
            for (a, b), g in zip(points.tolist(), labels, strict=True)
        ],
    }


def _projection_features(
    stats: list[LevelStats], view: ForestView, features: dict[str, Any]
) -> tuple[list[tuple[str, int]], int] | None:
    """(role, index) of up to 5 firing siblings and one unrelated feature, and their level."""
    for key in features:
        level, index = map(int, key.split(":"))
        if level + 1 >= len(stats):
            continue
        kids = [k for k in view.children[level][index] if int(stats[level + 1].fires[k]) >= 2]
        if len(kids) < 2:
            continue
        family = _root_of(view.parents, level, index)
        strangers = [
            k
            for k in torch.argsort(stats[level + 1].fires, descending=True).tolist()
            if int(stats[level + 1].fires[k]) >= 2
            and _root_of(view.parents, level + 1, k) != family
        ]
        if not strangers:
            continue
        strangers.sort(key=lambda k: feature_key(level + 1, k) not in features)  # shown first
        groups = [("sibling", k) for k in kids[:5]] + [("unrelated", strangers[0])]
        return groups, level + 1
    return None


def _root_of(parents: list[np.ndarray], level: int, index: int) -> tuple[int, int]:
    while level > 0 and parents[level][index] >= 0:
        index = int(parents[level][index])
        level -= 1
    return level, index


def _embed_2d(x: Tensor, settings: ReportSettings) -> tuple[np.ndarray, str, str]:
    if settings.projection in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if settings.projection == "umap":
                raise ReportError("projection=umap needs: pip install umap-learn") from None
            return (
                _pca(x, settings.seed),
                "pca",
                "umap-learn is not installed: PCA shown instead of UMAP",
            )
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(
                n_neighbors=min(15, x.shape[0] - 1), random_state=settings.seed, init="random"
            )
            return reducer.fit_transform(x.numpy()), "umap", ""
    return _pca(x, settings.seed), "pca", "PCA projection (projection=pca)"


def _pca(x: Tensor, seed: int = 0) -> np.ndarray:
    """First two principal components (randomised low-rank PCA: a few small matmuls)."""
    centred = x.double() - x.double().mean(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(centred, q=min(6, *centred.shape), center=False, niter=6)
    return (centred @ v[:, :2]).numpy()
