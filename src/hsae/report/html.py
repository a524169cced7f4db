"""The self-contained HTML page: template, CSS and JS from ``assets/`` plus the data as JSON.

Everything is inlined, so the file opens offline; a Content-Security-Policy forbids any network
request. The data sits in a ``<script type="application/json">`` block with ``<``, ``>`` and
``&`` escaped as JSON unicode escapes, so no corpus text can close the block or start markup,
and the page script builds every element with ``textContent``.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

_MARKERS = ("/*@@CSS@@*/", "/*@@JS@@*/", "/*@@DATA@@*/")


def asset(name: str) -> str:
    """Text of a file shipped in ``hsae/report/assets``."""
    return resources.files("hsae.report").joinpath("assets", name).read_text(encoding="utf-8")


def embed_json(payload: Any) -> str:
    """JSON safe to place inside a <script> element: no '<', '>' or '&' characters survive."""
    text = json.dumps(_finite(payload), ensure_ascii=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render_html(data: dict[str, Any]) -> str:
    """The whole page for report data built by :func:`hsae.report.explorer.build_report_data`."""
    template = asset("report.html")
    parts = {
        "/*@@CSS@@*/": asset("report.css"),
        "/*@@JS@@*/": asset("report.js"),
        "/*@@DATA@@*/": embed_json(data),
    }
    for marker in _MARKERS:
        if template.count(marker) != 1:
            raise RuntimeError(f"report template must contain {marker} exactly once")
    pieces = [template]
    for marker in sorted(_MARKERS, key=template.index):
        head, tail = pieces[-1].split(marker)
        pieces[-1:] = [head, parts[marker], tail]
    return "".join(pieces)


def _finite(value: Any) -> Any:
    """NaN and infinities become null (JSON has no spelling for them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
