"""The documentation names every setting with its current default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hsae.config import HSAEConfig
from hsae.runs import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _reference_module():
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts/config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_doc_lists_every_setting_with_its_default() -> None:
    text = (ROOT / "docs/runs.md").read_text(encoding="utf-8")
    module = _reference_module()
    for model in (RunConfig, HSAEConfig):
        for line in module.reference_table(model).splitlines()[2:]:
            assert line in text, (
                f"docs/runs.md is stale; regenerate with scripts/config_reference.py: {line}"
            )


def test_method_doc_names_functions_that_exist() -> None:
    import hsae.model.forest as forest
    import hsae.model.hierarchy_losses as losses
    import hsae.model.kernels as kernels
    import hsae.training.sparsity as sparsity

    text = (ROOT / "docs/method.md").read_text(encoding="utf-8")
    for module, names in [
        (
            losses,
            [
                "parent_children_constraint",
                "stack_constraint",
                "stack_forest",
                "sample_perturbation",
                "perturbed_reconstruction",
            ],
        ),
        (forest, ["leave_bottom_quantile_unassigned", "cap_children_per_parent", "best_parents"]),
        (kernels, ["JumpReLU", "L0WithSTE", "rectangle_band"]),
        (sparsity, ["AdaptiveSparsity"]),
    ]:
        for name in names:
            assert hasattr(module, name) and name in text
