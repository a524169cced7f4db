"""Taxonomy alignment: do a forest's parent-child links follow WordNet hypernymy?

This module owns the matching of features to WordNet synsets and the agreement of links:

* Candidate synsets: every synset that contains (as itself or through its hyponyms, instance
  links included) at least ``min_support`` of the labelled contexts and at most ``max_share`` of
  them (the roots "entity", "physical entity", ... say nothing). Synsets with exactly the same
  contexts are merged into the most specific (deepest) one.
* Feature -> synset: the candidate whose context set best matches the contexts the feature fires
  on, by F1 (2 TP / (fires + support)): high only when the feature fires on most of the synset's
  contexts and on few others, so a feature lands on the most specific synset it covers. A feature
  gets no synset when it fires on fewer than ``min_fires`` contexts or its best F1 is below
  ``min_f1``. Computed as one [synsets, features] matrix from a sparse membership product.
* Agreement of a link (parent p at level l, child c at level l+1, both with a synset):
  "hypernym" when p's synset is c's synset or one of its WordNet ancestors; "lexname" when both
  synsets share a lexicographer category; "strict" when p's synset is a proper ancestor of c's
  (hypernym agreement without the links that put both on the same synset). Precision is the
  agreeing share of those links, with a Wilson score interval; ``same_synset_fraction`` says how
  many agree only by sharing a synset.
* Random reference: each evaluated child is paired with a uniformly drawn level-l feature that
  has a synset (``random_draws`` times); the mean precision and the central ``confidence``
  interval over draws.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hsae.activations.corpora import NounSynset, load_noun_taxonomy
from hsae.errors import HSAEError
from hsae.evaluation.lexicon import LexiconData
from hsae.model import HSAE

FEATURE_CHUNK = 4096
KINDS = ("hypernym", "lexname", "strict")
"""The agreements reported for every link set (see the module doc)."""


class TaxonomyError(HSAEError, ValueError):
    """Bad settings or data for taxonomy alignment."""


@dataclass(frozen=True)
class TaxonomySettings:
    min_support: int = 5
    max_share: float = 0.5
    min_fires: int = 5
    min_f1: float = 0.2
    random_draws: int = 200
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class SynsetIndex:
    """Candidate synsets of a set of contexts (most specific first)."""

    synset_ids: tuple[str, ...]
    lexnames: Tensor
    """[S] index into ``lexname_names``."""
    lexname_names: tuple[str, ...]
    members: Tensor
    """Sparse [S, n_contexts]: 1 where the context lies under the synset."""
    support: Tensor
    """[S] contexts under each synset."""
    ancestor_keys: Tensor
    """Sorted ``s * S + a`` for every candidate ``a`` that is ``s`` or one of its ancestors."""

    def __len__(self) -> int:
        return len(self.synset_ids)


# --------------------------------------------------------------------------- WordNet structure


def ancestors_or_self(
    synset_id: str, taxonomy: Mapping[str, NounSynset], memo: dict[str, frozenset[str]]
) -> frozenset[str]:
    """The synset and all its hypernyms and instance hypernyms, transitively."""
    if synset_id not in memo:
        found = {synset_id}
        for parent in taxonomy[synset_id].parents:
            found |= ancestors_or_self(parent, taxonomy, memo)
        memo[synset_id] = frozenset(found)
    return memo[synset_id]


def depth(synset_id: str, taxonomy: Mapping[str, NounSynset], memo: dict[str, int]) -> int:
    """Length of the longest hypernym path from the synset to a root (roots: 0)."""
    if synset_id not in memo:
        parents = taxonomy[synset_id].parents
        memo[synset_id] = 1 + max(depth(p, taxonomy, memo) for p in parents) if parents else 0
    return memo[synset_id]


def synset_index(
    context_synsets: Sequence[str],
    taxonomy: Mapping[str, NounSynset],
    settings: TaxonomySettings | None = None,
) -> SynsetIndex:
    """Candidate synsets of contexts labelled with ``context_synsets`` (see the module doc)."""
    settings = settings or TaxonomySettings()
    unknown = sorted({s for s in context_synsets if s not in taxonomy})
    if unknown:
        raise TaxonomyError(
            f"{len(unknown)} context synsets are not in the taxonomy: {unknown[:3]}"
        )
    ancestors: dict[str, frozenset[str]] = {}
    rows: dict[str, list[int]] = defaultdict(list)
    for i, synset_id in enumerate(context_synsets):
        for a in ancestors_or_self(synset_id, taxonomy, ancestors):
            rows[a].append(i)
    most = settings.max_share * len(context_synsets)
    kept = _merge_identical(
        {s: r for s, r in rows.items() if settings.min_support <= len(r) <= most}, taxonomy
    )
    if not kept:
        raise TaxonomyError(
            f"no synset covers between {settings.min_support} and {most:.0f} contexts"
        )
    return _build_index(kept, rows, ancestors, len(context_synsets), taxonomy)


def _merge_identical(
    rows: dict[str, list[int]], taxonomy: Mapping[str, NounSynset]
) -> dict[str, str]:
    """Candidate -> the kept synset with the same contexts (the deepest; ties: smallest id)."""
    depths: dict[str, int] = {}
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for synset_id, members in rows.items():
        groups[tuple(members)].append(synset_id)
    merged = {}
    for group in groups.values():
        keep = min(group, key=lambda s: (-depth(s, taxonomy, depths), s))
        merged.update(dict.fromkeys(group, keep))
    return merged


def _build_index(
    merged: dict[str, str],
    rows: dict[str, list[int]],
    ancestors: dict[str, frozenset[str]],
    n_contexts: int,
    taxonomy: Mapping[str, NounSynset],
) -> SynsetIndex:
    depths: dict[str, int] = {}
    kept = sorted(set(merged.values()), key=lambda s: (-depth(s, taxonomy, depths), s))
    position = {s: i for i, s in enumerate(kept)}
    lexname_names = tuple(sorted({taxonomy[s].lexname for s in kept}))
    lexnames = torch.tensor([lexname_names.index(taxonomy[s].lexname) for s in kept])
    size = len(kept)
    keys = sorted(
        {
            position[s] * size + position[merged[a]]
            for s in kept
            for a in ancestors_or_self(s, taxonomy, ancestors)
            if a in merged
        }
    )
    synset_rows = torch.cat([torch.full((len(rows[s]),), position[s]) for s in kept])
    context_cols = torch.cat([torch.tensor(rows[s]) for s in kept])
    members = torch.sparse_coo_tensor(
        torch.stack([synset_rows, context_cols]),
        torch.ones(synset_rows.numel()),
        (size, n_contexts),
        check_invariants=True,
    ).coalesce()
    support = torch.tensor([float(len(rows[s])) for s in kept])
    return SynsetIndex(tuple(kept), lexnames, lexname_names, members, support, torch.tensor(keys))


# --------------------------------------------------------------------------- features and links


def assign_synsets(
    codes: Tensor, index: SynsetIndex, settings: TaxonomySettings | None = None
) -> tuple[Tensor, Tensor]:
    """Per feature of ``codes`` [n_contexts, F]: the index of its best candidate synset (-1: none)
    and that F1."""
    settings = settings or TaxonomySettings()
    fires = (codes > 0).float().cpu()
    counts = fires.sum(0)
    best_f1, best = torch.empty(fires.shape[1]), torch.empty(fires.shape[1], dtype=torch.long)
    for start in range(0, fires.shape[1], FEATURE_CHUNK):
        part = slice(start, start + FEATURE_CHUNK)
        hits = torch.sparse.mm(index.members, fires[:, part])  # [S, chunk]
        f1 = 2 * hits / (counts[part].unsqueeze(0) + index.support.unsqueeze(1)).clamp(min=1)
        best_f1[part], best[part] = f1.max(0)
    weak = (counts < settings.min_fires) | (best_f1 < settings.min_f1)
    return torch.where(weak, torch.full_like(best, -1), best), best_f1


def link_agreement(
    parent_synsets: Tensor, child_synsets: Tensor, index: SynsetIndex
) -> tuple[Tensor, Tensor]:
    """(hypernym, lexname) agreement of links between features with these synsets (>= 0)."""
    keys = child_synsets * len(index) + parent_synsets
    hypernym = torch.isin(keys, index.ancestor_keys)
    lexname = index.lexnames[parent_synsets] == index.lexnames[child_synsets]
    return hypernym, lexname


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``(nan, nan)`` when n = 0)."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class PairOutcome:
    """Agreement of one level pair's links, and of the random draws for the same children."""

    parent_level: int
    links: int
    agree: Tensor
    """[3, m] booleans: hypernym agreement, lexname agreement and same synset, per evaluated
    link."""
    random_agree: Tensor
    """[3, draws] counts of agreeing random pairs per draw (hypernym, lexname, strict)."""


