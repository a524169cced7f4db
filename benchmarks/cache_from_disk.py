"""Training throughput from an activation cache on disk against the same training from memory.

Writes a synthetic bfloat16 cache several times larger than a memory budget (``--budget-mb``),
evicts its files from the page cache (``posix_fadvise(DONTNEED)``), and trains two identical
HSAEs in one interleaved run: one fed by ``ActivationCache.reader`` (memory-mapped shards, blocks
mixing 16 shards, background prefetch), one by batches of an in-memory tensor. Each row of the
cache is read at most once, so every disk read is a cold read (or the kernel's read-ahead). It
prints training tokens/s from disk, from memory, and their ratio; the goal is >= 0.95.

What is capped and what is not: the reader holds ``(prefetch + 2) x shuffle_buffer`` rows in
float32 (checked against the budget), the in-memory baseline a tensor of the budget's size, and
the cache on disk is ``--cache-x`` times the budget. Nothing stops the kernel from caching what
was read (page cache is not the process's memory); the script prints the process's peak RSS.

    python benchmarks/cache_from_disk.py                          # CPU, d=512, 1 GB budget x 3
    python benchmarks/cache_from_disk.py --device cuda --d 2304 --sizes 4096 16384 --budget-mb 4096
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hsae import HSAEConfig
from hsae.activations import ActivationCache
from hsae.activations.cache import FORMAT, FORMAT_VERSION, ResumePoint, ShardWriter
from hsae.training import Trainer
from hsae.training.data import TensorBatches


def write_cache(root: Path, rows: int, d: int, shard_tokens: int, seed: int = 0) -> None:
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": "synthetic"},
        "layer": 0,
        "d_model": d,
        "dtype": "bfloat16",
        "shard_tokens": shard_tokens,
        "context_length": 128,
        "config": {},
    }
    writer = ShardWriter.create(root, manifest)
    generator = torch.Generator().manual_seed(seed)
    step = 16_384
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        acts = torch.randn(n, d, generator=generator)  # the content does not matter here
        meta = np.zeros((n, 4), np.int64)
        writer.append("train", acts.numpy(), meta, batch=lo // step, first_row=0)
    writer.finish(ResumePoint(rows // step, 0))


def evict(root: Path) -> None:
    """Drop the cache's files from the page cache, so the reader reads from the disk."""
    for path in (root / "shards").glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def first_rows(cache: ActivationCache, n: int) -> torch.Tensor:
    """The first n rows of the cache as float32 (the in-memory baseline's data)."""
    parts, have = [], 0
    for shard in cache.shards("train"):
        acts, _ = cache.open_shard(shard)
        parts.append(torch.from_numpy(acts[: n - have]))
        have += len(parts[-1])
        if have >= n:
            break
    return torch.cat(parts)


def time_reader(cache: ActivationCache, args: argparse.Namespace, rows: int) -> tuple[float, int]:
    """Seconds to read `rows` rows (whole batches) with nothing else to do."""
    reader = cache.reader(
        args.batch, seed=1, shuffle_buffer=args.shuffle_buffer, prefetch=args.prefetch
    )
    start, done = time.perf_counter(), 0
    while done < rows:
        done += len(next(reader))
    reader.close()
    return time.perf_counter() - start, done


def make_trainer(args: argparse.Namespace, source: object, scale: float) -> Trainer:
    config = HSAEConfig(
        d_in=args.d,
        level_sizes=args.sizes,
        target_l0=args.target_l0,
        train_tokens=args.batch * 10_000_000,
        batch_size=args.batch,
        device=args.device,
        activation_scale=scale,
        update_interval=10**6,
    )
    trainer = Trainer(config, source)
    trainer.initialise()
    return trainer


def timed(trainer: Trainer, steps: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(exact_metrics=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--target-l0", type=float, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--budget-mb", type=float, default=1024)
    parser.add_argument("--cache-x", type=float, default=3.0, help="cache size / budget")
    parser.add_argument("--shuffle-buffer", type=int, default=32768)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved disk/memory rounds")
    parser.add_argument("--steps", type=int, default=120, help="training steps each way")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None, help="where to write the cache [a temp folder]")
    args = parser.parse_args()

    budget = args.budget_mb * 1e6
    reader_bytes = (args.prefetch + 2) * args.shuffle_buffer * args.d * 4
    if reader_bytes > budget:
        raise SystemExit(f"the reader's buffers ({reader_bytes / 1e6:.0f} MB) exceed the budget")
    rows = int(args.cache_x * budget / (args.d * 2))
    memory_rows = int(budget / (args.d * 4))
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="hsae-disk-bench-"))
    root = base / "cache"
    try:
        start = time.perf_counter()
        write_cache(root, rows, args.d, shard_tokens=65_536)
        cache = ActivationCache(root)
        size = sum(p.stat().st_size for p in (root / "shards").glob("*.acts.npy"))
        print(
            f"cache: {rows:,} rows x {args.d} bfloat16 = {size / 1e9:.2f} GB on disk "
            f"(budget {budget / 1e9:.2f} GB; reader buffers {reader_bytes / 1e6:.0f} MB), "
            f"written in {time.perf_counter() - start:.0f} s"
        )
        cache.verify()  # checksums now, so the timed reads are not spent verifying
        evict(root)
        memory = first_rows(cache, memory_rows)
        evict(root)
        read_s, read_rows = time_reader(cache, args, rows // 4)
        evict(root)
        reader = cache.reader(
            args.batch, seed=0, shuffle_buffer=args.shuffle_buffer, prefetch=args.prefetch
        )
        disk = make_trainer(args, reader, cache.scale)
        ram = make_trainer(args, TensorBatches(memory, args.batch), cache.scale)
        del memory
        steps = max(1, min(args.steps, rows // args.batch - 4) // args.rounds)
        timed(disk, 2, args.device), timed(ram, 2, args.device)  # warm-up
        disk_s = ram_s = 0.0
        ratios = []
        for index in range(args.rounds):
            if index % 2:  # alternate which goes first, so drifting load hits both alike
                m = timed(ram, steps, args.device)
                d = timed(disk, steps, args.device)
            else:
                d = timed(disk, steps, args.device)
                m = timed(ram, steps, args.device)
            disk_s, ram_s = disk_s + d, ram_s + m
            ratios.append(m / d)
        tokens = args.rounds * steps * args.batch
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
        disk_tps, ram_tps = tokens / disk_s, tokens / ram_s
        print(
            f"{args.rounds} x {steps} steps of {args.batch} tokens each way ({args.device}, "
            f"d={args.d}, sizes {args.sizes}); peak RSS {peak:.0f} MB"
        )
        print(f"reader alone, cold disk: {read_rows / read_s:,.0f} rows/s ({read_rows:,} rows)")
        print(f"from disk:   {disk_tps:,.0f} tokens/s")
        print(f"from memory: {ram_tps:,.0f} tokens/s")
        print(
            f"disk / memory: {disk_tps / ram_tps:.3f} (total time); median of the rounds' "
            f"ratios {float(np.median(ratios)):.3f}, rounds {' '.join(f'{r:.2f}' for r in ratios)}"
        )
        reader.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
