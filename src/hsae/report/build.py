"""``hsae report``: build the report data of a run, write RUN/report.html and RUN/plots/*.png."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsae.io import check_output_path, write_text
from hsae.layout import RunLayout, RunView
from hsae.report.explorer import ReportSettings, build_report_data
from hsae.report.html import render_html
from hsae.report.plots import write_plots


@dataclass(frozen=True)
class ReportResult:
    """Where the report went, how big it is and how long it took."""

    html: Path
    plots: list[Path]
    size_bytes: int
    seconds: float
    meta: dict[str, Any]


def build_report(
    run: RunView,
    settings: ReportSettings | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    tokenizer: Any = None,
    overwrite: bool = False,
    lm: Any = None,
) -> ReportResult:
    """Write the explorer page of ``run`` (e.g. ``hsae.runs.Run.open(folder)``; default
    RUN/report.html) and, unless ``plots=False``, the PNGs.

    The default page and the plots are the report's own files and are replaced on every call;
    an existing ``out`` elsewhere is refused unless ``overwrite``, and a run folder's own files
    (run.json, metrics.json, the models, ...) are refused always. Checked before any work.
    ``lm``: the run's language model for the logit lens (None: loaded by name when possible).
    """
    started = time.perf_counter()
    layout = RunLayout(run.folder)
    default = layout.report
    target = Path(out) if out is not None else default
    if target.absolute() != default.absolute():
        check_output_path(target, overwrite=overwrite, runs=[run.folder])
    data = build_report_data(run, settings or ReportSettings(), tokenizer=tokenizer, lm=lm)
    html = render_html(data)
    write_text(target, html)
    pngs = write_plots(data, layout.plots) if plots else []
    return ReportResult(
        html=target,
        plots=pngs,
        size_bytes=target.stat().st_size,
        seconds=round(time.perf_counter() - started, 2),
        meta=data["meta"],
    )