def pair_outcome(
    parent_level: int,
    links: Tensor,
    parent_synsets: Tensor,
    child_synsets: Tensor,
    index: SynsetIndex,
    draws: int,
    generator: torch.Generator,
) -> PairOutcome:
    """Agreement of ``links`` (parent index per child, -1 none) between features whose synsets
    are given (-1 none), and of ``draws`` random re-pairings of the same children."""
    linked = links >= 0
    evaluated = linked & (child_synsets >= 0) & (parent_synsets[links.clamp(min=0)] >= 0)
    children = evaluated.nonzero(as_tuple=True)[0]
    child_syn = child_synsets[children]
    parent_syn = parent_synsets[links[children]]
    agree = torch.stack([*link_agreement(parent_syn, child_syn, index), parent_syn == child_syn])
    pool = parent_synsets[parent_synsets >= 0]
    if children.numel() == 0 or pool.numel() == 0:
        random_agree = torch.zeros(len(KINDS), draws)
    else:
        picks = pool[torch.randint(pool.numel(), (draws, children.numel()), generator=generator)]
        hypernym, lexname = link_agreement(picks, child_syn.expand(draws, -1), index)
        strict = hypernym & (picks != child_syn)
        random_agree = torch.stack([hypernym.sum(1), lexname.sum(1), strict.sum(1)]).float()
    return PairOutcome(parent_level, int(linked.sum()), agree, random_agree)


