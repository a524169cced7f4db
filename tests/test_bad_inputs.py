"""Bad inputs, one table: every case is refused with exit code 2 (CLI) or an HSAEError (API),
with exactly one line of message naming the field or file, and no existing file changes.

No case loads a language model: each fails before anything is loaded. The run folder the cases
use is synthetic (a hand-written activation cache and a tiny trained HSAE), built once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hsae
from hsae.activations.cache import FORMAT, FORMAT_VERSION, TOKEN_COLUMNS, ResumePoint, ShardWriter
from hsae.activations.harvest import _settings
from hsae.cli import app
from hsae.config import HSAEConfig
from hsae.errors import HSAEError
from hsae.runs import Run, RunConfig

D_MODEL = 16
N_LAYERS = 18
RUN_SETTINGS = {
    "harvest_tokens": 2048,
    "context_length": 32,
    "eval_tokens": 256,
    "splice_contexts": 0,
    "device": "cpu",
    "hsae": {
        "level_sizes": [8, 16],
        "target_l0": 2,
        "train_tokens": 1024,
        "batch_size": 256,
        "update_interval": 2,
    },
}
GOOD = {"d_in": 8, "level_sizes": [16, 32], "target_l0": 2, "train_tokens": 512, "batch_size": 64}


# --- the synthetic run folder ------------------------------------------------------------
def _write_cache(root: Path, config: RunConfig) -> None:
    harvest = config.harvest_config()
    layer = N_LAYERS // 2
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": "synthetic", "d_model": D_MODEL, "n_layers": N_LAYERS},
        "layer": layer,
        "d_model": D_MODEL,
        "dtype": "float32",
        "context_length": config.context_length,
        "shard_tokens": 4096,
        "token_columns": list(TOKEN_COLUMNS),
        "config": _settings(harvest, layer),
    }
    writer = ShardWriter.create(root, manifest)
    rng = np.random.default_rng(0)
    n_train, n_heldout = harvest.train_tokens, harvest.heldout_tokens
    for split, n, first in (("train", n_train, 0), ("heldout", n_heldout, n_train)):
        ids = np.arange(first, first + n)
        meta = np.stack([ids % 100, ids // 31, ids // 31, ids % 31], axis=1).astype(np.int64)
        acts = rng.standard_normal((n, D_MODEL)).astype(np.float32)
        writer.append(split, acts, meta, 0, 0)
    writer.finish(ResumePoint(1, 0))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose HSAE is trained and whose baseline is 'still training' (checkpoint only)."""
    root = tmp_path_factory.mktemp("template")
    config = RunConfig(**RUN_SETTINGS)
    run = Run.create(root / "run", config)
    _write_cache(run.activations_dir, config)
    cache = run.cache()
    hsae_config = config.hsae_config(D_MODEL, "hsae", cache.scale)
    model = hsae.train(hsae_config, cache.all_activations("train"), progress=False)
    model.save(run.model_dir("hsae"))
    checkpoint = run.checkpoint_dir("baseline")
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer.json").write_text('{"step": 3}')
    (root / "cache").mkdir()
    shutil.copytree(run.activations_dir, root / "cache" / "acts")
    return root


# --- the table -------------------------------------------------------------------------------
@dataclass
class Case:
    """``args``: a CLI command line (``{w}`` is the working folder); ``call``: an API call
    taking the working folder. ``names``: what the one line must mention."""

    id: str
    names: str
    args: list[str] | None = None
    call: Callable[[Path], Any] | None = None
    setup: Callable[[Path], None] | None = None
    marks: list[Any] = field(default_factory=list)


def _yaml(text: str) -> Callable[[Path], None]:
    return lambda w: (w / "config.yaml").write_text(text)


