"""Feature labels: RUN/labels.json, written by people now and by a judge model later.

Layout (every part optional)::

    {
      "hsae":     {"0:12": "animals", "1:40": "dogs"},          # human labels, "level:index"
      "baseline": {"2:7": "punctuation"},
      "auto":     {"hsae": {"0:12": {"label": "fauna", "score": 0.8, "judge": "model-name"}}},
      "judge":    {"endpoint": null, "model": null}               # where auto labels come from
    }

Human labels win; the page shows an automatic label (marked "auto") only where no human one
exists. ``auto`` and ``judge`` are the hook for automatic labelling: nothing calls a judge yet,
a later labeller fills ``auto`` and records the endpoint and model it used under ``judge``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hsae.errors import HSAEError
from hsae.io import write_json
from hsae.layout import LABELS_FILE, MODEL_NAMES

_KEY = re.compile(r"^\d+:\d+$")
_SECTIONS = (*MODEL_NAMES, "auto", "judge")


class LabelsError(HSAEError, ValueError):
    """labels.json exists but does not have the documented shape."""


def load_labels(run_dir: str | Path) -> dict[str, Any]:
    """The run's labels ({} when there is no labels.json); refuse a malformed file."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LabelsError(f"{path} is not valid JSON: {error}") from None
    _check(labels, path)
    return labels


def save_labels(run_dir: str | Path, labels: dict[str, Any]) -> Path:
    """Validate and write RUN/labels.json atomically."""
    path = Path(run_dir) / LABELS_FILE
    _check(labels, path)
    write_json(path, labels)
    return path


def _check(labels: Any, path: Path) -> None:
    if not isinstance(labels, dict):
        raise LabelsError(f"{path} must hold a JSON object")
    unknown = sorted(set(labels) - set(_SECTIONS))
    if unknown:
        raise LabelsError(f"{path}: unknown section {unknown[0]!r} (allowed: {_SECTIONS})")
    for which in MODEL_NAMES:
        _check_section(labels.get(which, {}), f"{path}: {which}", human=True)
    auto = labels.get("auto", {})
    if not isinstance(auto, dict):
        raise LabelsError(f"{path}: auto must be an object of model name -> labels")
    for which, section in auto.items():
        _check_section(section, f"{path}: auto.{which}", human=False)
    if not isinstance(labels.get("judge", {}), dict | type(None)):
        raise LabelsError(f"{path}: judge must be an object (endpoint, model) or null")


def _check_section(section: Any, where: str, human: bool) -> None:
    if not isinstance(section, dict):
        raise LabelsError(f'{where} must be an object of "level:index" -> label')
    for key, value in section.items():
        if not _KEY.match(key):
            raise LabelsError(f'{where}: key {key!r} is not "level:index"')
        auto_ok = not human and isinstance(value, dict) and isinstance(value.get("label"), str)
        if not (isinstance(value, str) or auto_ok):
            raise LabelsError(f"{where}: label of {key} must be a string")
