"""The feature-forest explorer: ``hsae report RUN`` -> RUN/report.html and RUN/plots/*.png.

| module | owns |
| --- | --- |
| ``explorer.py`` | the vectorised pass over activations and every number the page shows |
| ``html.py`` | the self-contained page (template + inlined assets + escaped JSON) |
| ``plots.py`` | static PNGs of the charts (matplotlib, Agg) |
| ``labels.py`` | RUN/labels.json: human labels and the automatic-label hook |
| ``build.py`` | :func:`build_report`, tying the above together |
"""

from hsae.labels import LabelsError, load_labels, save_labels
from hsae.report.build import ReportResult, build_report
from hsae.report.explorer import ReportError, ReportSettings, build_report_data
from hsae.report.html import render_html

__all__ = [
    "LabelsError",
    "ReportError",
    "ReportResult",
    "ReportSettings",
    "build_report",
    "build_report_data",
    "load_labels",
    "render_html",
    "save_labels",
]
