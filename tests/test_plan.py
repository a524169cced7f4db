"""``hsae plan``: sizes, memory and FLOPs from their formulas, a measured step, clear refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hsae.cli import app
from hsae.plan import (
    PlanError,
    PlanInputs,
    flops_per_token,
    format_plan,
    make_plan,
    memory_per_process,
    parameter_count,
)


def test_paper_size_figures_follow_from_the_shapes(tmp_path) -> None:
    inputs = PlanInputs(
        d_model=2304, level_sizes=[2048, 4096, 8192, 16384], cache_dir=str(tmp_path)
    )
    plan = make_plan(inputs, measure=False)
    assert plan.cache_bytes == 100_000_000 * 2304 * 2  # bf16: about 460 GB, as the issue says
    assert plan.parameters == sum(2 * 2304 * n + 2 * n + 2304 for n in inputs.level_sizes)
    assert plan.parameters == parameter_count(2304, inputs.level_sizes)
    assert plan.memory["adam_moments"] == 2 * plan.memory["parameters"]
    assert plan.memory["total"] == sum(v for k, v in plan.memory.items() if k != "total")
    assert plan.flops_per_token == pytest.approx(4 * 2304 * 30720 + 4 * 12 * 2304 * 50)
    assert plan.steps_per_process == 100_000_000 // 1024
    assert plan.estimated_seconds is None and plan.free_disk_bytes is not None
    # Each of two processes takes half the batch and half the tokens.
    two = memory_per_process(PlanInputs(2304, [2048, 4096, 8192, 16384], world_size=2))
    assert two["parameters"] == plan.memory["parameters"]
    assert two["batch_activations"] < plan.memory["batch_activations"]
    assert "DOES NOT FIT" not in format_plan(plan) or not plan.cache_fits


def test_measured_step_gives_a_wall_time() -> None:
    inputs = PlanInputs(
        d_model=32, level_sizes=[16, 32], train_tokens=64 * 100, batch_size=64, target_l0=4
    )
    plan = make_plan(inputs, device="cpu", repeats=1)
    assert plan.measured_step_seconds is not None and plan.measured_step_seconds > 0
    assert plan.estimated_seconds == pytest.approx(plan.measured_step_seconds * 100)
    assert "measured on cpu" in format_plan(plan)
    assert flops_per_token(32, [16, 32], 4.0) == 4 * 32 * 48 + 2 * 12 * 32 * 4


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"cache_dtype": "int8"}, "cache_dtype"),
        ({"world_size": 0}, "world_size"),
        ({"world_size": 3}, "divisible by world_size"),
        ({"level_sizes": [64, 32]}, "level_sizes"),
        ({"target_l0": 100}, "target_l0"),
    ],
)
def test_bad_inputs_are_refused_in_one_line(values: dict, field: str) -> None:
    with pytest.raises(PlanError) as error:
        PlanInputs(**({"d_model": 16, "level_sizes": [64, 128]} | values))
    assert field in str(error.value) and "\n" not in str(error.value)


def test_cli_prints_the_plan_and_writes_json(tmp_path) -> None:
    out = tmp_path / "plan.json"
    args = ["plan", "--d-model", "32", "--level-sizes", "16,32", "--train-tokens", "6400"]
    args += ["--batch-size", "64", "--target-l0", "4", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "activation cache: 6,400 rows x 32 x bfloat16" in result.output
    assert "FLOP bound on one NVIDIA H100" in result.output
    assert json.loads(out.read_text())["steps_per_process"] == 100
    bad = CliRunner().invoke(app, ["plan", "--cache-dtype", "int4", "--no-measure"])
    assert bad.exit_code == 2 and "cache_dtype" in bad.output
