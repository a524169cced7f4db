"""Shared fixtures: one small real run on the embedded model, built once per test session."""

from __future__ import annotations

import importlib.util
import os

import pytest

from hsae.runs import Run, RunConfig

SMALL_RUN = {
    "harvest_tokens": 2048,
    "context_length": 32,
    "harvest_batch_size": 8,
    "heldout_fraction": 0.15,
    "eval_tokens": 256,
    "splice_contexts": 1,
    "checkpoint_every": 5,
    "log_every": 4,
    "hsae": {
        "level_sizes": [32, 64, 128],
        "target_l0": 4,
        "train_tokens": 256 * 12,
        "batch_size": 256,
        "update_interval": 4,
    },
}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Run:
    """Harvested, both models trained, evaluated (with the spliced LM loss). Read-only use:
    tests that need to change a run build their own folder from ``small_run.config``."""
    run = Run.create(tmp_path_factory.mktemp("small") / "run", RunConfig(**SMALL_RUN))
    run.harvest(progress=False)
    for which in run.wanted_models():
        run.train(which, progress=False)
    run.evaluate()
    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``saebench`` need sae-bench, which pins numpy<2 and so lives in its own
    environment (.venv-saebench, made and used by scripts/test.sh): skipped elsewhere, and an
    error where HSAE_REQUIRE_SAEBENCH=1 (that environment) cannot import it."""
    if importlib.util.find_spec("sae_bench") is not None:
        return
    if os.environ.get("HSAE_REQUIRE_SAEBENCH") == "1":
        raise pytest.UsageError("HSAE_REQUIRE_SAEBENCH=1 but sae_bench cannot be imported")
    skip = pytest.mark.skip(reason="needs sae-bench: scripts/test.sh runs it in .venv-saebench")
    for item in items:
        if "saebench" in item.keywords:
            item.add_marker(skip)
