"""The cache at scale: bfloat16 storage, the reader's cross-shard mixing, prefetch thread and
per-rank streams, the free-disk check, and the multi-process (torchrun, gloo) harvest against a
single-process one, on a tiny random Gemma 3 model with the embedded tokenizer."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsae.activations import ActivationCache, CacheError, HarvestConfig, HarvestError  # noqa: E402
from hsae.activations import harvest as run_harvest  # noqa: E402
from hsae.activations.cache import ResumePoint, ShardWriter  # noqa: E402
from hsae.activations.parallel import harvest_parallel  # noqa: E402
from test_activations_cache import _manifest  # noqa: E402  (the same synthetic manifest)

D = 8
SETTINGS = {
    "layer": 1,
    "tokens": 1500,
    "context_length": 24,
    "batch_size": 4,  # 4 x 23 = 92 rows per model batch: shards end mid-batch
    "shard_tokens": 200,
    "heldout_fraction": 0.3,  # 1050 train rows: the split boundary is inside a shard's batch
    "dtype": "bfloat16",
}


# --------------------------------------------------------------------------- synthetic caches


def _cache(root: Path, dtype: str = "float32", n: int = 1000, shard_tokens: int = 128):
    """A one-split cache of `n` random rows (distinct, so a row identifies itself)."""
    ids = np.arange(n)
    acts = np.random.default_rng(0).normal(size=(n, D)).astype(np.float32)
    acts[:, 0] = ids  # row id (exact in float32; compared as float32 reads)
    meta = np.stack([ids, ids // 3, ids // 3, ids % 3], axis=1).astype(np.int64)
    writer = ShardWriter.create(root, _manifest(shard_tokens, dtype))
    writer.append("train", acts, meta, batch=0, first_row=0)
    writer.finish(ResumePoint(0, n))
    return ActivationCache(root), acts


def _ids(batches: list[torch.Tensor], cache: ActivationCache) -> list[int]:
    """Row ids of read rows, found by matching whole rows against the stored rows."""
    stored = cache.all_activations("train")
    lookup = {tuple(row.tolist()): i for i, row in enumerate(stored)}
    return [lookup[tuple(row.tolist())] for row in torch.cat(batches)]


def test_bfloat16_storage_rounds_like_torch_and_reads_float32(tmp_path):
    cache, acts = _cache(tmp_path, "bfloat16", n=300)
    expected = torch.from_numpy(acts).to(torch.bfloat16).float()
    stored = np.load(tmp_path / cache.manifest["shards"][0]["acts"])
    assert stored.dtype == np.uint16  # raw bits: half the bytes of float32
    assert torch.equal(cache.all_activations("train"), expected)
    assert not torch.equal(expected, torch.from_numpy(acts)), "bfloat16 should round"
    rows = torch.cat(list(cache.reader(64, shuffle_buffer=0, loop=False)))
    assert rows.dtype == torch.float32 and torch.equal(rows, expected)
    view, _ = cache.open_shard(cache.manifest["shards"][1])
    assert np.array_equal(view[5:9], expected[133:137].numpy())  # what evaluation code indexes
    assert np.array_equal(np.asarray(view, dtype=np.float32), expected[128:256].numpy())
    cache.verify()
    norms = expected.double().norm(dim=1).mean().item()
    assert cache.scale == pytest.approx(np.sqrt(D) / norms, rel=1e-9)


def test_float16_cache_still_loads(tmp_path):
    cache, acts = _cache(tmp_path, "float16", n=200)
    assert torch.equal(cache.all_activations("train"), torch.from_numpy(acts).half().float())


def test_blocks_mix_rows_of_many_shards(tmp_path):
    cache, _ = _cache(tmp_path, n=1280, shard_tokens=128)  # 10 shards
    reader = cache.reader(256, seed=4, shuffle_buffer=256, mix_shards=4, loop=False)
    first = _ids([next(reader)], cache)
    assert len({i // 128 for i in first}) >= 3, "one block should hold rows of several shards"
    rows = first + _ids(list(reader), cache)
    assert sorted(rows) == list(range(1280))  # still every row once per pass


def test_prefetch_gives_the_same_stream_and_resumes(tmp_path):
    cache, _ = _cache(tmp_path)
    plain = cache.reader(70, seed=5, shuffle_buffer=200, prefetch=0)
    ahead = cache.reader(70, seed=5, shuffle_buffer=200, prefetch=3)
    for _ in range(40):  # three epochs
        assert torch.equal(next(plain), next(ahead))
    state = json.loads(json.dumps(ahead.state_dict()))
    expected = [next(ahead) for _ in range(15)]
    resumed = cache.reader(70, seed=5, shuffle_buffer=200, prefetch=3)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(15)], strict=True)
    )
    threads = [t for t in threading.enumerate() if t.name.startswith("hsae-cache-")]
    assert threads
    for reader in (plain, ahead, resumed):
        reader.close()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "close() should stop the prefetch thread"


def test_dropped_reader_stops_its_threads(tmp_path):
    cache, _ = _cache(tmp_path)
    before = set(threading.enumerate())
    reader = cache.reader(70, seed=5, shuffle_buffer=200, prefetch=2)
    next(reader)
    started = [t for t in set(threading.enumerate()) - before if t.name.startswith("hsae-cache-")]
    assert len(started) == 2  # the block reader and the batch maker
    del reader
    gc.collect()
    for thread in started:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in started)


def test_error_in_prefetch_thread_reaches_the_consumer(tmp_path):
    cache, _ = _cache(tmp_path, n=1280)
    shard = cache.manifest["shards"][9]
    path = tmp_path / shard["acts"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    reader = ActivationCache(tmp_path).reader(64, shuffle_buffer=0, loop=False, prefetch=2)
    with pytest.raises(CacheError, match=r"train-00009\.acts\.npy is corrupted"):
        list(reader)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_streams_are_disjoint_and_cover_every_row(tmp_path, world):
    cache, _ = _cache(tmp_path, n=1000, shard_tokens=100)
    per_rank = []
    for rank in range(world):
        reader = cache.reader(
            50, seed=2, shuffle_buffer=150, loop=False, rank=rank, world_size=world
        )
        batches = list(reader)
        assert len(batches) == len(reader)
        per_rank.append(_ids(batches, cache))
    assert all(per_rank)
    union = [row for rows in per_rank for row in rows]
    assert sorted(union) == list(range(1000)), "ranks should split one pass exactly"
    # looping: each rank's stream resumes exactly; another rank's state is refused
    reader = cache.reader(50, seed=2, shuffle_buffer=150, rank=1, world_size=world)
    for _ in range(30):
        next(reader)
    state = reader.state_dict()
    expected = [next(reader) for _ in range(10)]
    resumed = cache.reader(50, seed=2, shuffle_buffer=150, rank=1, world_size=world)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(10)], strict=True)
    )
    with pytest.raises(CacheError, match="rank"):
        cache.reader(50, seed=2, shuffle_buffer=150, rank=0, world_size=world).load_state_dict(
            state
        )
    with pytest.raises(CacheError, match="rank must be in"):
        cache.reader(50, rank=world, world_size=world)


def test_single_rank_stream_is_the_plain_stream(tmp_path):
    cache, _ = _cache(tmp_path)
    a = cache.reader(64, seed=9, shuffle_buffer=256)
    b = cache.reader(64, seed=9, shuffle_buffer=256, rank=0, world_size=1)
    assert all(torch.equal(next(a), next(b)) for _ in range(40))


# --------------------------------------------------------------------------- harvest


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-block random Gemma 3 text model (width 32) with the embedded model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hsae.activations.models import _embedded_model_folder

    embedded = _embedded_model_folder()
    folder = tmp_path_factory.mktemp("tiny") / "tiny-gemma"
    layer_types = AutoConfig.from_pretrained(str(embedded)).layer_types[:2]
    config = AutoConfig.from_pretrained(
        str(embedded),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        layer_types=layer_types,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    for name in os.listdir(embedded):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(embedded / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    from hsae.activations import load_language_model

    return load_language_model(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def single(tiny_model, tiny_lm, tmp_path_factory) -> ActivationCache:
    config = HarvestConfig(model=str(tiny_model), **SETTINGS)
    return run_harvest(
        config, tmp_path_factory.mktemp("single") / "acts", lm=tiny_lm, progress=False
    )


def _same_cache(a: ActivationCache, b: ActivationCache) -> None:
    """Same shards (names, sizes, split, checksums), hence the same rows in the same places."""
    keys = ("index", "split", "acts", "tokens", "n_tokens", "sha256", "tokens_sha256")
    assert [{k: s[k] for k in keys} for s in a.manifest["shards"]] == [
        {k: s[k] for k in keys} for s in b.manifest["shards"]
    ]
    assert a.manifest["n_tokens"] == b.manifest["n_tokens"] and a.scale == b.scale
    assert b.complete and sorted(p.name for p in (b.root / "shards").iterdir()) == sorted(
        p.name for p in (a.root / "shards").iterdir()
    )
    b.verify()


def test_single_cache_layout(single):
    assert single.dtype == "bfloat16" and single.complete
    assert single.n_tokens("train") == 1050 and single.n_tokens("heldout") == 450
    assert [s["n_tokens"] for s in single.shards("train")] == [200] * 5 + [50]


def test_parallel_code_as_one_process_equals_the_single_harvest(
    tiny_model, tiny_lm, single, tmp_path
):
    config = HarvestConfig(model=str(tiny_model), **SETTINGS)
    out = tmp_path / "acts"
    calls = []

    def kill_after_some_batches() -> None:
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # a kill mid-harvest: some shards done, one half-filled

    with pytest.raises(KeyboardInterrupt):
        harvest_parallel(
            config, out, lm=tiny_lm, progress=False, on_progress=kill_after_some_batches
        )
    records = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert 0 < len(records) < 9 and json.loads((out / "manifest.json").read_text())["parallel"]
    # harvest() sees an unfinished multi-process cache and resumes it the same way
    cache = run_harvest(config, out, lm=tiny_lm, progress=False)
    _same_cache(single, cache)


def test_free_disk_is_checked_before_writing(tiny_model, tiny_lm, tmp_path):
    config = HarvestConfig(model=str(tiny_model), **{**SETTINGS, "tokens": 10**12})
    with pytest.raises(HarvestError, match=r"not enough free disk .* needs 9[0-9.]+ TB more") as e:
        run_harvest(config, tmp_path / "acts", lm=tiny_lm, progress=False)
    assert "\n" not in str(e.value) and "is free" in str(e.value)
    assert not (tmp_path / "acts").exists()


def _torchrun(nproc: int, tiny_model: Path, out: Path, program: tuple[str, ...] = ()) -> None:
    """`torchrun -m hsae harvest` on the tiny model (or another `program` and its arguments)."""
    args = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])
    harvest_cli = ("-m", "hsae", "harvest", f"--model={tiny_model}", f"--out={out}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *(program or (*harvest_cli, "--device=cpu", *args)),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


RANK0_SCRIPT = """
import json, sys
from hsae import distributed
from hsae.activations import HarvestConfig, harvest
distributed.init()
if distributed.rank() == 0:  # as `hsae train` does: process 0 harvests, the others wait
    harvest(HarvestConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False, parallel=False)
