"""Evaluation: reconstruction quality, hierarchy metrics, and recovery of a known forest.

The heavier parts of the full suite live in their own modules and are imported from there:
``absorption``, ``probing`` and ``taxonomy`` (with ``lexicon``, their WordNet contexts),
``judges`` (with ``llm``, the OpenAI-compatible client) and ``suite`` (what runs when).
"""

from hsae.evaluation.hierarchy import HierarchyMetrics, hierarchy_metrics
from hsae.evaluation.quality import Evaluation, LevelQuality, evaluate
from hsae.evaluation.recovery import (
    RecoveryReport,
    forest_recovery,
    match_by_firing,
    match_latents,
)

__all__ = [
    "Evaluation",
    "HierarchyMetrics",
    "LevelQuality",
    "RecoveryReport",
    "evaluate",
    "forest_recovery",
    "hierarchy_metrics",
    "match_by_firing",
    "match_latents",
]
