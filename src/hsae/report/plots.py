"""Static PNG versions of the report's charts (matplotlib, Agg backend), for papers and slides.

``RUN/plots/hierarchy.png``: Hamming per 1k, P(parent | child), P(child | parent), HSAE vs
baseline; ``RUN/plots/levels.png``: L0 and variance explained per level; ``RUN/plots/
projection.png``: the sibling-vs-unrelated projection. Each file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsae.io import write_with

COLOURS = {"hsae": "#1f6fd1", "baseline": "#f08c2e", "matryoshka": "#2ca02c"}
GROUP_COLOURS = ["#1f6fd1", "#2ca02c", "#9467bd", "#17becf", "#bcbd22"]
HIERARCHY = (
    ("hamming_per_1k", "Hamming per 1k tokens\n(lower is better)"),
    ("p_parent_given_child", "P(parent | child)\n(higher is better)"),
    ("p_child_given_parent", "P(child | parent)\n(higher is better)"),
)


def write_plots(data: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write the PNGs the data allows (no metrics: no metric plots); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(folder)
    written = []
    metrics = data.get("metrics")
    if metrics and "hsae" in metrics:
        written.append(save_figure(_hierarchy_figure(metrics), out / "hierarchy.png"))
        written.append(save_figure(_levels_figure(metrics), out / "levels.png"))
        if metrics["hsae"].get("suite"):
            written.append(save_figure(_suite_figure(metrics), out / "suite.png"))
    projection = data.get("projection")
    if projection and projection.get("points"):
        written.append(save_figure(_projection_figure(projection), out / "projection.png"))
    return written


def save_figure(figure: Any, path: Path) -> Path:
    """Write ``figure`` as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=150))
    finally:
        plt.close(figure)
    return path


def _hierarchy_figure(metrics: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    names = list(metrics)
    figure, axes = plt.subplots(1, len(HIERARCHY), figsize=(9, 3.2))
    for axis, (key, title) in zip(axes, HIERARCHY, strict=True):
        values = [_number(metrics[name]["hierarchy"].get(key)) for name in names]
        bars = axis.bar(names, values, color=[COLOURS.get(n, "#777") for n in names])
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
    figure.tight_layout()
    return figure


def _levels_figure(metrics: dict[str, Any]) -> Any:
    charts = [
        ("l0", "L0 per level", False),
        ("variance_explained", "Variance explained per level", False),
    ]
    return _per_level_figure(metrics, charts)


def _suite_figure(metrics: dict[str, Any]) -> Any:
    """The full suite's charts, as the evaluation registry describes them (hsae's list)."""
    flat = {
        name: {chart["key"]: chart["values"] for chart in entry.get("suite", [])}
        for name, entry in metrics.items()
    }
    charts = [
        (chart["key"], f"{chart['title']}\n({chart['note']})", chart["per_pair"])
        for chart in metrics["hsae"]["suite"]
    ]
    return _per_level_figure(flat, charts)


def _per_level_figure(metrics: dict[str, Any], charts: list[tuple[str, str, bool]]) -> Any:
    """One grouped bar chart per (key, title, per_pair): a bar per model at every level (at
    every pair of adjacent levels when per_pair)."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(metrics)
    figure, axes = plt.subplots(1, len(charts), figsize=(4.5 * len(charts), 3.2), squeeze=False)
    for axis, (key, title, per_pair) in zip(axes[0], charts, strict=True):
        levels = np.arange(len(metrics["hsae"][key]))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [_number(v) for v in metrics[name].get(key) or []]
            axis.bar(
                levels[: len(values)] + k * width,
                values,
                width,
                label=name,
                color=COLOURS.get(name),
            )
        ticks = [f"L{i}-L{i + 1}" if per_pair else f"L{i}" for i in levels]
        axis.set_xticks(levels + width * (len(names) - 1) / 2, ticks)
        axis.set_title(title, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.margins(y=0.3)  # room above the bars for the legend
        axis.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    return figure


def _projection_figure(projection: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt
    import numpy as np

    points = np.asarray(projection["points"], dtype=float)
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for group, entry in enumerate(projection["groups"]):
        mine = points[points[:, 2] == group]
        unrelated = entry["role"] == "unrelated"
        colour = "#d62728" if unrelated else GROUP_COLOURS[group % len(GROUP_COLOURS)]
        label = f"{entry['feature']} ({entry['role']})"
        axis.scatter(mine[:, 0], mine[:, 1], s=9, alpha=0.75, color=colour, label=label)
    axis.set_title(f"{projection['method'].upper()}: sibling features vs an unrelated one")
    axis.legend(fontsize=7, markerscale=1.5)
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    return figure


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
