"""Print the Markdown reference of every run and HSAE setting with its default (docs/runs.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from hsae.config import HSAEConfig
from hsae.runs import RunConfig


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "null" if value is None else f"`{value}`"


def _doc(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    return (field.description or "").replace("\n", " ").replace("|", "/")


def reference_table(model: type[BaseModel]) -> str:
    lines = ["| field | default | meaning |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        lines.append(f"| `{name}` | {_default(field)} | {_doc(model, name)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("### Run settings (`RunConfig`)\n")
    print(reference_table(RunConfig))
    print("\n### HSAE settings (`HSAEConfig`, the `hsae:` block of a run)\n")
    print(reference_table(HSAEConfig))
