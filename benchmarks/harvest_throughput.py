"""Harvest throughput: our pipeline (tokenise + truncated forward + row selection + shard writing
with checksums) against a bare truncated forward pass and a full forward pass (all blocks +
logits) of the same model, on the same contexts, in the same process.

    python benchmarks/harvest_throughput.py [--tokens 16384] [--repeats 5]

Runs are interleaved (bare, pipeline, bare, pipeline, ...) so that load from other processes hits
both. Reported: tokens/s by wall clock (best run and median of paired ratios), tokens per CPU
second of this process (less sensitive to other processes), and the share of the pipeline's wall
time spent inside the truncated forward itself (what the pipeline adds on top of the forward).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from hsae.activations import HarvestConfig, harvest, load_language_model
from hsae.activations.corpora import ContextBatch
from hsae.activations.harvest import context_batches
from hsae.activations.models import LanguageModel, capture_residual

# the package exports the function `harvest`, which shadows the submodule attribute
harvest_module = importlib.import_module("hsae.activations.harvest")


@dataclass
class Timing:
    wall: float
    cpu: float
    forward: float = 0.0  # wall seconds inside capture_residual (pipeline runs only)


class Clock:
    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.timing = Timing(time.perf_counter() - self.wall, time.process_time() - self.cpu)


def real_tokens(batches: list[ContextBatch], has_bos: bool) -> int:
    return sum(int(b.attention_mask.sum()) - (len(b) if has_bos else 0) for b in batches)


def time_forward(
    batches: list[ContextBatch], forward: Callable[[torch.Tensor, torch.Tensor], object]
) -> Timing:
    with Clock() as clock, torch.inference_mode():
        for batch in batches:
            forward(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
    return clock.timing


def time_pipeline(lm: LanguageModel, args: argparse.Namespace, layer: int, tokens: int) -> Timing:
    config = HarvestConfig(
        layer=layer,
        tokens=tokens,
        context_length=args.context_length,
        batch_size=args.batch_size,
        shard_tokens=args.shard_tokens,
        heldout_fraction=0.0,
    )
    inside = [0.0]

    def timed_capture(*call_args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return capture_residual(*call_args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - start

    harvest_module.capture_residual = timed_capture
    try:
        with tempfile.TemporaryDirectory() as out, Clock() as clock:
            harvest(config, out, lm=lm, progress=False)
    finally:
        harvest_module.capture_residual = capture_residual
    clock.timing.forward = inside[0]
    return clock.timing


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: embedded Gemma 3 270M")
    parser.add_argument("--layer", type=int, default=None, help="default: middle block")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=8192)
    parser.add_argument("--full-batches", type=int, default=1, help="batches for the full forward")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    lm = load_language_model(args.model)
    layer = args.layer if args.layer is not None else lm.n_layers // 2
    has_bos = lm.bos_token_id is not None
    per_batch = args.batch_size * (args.context_length - int(has_bos))
    stream = context_batches(lm, None, args.context_length, args.batch_size, seed=0)
    batches = list(islice(stream, -(-args.tokens // per_batch)))
    tokens = real_tokens(batches, has_bos)
    print(f"model {lm.name}, layer {layer}/{lm.n_layers}, device {lm.device}, dtype {lm.dtype}")
    print(f"{tokens} tokens in {len(batches)} batches of {args.batch_size}x{args.context_length}")
    print(f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved repeats")

    def truncated(ids: torch.Tensor, mask: torch.Tensor) -> object:
        return capture_residual(lm, ids, mask, layer)

    def full(ids: torch.Tensor, mask: torch.Tensor) -> object:
        return lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))

    time_forward(batches[:1], truncated)  # warm-up
    time_pipeline(lm, args, layer, min(tokens, per_batch))  # warm-up (tokenizer, file system)
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(time_forward(batches, truncated))
        ours.append(time_pipeline(lm, args, layer, tokens))
    full_batches = batches[: args.full_batches]
    full_timing = time_forward(full_batches, full)
    report(tokens, bare, ours, real_tokens(full_batches, has_bos) / full_timing.wall)


def rates(tokens: int, timings: list[Timing]) -> str:
    return ", ".join(f"{tokens / t.wall:.0f}" for t in timings)


def report(tokens: int, bare: list[Timing], ours: list[Timing], full_rate: float) -> None:
    bare_rate = tokens / min(t.wall for t in bare)
    our_rate = tokens / min(t.wall for t in ours)
    paired = statistics.median(b.wall / o.wall for b, o in zip(bare, ours, strict=True))
    cpu_ratio = min(t.cpu for t in bare) / min(t.cpu for t in ours)
    forward_share = statistics.median(o.forward / o.wall for o in ours)
    print(f"bare truncated forward : {bare_rate:8.0f} tok/s  (runs: {rates(tokens, bare)})")
    print(f"hsae harvest pipeline  : {our_rate:8.0f} tok/s  (runs: {rates(tokens, ours)})")
    print(f"full forward (logits)  : {full_rate:8.0f} tok/s")
    print("pipeline / bare truncated forward (target >= 0.90):")
    print(f"  wall clock, best runs          : {our_rate / bare_rate:.3f}")
    print(f"  wall clock, median paired runs : {paired:.3f}")
    print(f"  CPU time of this process       : {cpu_ratio:.3f}")
    print(f"  forward share of pipeline time : {forward_share:.3f}")
    print(f"pipeline / full forward          : {our_rate / full_rate:.3f}")


if __name__ == "__main__":
    main()
