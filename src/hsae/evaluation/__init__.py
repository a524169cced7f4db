"""Evaluation: reconstruction quality, hierarchy metrics, and recovery of a known forest.

The heavier parts of the full suite live in their own modules and are imported from there:
``absorption``, ``probing`` and ``taxonomy`` (with ``lexicon``, their WordNet contexts),
``judges`` (with ``llm``, the OpenAI-compatible client) and ``suite`` (what runs when).
"""

from hsae.evaluation.hierarchy import HierarchyMetrics, hierarchy_metrics
from hsae.evaluation.quality import Evaluation, LevelQuality, evaluate
from hsae.evaluation.recovery import (
    FiringRecoveryReport,
    RecoveryReport,
    firing_forest_recovery,
    forest_recovery,
    match_by_f1,
    match_by_firing,
    match_latents,
)

__all__ = [
    "Evaluation",
    "FiringRecoveryReport",
    "HierarchyMetrics",
    "LevelQuality",
    "RecoveryReport",
    "evaluate",
    "firing_forest_recovery",
    "forest_recovery",
    "hierarchy_metrics",
    "match_by_f1",
    "match_by_firing",
    "match_latents",
]