distributed.barrier()
distributed.destroy()
"""


@pytest.mark.slow
def test_rank0_alone_can_harvest_inside_a_process_group(tiny_model, single, tmp_path):
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_SCRIPT)
    settings = json.dumps({"model": str(tiny_model), "device": "cpu", **SETTINGS})
    _torchrun(2, tiny_model, tmp_path / "acts", (str(script), settings, str(tmp_path / "acts")))
    _same_cache(single, ActivationCache(tmp_path / "acts"))


@pytest.mark.slow
def test_two_process_torchrun_harvest_equals_one_process(tiny_model, single, tmp_path):
    out = tmp_path / "acts"
    _torchrun(2, tiny_model, out)
    _same_cache(single, ActivationCache(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parallel"] and not list((out / "shards").glob("*.json"))
    writers = [(s["index"], s["written_by"]) for s in manifest["shards"]]
    assert writers == [(k, {"rank": k % 2, "world_size": 2}) for k in range(len(writers))]


@pytest.mark.slow
def test_killed_rank_resumes_under_torchrun(tiny_model, tiny_lm, single, tmp_path):
    """A 3-process run is killed (simulated: a one-process start stopped after a few batches,
    and one finished shard's files torn); a 2-process torchrun run finishes the same cache."""
    config = HarvestConfig(model=str(tiny_model), **SETTINGS)
    out = tmp_path / "acts"
    calls = []

    def stop() -> None:
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest_parallel(config, out, lm=tiny_lm, progress=False, on_progress=stop)
    first = out / "shards" / "train-00000.acts.npy"
    first.write_bytes(first.read_bytes()[:-64])  # torn: its record no longer counts
    _torchrun(2, tiny_model, out)
    _same_cache(single, ActivationCache(out))
    writers = [s["written_by"] for s in ActivationCache(out).manifest["shards"]]
    assert writers[0] == {"rank": 0, "world_size": 2}, "the torn shard is harvested again"
    assert {"rank": 0, "world_size": 1} in writers, "shards finished before the kill are kept"
