"""Activation cache without a model: shard writer, manifest, checksums, shuffling reader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hsae.activations import ActivationCache, CacheError
from hsae.activations.cache import FORMAT, FORMAT_VERSION, ResumePoint, ShardWriter

D = 8


def _manifest(shard_tokens: int, dtype: str = "float32") -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": "synthetic"},
        "layer": 0,
        "d_model": D,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "context_length": 4,
        "config": {},
    }


def _rows(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(offset, offset + n)
    acts = np.repeat(ids[:, None].astype(np.float32), D, axis=1) + 1.0
    meta = np.stack([ids, ids // 3, ids // 3, ids % 3], axis=1).astype(np.int64)
    return acts, meta


def _write_cache(root, n_train=1000, n_heldout=200, shard_tokens=128) -> ActivationCache:
    writer = ShardWriter.create(root, _manifest(shard_tokens))
    acts, meta = _rows(n_train + n_heldout)
    writer.append("train", acts[:n_train], meta[:n_train], batch=0, first_row=0)
    writer.append("heldout", acts[n_train:], meta[n_train:], batch=0, first_row=n_train)
    writer.finish(ResumePoint(0, n_train + n_heldout))
    return ActivationCache(root)


def test_writer_shards_manifest_and_scale(tmp_path):
    cache = _write_cache(tmp_path)
    assert cache.complete
    assert cache.n_tokens("train") == 1000 and cache.n_tokens("heldout") == 200
    train = cache.shards("train")
    assert [s["n_tokens"] for s in train] == [128] * 7 + [104]
    assert all(s["split"] == "heldout" for s in cache.manifest["shards"][len(train) :])
    train_rows = cache.all_activations("train")  # held-out rows never enter the scale
    expected = math.sqrt(D) / train_rows.double().norm(dim=1).mean().item()
    assert cache.scale == pytest.approx(expected, rel=1e-9)
    scaled = cache.all_activations("train", scaled=True)
    assert torch.allclose(scaled, cache.all_activations("train") * cache.scale)
    cache.verify()


def test_reader_finite_pass_covers_every_row_once(tmp_path):
    cache = _write_cache(tmp_path)
    batches = list(cache.reader(96, split="train", seed=3, shuffle_buffer=300, loop=False))
    assert all(b.dtype == torch.float32 and b.shape[1] == D for b in batches)
    assert [len(b) for b in batches] == [96] * 10 + [40]
    ids = torch.cat(batches)[:, 0].long() - 1
    assert sorted(ids.tolist()) == list(range(1000))
    assert ids.tolist() != list(range(1000)), "rows were not shuffled"
    heldout = torch.cat(list(cache.reader(64, split="heldout", loop=False)))[:, 0].long() - 1
    assert sorted(heldout.tolist()) == list(range(1000, 1200))


def test_reader_is_seeded_and_loops(tmp_path):
    cache = _write_cache(tmp_path)
    a = [next(cache.reader(100, seed=1, shuffle_buffer=256)) for _ in range(1)]
    b = [next(cache.reader(100, seed=1, shuffle_buffer=256)) for _ in range(1)]
    c = [next(cache.reader(100, seed=2, shuffle_buffer=256)) for _ in range(1)]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    reader = cache.reader(300, seed=1, shuffle_buffer=256)
    rows = torch.cat([next(reader) for _ in range(10)])[:, 0].long() - 1  # three epochs
    for epoch in range(3):
        assert sorted(rows[epoch * 1000 : (epoch + 1) * 1000].tolist()) == list(range(1000))
    assert not torch.equal(rows[:1000], rows[1000:2000]), "epochs should differ in order"


def test_reader_state_dict_resumes_exact_sequence(tmp_path):
    cache = _write_cache(tmp_path)
    reader = cache.reader(70, seed=5, shuffle_buffer=200)
    for _ in range(13):
        next(reader)
    state = json.loads(json.dumps(reader.state_dict()))
    expected = [next(reader) for _ in range(25)]
    resumed = cache.reader(70, seed=5, shuffle_buffer=200)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(x, y) for x, y in zip(expected, [next(resumed) for _ in range(25)], strict=True)
    )
    with pytest.raises(CacheError, match="seed"):
        cache.reader(70, seed=6, shuffle_buffer=200).load_state_dict(state)


def test_unshuffled_reader_keeps_storage_order(tmp_path):
    cache = _write_cache(tmp_path)
    rows = torch.cat(list(cache.reader(128, shuffle_buffer=0, loop=False)))
    assert torch.equal(rows, cache.all_activations("train"))


def test_token_info_aligned_with_rows(tmp_path):
    cache = _write_cache(tmp_path)
    info = cache.token_info("train")
    acts = cache.all_activations("train")
    assert len(info) == len(acts) == 1000
    assert np.array_equal(info.token_ids, acts[:, 0].long().numpy() - 1)
    window, at = cache.context_tokens(301, before=5, after=5)
    assert list(window) == [300, 301, 302] and at == 1  # context 100 holds rows 300-302


def test_flipped_byte_is_reported(tmp_path):
    cache = _write_cache(tmp_path)
    shard = cache.manifest["shards"][2]
    path = tmp_path / shard["acts"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"train-00002\.acts\.npy is corrupted"):
        ActivationCache(tmp_path).verify()
    with pytest.raises(CacheError, match="corrupted"):
        list(ActivationCache(tmp_path).reader(64, loop=False, shuffle_buffer=0))


def test_truncated_shard_is_reported(tmp_path):
    cache = _write_cache(tmp_path)
    path = tmp_path / cache.manifest["shards"][0]["acts"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CacheError, match="train-00000.acts.npy"):
        ActivationCache(tmp_path).verify()
    with pytest.raises(CacheError, match="truncated"):
        ActivationCache(tmp_path).open_shard(cache.manifest["shards"][0], verify=False)


def test_missing_manifest_and_bad_split(tmp_path):
    with pytest.raises(CacheError, match="manifest.json is missing"):
        ActivationCache(tmp_path)
    cache = _write_cache(tmp_path)
    with pytest.raises(CacheError, match="split must be one of"):
        cache.n_tokens("validation")


def test_resume_drops_unrecorded_shard_files(tmp_path):
    writer = ShardWriter.create(tmp_path, _manifest(100))
    acts, meta = _rows(250)
    writer.append("train", acts, meta, batch=0, first_row=0)
    orphan = tmp_path / "shards" / "train-00002.acts.npy"
    orphan.write_bytes(b"half written by a killed process")
    resumed = ShardWriter.resume(tmp_path)
    assert not orphan.exists()
    assert resumed.resume_point == ResumePoint(0, 200)
    assert resumed.stored("train") == 200
