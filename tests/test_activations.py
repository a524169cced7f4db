"""Harvesting real activations from the embedded Gemma 3 270M: capture, cache contents, crash
resume (kill -9), streaming, CLI and input errors. The dequantised model is cached under
$HSAE_CACHE_DIR (default ~/.cache/hsae) and reused across runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsae.activations import (  # noqa: E402
    ActivationCache,
    CacheError,
    CorpusError,
    HarvestConfig,
    HarvestError,
    ModelLoadError,
    capture_residual,
    harvest,
    load_language_model,
    stream_activations,
)

LAYER = 4
SETTINGS = {
    "layer": LAYER,
    "tokens": 2048,  # 1280 train rows = 5 full shards: the split boundary is a shard boundary
    "context_length": 32,
    "batch_size": 8,
    "shard_tokens": 256,  # 8 x 31 = 248 rows per batch: shards end mid-batch
    "heldout_fraction": 0.375,
}
KILL_SCRIPT = """
import json, sys
from hsae.activations import HarvestConfig, harvest
harvest(HarvestConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False)
"""


@pytest.fixture(scope="module")
def lm():
    return load_language_model()


@pytest.fixture(scope="module")
def cache(lm, tmp_path_factory) -> ActivationCache:
    out = tmp_path_factory.mktemp("cache") / "acts"
    return harvest(HarvestConfig(**SETTINGS), out, lm=lm, progress=False)


def _single_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_embedded_model(lm):
    assert (lm.name, lm.d_model, lm.n_layers) == ("gemma-3-270m", 640, 18)
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert lm.tokenizer.bos_token_id == 2


def test_capture_stops_after_layer_and_matches_hidden_states(lm):
    enc = lm.tokenizer(["The cat sat on the mat.", "Hi"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        full = lm.model(**enc, output_hidden_states=True).hidden_states
    ran = []
    hooks = [
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
        for i, block in enumerate(lm.model.model.layers)
    ]
    try:
        captured = capture_residual(lm, enc["input_ids"], enc["attention_mask"], LAYER)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == list(range(LAYER + 1)), "blocks after `layer` must not run"
    assert captured.shape == (2, enc["input_ids"].shape[1], 640)
    assert torch.equal(captured, full[LAYER + 1])


def test_cache_shape_tokens_and_bos_excluded(cache, lm):
    manifest = cache.manifest
    assert manifest["layer"] == LAYER and manifest["d_model"] == 640
    assert manifest["model"]["name"] == "gemma-3-270m" and cache.complete
    assert (cache.n_tokens("train"), cache.n_tokens("heldout")) == (1280, 768)
    assert cache.all_activations("train").shape == (1280, 640)
    for split in ("train", "heldout"):
        info = cache.token_info(split)
        assert info.positions.min() >= 1, "BOS position must be excluded"
        assert not np.isin(info.token_ids, [lm.tokenizer.bos_token_id, lm.pad_token_id]).any()
    train, heldout = cache.token_info("train"), cache.token_info("heldout")
    assert not set(train.context_ids.tolist()) & set(heldout.context_ids.tolist())
    assert heldout.positions[0] == 1, "the held-out split starts at a context boundary"
    cache.verify()


def test_rows_are_the_layer_activations_of_their_tokens(cache, lm):
    info = cache.token_info("train")
    rows = np.flatnonzero(info.context_ids == 3)
    assert info.positions[rows].tolist() == list(range(1, 32))
    ids = torch.tensor([[lm.tokenizer.bos_token_id, *info.token_ids[rows].tolist()]])
    expected = capture_residual(lm, ids, torch.ones_like(ids), LAYER)[0, 1:]
    stored = cache.all_activations("train")[rows]
    assert torch.allclose(stored, expected, rtol=1e-3, atol=1e-2 * expected.abs().mean().item())
    before, token, after = cache.context_text(
        int(rows[10]), before=5, after=2, tokenizer=lm.tokenizer
    )
    assert token == lm.tokenizer.decode([int(info.token_ids[rows[10]])]) and before and after


def test_scale_brings_mean_norm_to_sqrt_d(cache):
    train = cache.all_activations("train")  # held-out rows never enter the scale
    mean_norm = (train.double() * cache.scale).norm(dim=1).mean().item()
    assert mean_norm == pytest.approx(math.sqrt(640), rel=1e-6)
    raw, scaled = next(cache.reader(128, seed=1)), next(cache.reader(128, seed=1, scaled=True))
    assert torch.allclose(scaled, raw * cache.scale)


def test_resume_after_kill9_gives_identical_cache(cache, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(SETTINGS), str(out)], env=env
    )
    deadline = time.monotonic() + 150
    manifest_path = out / "manifest.json"
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if manifest_path.exists() and len(json.loads(manifest_path.read_text())["shards"]) >= 3:
                break
            time.sleep(0.02)
        assert process.poll() is None, "harvest finished (or died) before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    interrupted = json.loads(manifest_path.read_text())
    assert interrupted["status"] == "in_progress"
    assert 0 < sum(interrupted["n_tokens"].values()) < SETTINGS["tokens"]

    resumed = harvest(HarvestConfig(**SETTINGS), out, progress=False)
    assert resumed.complete
    resumed.verify()

    assert _fingerprint(resumed) == _fingerprint(cache)
    assert resumed.scale == cache.scale
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        p.name for p in (cache.root / "shards").iterdir()
    )


def _fingerprint(c: ActivationCache) -> list:
    return [
        (s["split"], s["n_tokens"], s["sha256"], s["tokens_sha256"]) for s in c.manifest["shards"]
    ]


def test_resume_at_split_boundary_and_inside_heldout(cache, lm, tmp_path):
    """Simulated crashes right after the last train shard and after the first held-out shard."""
    shards = cache.manifest["shards"]
    last_train = max(i for i, s in enumerate(shards) if s["split"] == "train")
    for keep in (last_train + 1, last_train + 2):
        out = tmp_path / f"crash-{keep}"
        shutil.copytree(cache.root, out)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["status"] = "in_progress"
        manifest["shards"] = manifest["shards"][:keep]
        for split in ("train", "heldout"):
            manifest["n_tokens"][split] = sum(
                s["n_tokens"] for s in manifest["shards"] if s["split"] == split
            )
        (out / "manifest.json").write_text(json.dumps(manifest))
        resumed = harvest(HarvestConfig(**SETTINGS), out, lm=lm, progress=False)
        assert _fingerprint(resumed) == _fingerprint(cache)


def test_resume_refuses_other_settings_and_overwrite_starts_over(cache, lm, tmp_path):
    with pytest.raises(CacheError, match="other settings") as info:
        harvest(HarvestConfig(**{**SETTINGS, "layer": 5}), cache.root, lm=lm, progress=False)
    assert "layer: 4 -> 5" in _single_line(info)
    out = tmp_path / "small"
    small = {**SETTINGS, "tokens": 300}
    first = harvest(HarvestConfig(**small), out, lm=lm, progress=False)
    aliases = {**small, "dataset": "wordnet", "model": "gemma-3-270m"}  # same settings, spelled out
    again = harvest(HarvestConfig(**aliases), out, lm=lm, progress=False)  # complete: no work
    assert again.manifest["shards"] == first.manifest["shards"]
    fresh = harvest(
        HarvestConfig(**{**small, "layer": 2}), out, lm=lm, overwrite=True, progress=False
    )
    assert fresh.manifest["layer"] == 2


def test_stream_matches_cache_and_resumes(cache, lm):
    stream = stream_activations(
        lm=lm, layer=LAYER, batch_size=64, context_length=32, model_batch_size=8, shuffle_buffer=0
    )
    first = next(stream)
    assert first.shape == (64, 640) and first.dtype == torch.float32
    assert torch.allclose(first, cache.all_activations("train")[:64], rtol=1e-4, atol=1e-2)
    shuffled = stream_activations(
        lm=lm,
        layer=LAYER,
        batch_size=100,
        context_length=32,
        model_batch_size=8,
        shuffle_buffer=300,
    )
    next(shuffled)
    state = shuffled.state_dict()
    expected = [next(shuffled) for _ in range(4)]
    shuffled.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(expected, [next(shuffled) for _ in range(4)], strict=True)
    )


def test_bad_inputs_fail_cleanly_without_writing(lm, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError) as info:
        harvest(HarvestConfig(model="no-such-org/no-such-model", tokens=10), out, progress=False)
    assert "no-such-org/no-such-model" in _single_line(info)
    with pytest.raises(HarvestError, match=r"layer 18 is out of range.*\[0, 17\]") as info:
        harvest(HarvestConfig(layer=18, tokens=10), out, lm=lm, progress=False)
    _single_line(info)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="is empty") as info:
        harvest(HarvestConfig(dataset=str(tmp_path / "empty.txt")), out, lm=lm, progress=False)
    _single_line(info)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CorpusError, match="not readable") as info:
        harvest(
            HarvestConfig(dataset=str(tmp_path / "broken.jsonl.gz")), out, lm=lm, progress=False
        )
    _single_line(info)
    assert not out.exists(), "a failed harvest must not leave a cache behind"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(HarvestError, match="not a folder") as info:
        harvest(HarvestConfig(tokens=10), blocker / "cache", progress=False)
    _single_line(info)
    with pytest.raises(HarvestError, match="HarvestConfig.tokens") as info:
        HarvestConfig(tokens=0)
    _single_line(info)
    with pytest.raises(HarvestError, match="HarvestConfig.heldout_fraction"):
        HarvestConfig(heldout_fraction=1.5)


def test_cli_harvest_and_error(tmp_path):
    from typer.testing import CliRunner

    from hsae.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["harvest", "--tokens", "200", "--context-length", "16", "--layer", "2"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ActivationCache(out).n_tokens("train") + ActivationCache(out).n_tokens("heldout") == 200
    bad = runner.invoke(app, ["harvest", "--layer", "99", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "layer 99 is out of range" in bad.output
    assert not (tmp_path / "bad").exists()
