"""The package's structure: no import cycles, and dependencies point down.

Every ``import`` in every module counts, including function-local and TYPE_CHECKING ones: a
lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hsae"

FOUNDATION = {
    "hsae.config",
    "hsae.errors",
    "hsae.io",
    "hsae.layout",
    "hsae.devices",
    "hsae.distributed",  # the torchrun process group: torch.distributed and hsae.errors only
}
ALLOWED_BELOW = {
    # layer: the modules (by prefix) it may import besides itself
    "hsae.model": FOUNDATION,
    "hsae.training": FOUNDATION | {"hsae.model"},
}
NEVER_IMPORT_RUNS = ("hsae.evaluation", "hsae.report")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a package's ``__init__`` stands for itself)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles among modules, package ``__init__`` re-exports left out (they import their
    children by design; the children must not import each other in a circle)."""
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    edges = {m: {d for d in deps if d not in packages} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in sorted(edges):
        if module not in state and module not in packages:
            visit(module, [module])
    return cycles


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(ALLOWED_BELOW))
def test_lower_layers_import_nothing_above_them(layer: str) -> None:
    allowed = ALLOWED_BELOW[layer] | {layer}
    upward = {
        (module, dep)
        for module, deps in _graph().items()
        if _in(module, layer)
        for dep in deps
        if not any(_in(dep, prefix) for prefix in allowed)
    }
    assert upward == set()


@pytest.mark.parametrize("layer", NEVER_IMPORT_RUNS)
def test_evaluation_and_report_read_runs_through_the_protocol(layer: str) -> None:
    offending = {
        (module, dep)
        for module, deps in _graph().items()
        if _in(module, layer)
        for dep in deps
        if dep in ("hsae.runs", "hsae.cli", "hsae.ablations")
    }
    assert offending == set()


def test_the_checker_sees_cycles_and_upward_imports(tmp_path) -> None:
    """The checks above could pass by seeing nothing: they must see a planted cycle."""
    graph = _graph()
    assert graph["hsae.training.trainer"] >= {"hsae.model.hsae", "hsae.training.checkpoint"}
    planted = dict(graph) | {"hsae.model.forest": graph["hsae.model.forest"] | {"hsae.runs"}}
    planted["hsae.runs"] = graph["hsae.runs"] | {"hsae.model.forest"}
    assert any("hsae.runs" in cycle for cycle in _cycles(planted))
    assert not _in("hsae.runs", "hsae.model") and _in("hsae.model.forest", "hsae.model")