def _file(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda w: (w / name).write_bytes(data)


def _edit_run(change: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda w: change(w / "run")


def _hsae(**values: Any) -> Case:
    name = next(iter(values))
    return Case(
        f"HSAEConfig-{name}={values[name]!r}", name, call=lambda w: HSAEConfig(**(GOOD | values))
    )


def _run(**values: Any) -> Case:
    name = next(iter(values))
    return Case(f"RunConfig-{name}={values[name]!r}", name, call=lambda w: RunConfig(**values))


def _train(activations: Callable[[], Any], names: str, id: str) -> Case:
    config = HSAEConfig(**GOOD)
    return Case(
        f"train-{id}", names, call=lambda w: hsae.train(config, activations(), progress=False)
    )


def _hold_lock(w: Path) -> None:
    """Another process holds the run folder's lock (as a running `hsae train` would)."""
    script = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'pid {os.getpid()}: train baseline'.encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(w / "run" / ".lock")], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    _holders.append(holder)


_holders: list[subprocess.Popen] = []
RANDOM_BYTES = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
YAML_SYNTAX = "harvest_tokens: 2048\nhsae:\n  level_sizes: [8, 16\n  rho: 0.3\n"

CASES = [
    # HSAEConfig: every field out of range or of the wrong type
    _hsae(d_in=0),
    _hsae(d_in=True),
    _hsae(level_sizes=[]),
    _hsae(level_sizes=[32, 16]),
    _hsae(level_sizes=[0, 16]),
    _hsae(level_sizes="many"),
    _hsae(level_sizes=[True, 16]),
    _hsae(mode="dense"),
    _hsae(target_l0=0),
    _hsae(target_l0=500),
    _hsae(rho=-1.0),
    _hsae(perturbation_rate=1.5),
    _hsae(bandwidth=0.0),
    _hsae(aux_coefficient=float("inf")),
    _hsae(dead_after_tokens=0),
    _hsae(similarity="cosine"),
    _hsae(tree="bushy"),
    _hsae(unassigned_quantile=-0.1),
    _hsae(update_interval=0),
    _hsae(coactivation_every=0),
    _hsae(coactivation_momentum=1.0),
    _hsae(adaptive_sparsity="maybe"),
    _hsae(sparsity_init=-1.0),
    _hsae(l0_ema_momentum=1.0),
    _hsae(l0_decay_rate=0.0),
    _hsae(sparsity_adjust=float("nan")),
    _hsae(train_tokens=0),
    _hsae(train_tokens=10),
    _hsae(batch_size=True),
    _hsae(batch_size=2.5),
    _hsae(lr=0.0),
    _hsae(adam_beta1=2.0),
    _hsae(adam_beta2=1.0),
    _hsae(threshold_lr_multiplier=-1.0),
    _hsae(warmup_fraction=1.5),
    _hsae(activation_scale=0.0),
    _hsae(seed="x"),
    _hsae(device="banana"),
    _hsae(sparse_kernels="maybe"),
    _hsae(colour="red"),
    # RunConfig
    _run(harvest_tokens=10),
    _run(harvest_tokens=True),
    _run(context_length=1),
    _run(harvest_batch_size=0),
    _run(heldout_fraction=1.0),
    _run(hsae={"d_in": 5}),
    _run(hsae=5),
    _run(hsae={"rho": -1}),
    _run(checkpoint_every=0),
    _run(log_every=0),
    _run(eval_tokens=1),
    _run(splice_contexts=-1),
    _run(layer=-1),
    _run(seed=-1),
    _run(baseline="perhaps"),
    _run(device="banana"),
    _run(frobnicate=1),
    # hsae.train: shapes, widths, dtypes of the activations
    _train(lambda: torch.randn(1000, 5), "[N, 8]", "wrong-width"),
    _train(lambda: torch.randn(1000), "[1000]", "1-D"),
    _train(lambda: torch.randn(10, 100, 8), "[10, 100, 8]", "3-D"),
    _train(lambda: torch.randint(0, 5, (1000, 8)), "int64", "integer-tensor"),
    _train(lambda: (torch.randn(64, 5) for _ in range(20)), "[64, 5]", "iterable-wrong-width"),
    _train(lambda: (torch.randn(64) for _ in range(20)), "[64]", "iterable-1-D"),
    _train(lambda: [torch.ones(64, 8, dtype=torch.long)] * 20, "int64", "iterable-integer"),
    _train(lambda: "activations", "str", "string"),
    _train(lambda: torch.randn(10, 8), "10 rows", "fewer-rows-than-a-batch"),
    _train(lambda: iter([]), "ran out", "empty-iterable"),
    Case(
        "train-config-not-a-config",
        "HSAEConfig",
        call=lambda w: hsae.train(dict(GOOD), torch.randn(100, 8), progress=False),
    ),
    # hsae train: YAML files
    Case(
        "yaml-hsae-not-a-mapping",
        "hsae",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml("hsae: 5\n"),
    ),
    Case(
        "yaml-syntax",
        "config.yaml:4:",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml(YAML_SYNTAX),
    ),
    Case(
        "yaml-list",
        "mapping",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml("- 1\n- 2\n"),
    ),
    Case(
        "yaml-unknown-key",
        "colour",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml("colour: red\n"),
    ),
    Case(
        "yaml-number-key",
        "1",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml("1: 2\n"),
    ),
    Case(
        "yaml-bad-field",
        "harvest_tokens",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml("harvest_tokens: -5\n"),
    ),
    Case(
        "yaml-bool-for-int",
        "batch_size",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_yaml("hsae: {batch_size: true}\n"),
    ),
    Case(
        "yaml-not-utf8",
        "config.yaml",
        ["train", "{w}/config.yaml", "--out", "{w}/new"],
        setup=_file("config.yaml", b"seed: \xff\xfe\n"),
    ),
    Case("yaml-missing", "nothing.yaml", ["train", "{w}/nothing.yaml", "--out", "{w}/new"]),
    # hsae train: paths, devices, datasets, run folders
    Case(
        "out-below-a-file",
        "plain.txt",
        ["train", "--out", "{w}/plain.txt/run"],
        setup=_file("plain.txt", b"x"),
    ),
    Case(
        "out-is-a-file",
        "plain.txt",
        ["train", "--out", "{w}/plain.txt"],
        setup=_file("plain.txt", b"x"),
    ),
    Case("out-under-proc", "/proc", ["train", "--out", "/proc/hsae-test/run"]),
    Case("out-non-run-folder", "holds other files", ["train", "--out", "{w}/cache"]),
    Case("device-banana", "device", ["train", "--out", "{w}/new", "--device", "banana"]),
    Case("device-missing-gpu", "device", ["train", "--out", "{w}/new", "--device", "cuda:99"]),
    Case(
        "dataset-missing",
        "missing.txt",
        ["train", "--out", "{w}/new", "--dataset", "{w}/missing.txt"],
    ),
    Case(
        "dataset-random-bytes",
        "noise.txt",
        ["train", "--out", "{w}/new", "--dataset", "{w}/noise.txt"],
        setup=_file("noise.txt", RANDOM_BYTES),
    ),
    Case(
        "dataset-csv",
        "table.csv",
        ["train", "--out", "{w}/new", "--dataset", "{w}/table.csv"],
        setup=_file("table.csv", b"a,b\n"),
    ),
    Case(
        "dataset-empty-folder",
        "holds no",
        ["train", "--out", "{w}/new", "--dataset", "{w}/cache/acts/shards"],
    ),
    Case("r-out-of-range", "perturbation_rate", ["train", "--out", "{w}/new", "--r", "2"]),
    Case(
        "level-sizes-decreasing",
        "level_sizes",
        ["train", "--out", "{w}/new", "--level-sizes", "64,32"],
    ),
    Case(
        "level-sizes-not-numbers",
        "--level-sizes",
        ["train", "--out", "{w}/new", "--level-sizes", "a,b"],
    ),
    Case("target-l0-zero", "target_l0", ["train", "--out", "{w}/new", "--target-l0", "0"]),
    Case("batch-size-zero", "batch_size", ["train", "--out", "{w}/new", "--batch-size", "0"]),
    Case("tokens-too-few", "harvest_tokens", ["train", "--out", "{w}/new", "--tokens", "10"]),
    Case(
        "similarity-unknown", "similarity", ["train", "--out", "{w}/new", "--similarity", "cosine"]
    ),
    Case("other-settings-in-run", "layer", ["train", "--out", "{w}/run", "--layer", "3"]),
    Case("resume-with-settings", "--resume", ["train", "--resume", "{w}/run", "--rho", "1"]),
    Case("resume-not-a-run", "run.json", ["train", "--resume", "{w}/cache"]),
    Case(
        "resume-corrupt-record",
        "run.json",
        ["train", "--resume", "{w}/run"],
        setup=_edit_run(lambda r: (r / "run.json").write_text("{not json")),
    ),
    Case(
        "resume-corrupt-manifest",
        "manifest.json",
        ["train", "--resume", "{w}/run"],
        setup=_edit_run(lambda r: (r / "activations" / "manifest.json").write_text("{oops")),
    ),
    Case(
        "resume-cache-of-another-layer",
        "layer",
        ["train", "--resume", "{w}/run"],
        setup=_edit_run(lambda r: _set_manifest_layer(r / "activations", 4)),
    ),
    Case("train-while-locked", "pid", ["train", "--resume", "{w}/run"], setup=_hold_lock),
    # hsae harvest
    Case("harvest-tokens-zero", "tokens", ["harvest", "--out", "{w}/acts", "--tokens", "0"]),
    Case("harvest-dtype", "dtype", ["harvest", "--out", "{w}/acts", "--dtype", "float64"]),
    Case(
        "harvest-out-is-a-file",
        "plain.txt",
        ["harvest", "--out", "{w}/plain.txt"],
        setup=_file("plain.txt", b"x"),
    ),
    Case("harvest-out-non-cache-folder", "not empty", ["harvest", "--out", "{w}/run"]),
    Case("harvest-device", "device", ["harvest", "--out", "{w}/acts", "--device", "banana"]),
    Case(
        "harvest-other-layer",
        "layer",
        [
            "harvest",
            "--out",
            "{w}/cache/acts",
            "--layer",
            "3",
            "--tokens",
            "2048",
            "--context-length",
            "32",
        ],
    ),
    Case(
        "harvest-corrupt-manifest",
        "manifest.json",
        ["harvest", "--out", "{w}/cache/acts"],
        setup=lambda w: (w / "cache" / "acts" / "manifest.json").write_text("[1,"),
    ),
    # hsae eval
    Case("eval-not-a-run", "run.json", ["eval", "{w}/cache"]),
    Case("eval-suite", "suite", ["eval", "{w}/run", "--suite", "bogus"]),
    Case("eval-parts", "bogus", ["eval", "{w}/run", "--suite", "full", "--parts", "bogus"]),
    Case("eval-judge-pairs", "judge_pairs", ["eval", "{w}/run", "--judge-pairs", "0"]),
    Case("eval-still-training", "baseline is still training", ["eval", "{w}/run", "--no-lm"]),
    Case("eval-while-locked", "pid", ["eval", "{w}/run", "--no-lm"], setup=_hold_lock),
    # hsae report / export / ablate / demo
    Case("report-not-a-run", "run.json", ["report", "{w}/cache"]),
    Case("report-while-locked", "pid", ["report", "{w}/run"], setup=_hold_lock),
    Case("report-which", "which", ["report", "{w}/run", "--which", "bogus"]),
    Case("report-max-features", "max_features", ["report", "{w}/run", "--max-features", "0"]),
    Case("report-projection", "projection", ["report", "{w}/run", "--projection", "bogus"]),
    Case("export-format", "--format", ["export", "{w}/run", "{w}/out", "--format", "bogus"]),
    Case("export-not-a-run", "cache", ["export", "{w}/cache", "{w}/out"]),
    Case(
        "export-bare-model-no-layer",
        "--layer",
        ["export", "{w}/model", "{w}/out"],
        setup=lambda w: shutil.copytree(w / "run" / "hsae", w / "model"),
    ),
    Case("export-negative-layer", "layer", ["export", "{w}/run/hsae", "{w}/o", "--layer", "-1"]),
    Case("export-other-layer", "disagrees", ["export", "{w}/run", "{w}/o", "--layer", "0"]),
    Case("upload-repo-id", "owner/name", ["upload", "{w}/run", "no-owner"]),
    Case("upload-not-a-run", "does not exist", ["upload", "{w}/missing", "someone/forest"]),
    Case("ablate-variant", "tree=bushy", ["ablate", "{w}/run", "--variants", "tree=bushy"]),
    Case("ablate-rho-sweep", "--rho-sweep", ["ablate", "{w}/run", "--rho-sweep", "0.1,x"]),
    Case("ablate-not-a-run", "run.json", ["ablate", "{w}/cache"]),
    Case("ablate-train-tokens", "train_tokens", ["ablate", "{w}/run", "--train-tokens", "0"]),
    Case("demo-suite", "--suite", ["demo", "--out", "{w}/new", "--suite", "bogus"]),
    Case("demo-out-non-run-folder", "holds other files", ["demo", "--out", "{w}/cache"]),
]


def _set_manifest_layer(cache: Path, layer: int) -> None:
    import json

    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["config"]["layer"] = layer
    manifest["layer"] = layer
    (cache / "manifest.json").write_text(json.dumps(manifest))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"  # the lock file's content names its holder
    }


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_in_one_line_changing_nothing(
    case: Case, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "w"
    shutil.copytree(template, work)
    if case.setup is not None:
        case.setup(work)
    monkeypatch.chdir(work)
    before = _digests(work)
    try:
        if case.args is not None:
            args = [arg.replace("{w}", str(work)) for arg in case.args]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, (result.output, result.exception)
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert len(lines) == 1, result.output
            message = lines[0]
            assert message.startswith("error: "), message
        else:
            assert case.call is not None
            with pytest.raises(HSAEError) as raised:
                case.call(work)
            message = str(raised.value)
            assert "\n" not in message.strip(), message
        assert case.names.replace("{w}", str(work)) in message, message
    finally:
        while _holders:
            holder = _holders.pop()
            holder.kill()
            holder.wait()
    after = _digests(work)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert not (work / "new").exists()
    assert not os.path.exists("/proc/hsae-test")