def _summary(agree: Tensor, random_agree: Tensor, confidence: float) -> dict[str, object]:
    m = agree.shape[1]
    same = float(agree[2].float().mean()) if m else math.nan
    entry: dict[str, object] = {"evaluated": m, "same_synset_fraction": _num(same)}
    tail = (1 - confidence) / 2
    outcomes = {"hypernym": agree[0], "lexname": agree[1], "strict": agree[0] & ~agree[2]}
    for row, kind in enumerate(KINDS):
        hits = int(outcomes[kind].sum())
        low, high = wilson_interval(hits, m, confidence)
        entry[kind] = {
            "precision": _num(hits / m if m else math.nan),
            "agree": hits,
            "low": _num(low),
            "high": _num(high),
        }
        rates = random_agree[row] / m if m else torch.full_like(random_agree[row], math.nan)
        entry[f"random_{kind}"] = {
            "precision": _num(float(rates.mean())),
            "low": _num(float(torch.quantile(rates, tail))),
            "high": _num(float(torch.quantile(rates, 1 - tail))),
        }
    return entry


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def alignment_from_codes(
    codes: Sequence[Tensor],
    forest: Sequence[Tensor],
    index: SynsetIndex,
    settings: TaxonomySettings | None = None,
) -> dict[str, object]:
    """Taxonomy alignment of one model from its per-level codes [n_contexts, n_l] on the indexed
    contexts and its forest (``forest[l]``: parent in level l of each feature of level l+1)."""
    settings = settings or TaxonomySettings()
    if settings.random_draws < 1:
        raise TaxonomyError(f"random_draws must be at least 1, got {settings.random_draws}")
    if len(forest) != len(codes) - 1:
        raise TaxonomyError(
            f"{len(codes)} levels need {len(codes) - 1} link sets, not {len(forest)}"
        )
    assigned = [assign_synsets(c, index, settings) for c in codes]
    generator = torch.Generator().manual_seed(settings.seed)
    outcomes = [
        pair_outcome(
            level,
            links.cpu(),
            assigned[level][0],
            assigned[level + 1][0],
            index,
            settings.random_draws,
            generator,
        )
        for level, links in enumerate(forest)
    ]
    pairs = [
        {"parent_level": o.parent_level, "links": o.links}
        | _summary(o.agree, o.random_agree, settings.confidence)
        for o in outcomes
    ]
    pooled = _summary(
        torch.cat([o.agree for o in outcomes], 1),
        sum((o.random_agree for o in outcomes), torch.zeros(len(KINDS), settings.random_draws)),
        settings.confidence,
    )
    return {
        "levels": [_level_entry(b, f1) for b, f1 in assigned],
        "pairs": pairs,
        "all_pairs": pooled,
    }


def _level_entry(best: Tensor, f1: Tensor) -> dict[str, object]:
    has = best >= 0
    return {
        "features": int(best.numel()),
        "assigned": int(has.sum()),
        "assigned_fraction": float(has.float().mean()),
        "mean_f1": _num(float(f1[has].mean()) if has.any() else math.nan),
        "distinct_synsets": int(best[has].unique().numel()),
    }


def taxonomy_alignment(
    models: dict[str, HSAE],
    data: LexiconData,
    *,
    taxonomy: Mapping[str, NounSynset] | None = None,
    settings: TaxonomySettings | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Taxonomy alignment of every model's forest on WordNet contexts. JSON-able:
    ``{"contexts", "candidate_synsets", "settings", name: {"levels", "pairs", "all_pairs"}}``."""
    settings = settings or TaxonomySettings()
    if any(not s for s in data.synset_ids):
        raise TaxonomyError("taxonomy alignment needs WordNet contexts (every one with a synset)")
    taxonomy = taxonomy if taxonomy is not None else load_noun_taxonomy()
    index = synset_index(data.synset_ids, taxonomy, settings)
    results: dict[str, object] = {
        "contexts": len(data),
        "candidate_synsets": len(index),
        "settings": asdict(settings),
    }
    for name, model in tqdm(models.items(), desc="taxonomy", disable=not progress):
        codes = model.encode_in_batches(data.activations)
        results[name] = alignment_from_codes(codes, model.forest(), index, settings)
    return results
