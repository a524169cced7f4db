"""Evaluation: reconstruction quality, hierarchy metrics, and recovery of a known forest."""

from hsae.evaluation.hierarchy import HierarchyMetrics, hierarchy_metrics
from hsae.evaluation.quality import Evaluation, LevelQuality, evaluate

__all__ = ["Evaluation", "HierarchyMetrics", "LevelQuality", "evaluate", "hierarchy_metrics"]
