"""Harvest throughput: our pipeline (tokenise + truncated forward + cache writing) against a bare
truncated forward pass and a full forward pass of the same model, on the same contexts, same run.

    python benchmarks/harvest_throughput.py [--tokens 32768] [--context-length 128]

Runs are interleaved (bare, pipeline, bare, pipeline, ...) so load from other processes hits both;
the ratio is reported from the best run of each and as the median of the paired runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from itertools import islice

import torch

from hsae.activations import HarvestConfig, harvest, load_language_model
from hsae.activations.corpora import ContextBatch
from hsae.activations.harvest import context_batches
from hsae.activations.models import LanguageModel, capture_residual


def real_tokens(batches: list[ContextBatch], has_bos: bool) -> int:
    return sum(int(b.attention_mask.sum()) - (len(b) if has_bos else 0) for b in batches)


def time_forward(
    batches: list[ContextBatch], forward: Callable[[torch.Tensor, torch.Tensor], object]
) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            forward(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
    return time.perf_counter() - start


def time_pipeline(lm: LanguageModel, args: argparse.Namespace, layer: int, tokens: int) -> float:
    config = HarvestConfig(
        layer=layer,
        tokens=tokens,
        context_length=args.context_length,
        batch_size=args.batch_size,
        shard_tokens=args.shard_tokens,
        heldout_fraction=0.0,
    )
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        harvest(config, out, lm=lm, progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: embedded Gemma 3 270M")
    parser.add_argument("--layer", type=int, default=None, help="default: middle block")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=8192)
    parser.add_argument("--full-batches", type=int, default=1, help="batches for the full forward")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    lm = load_language_model(args.model)
    layer = args.layer if args.layer is not None else lm.n_layers // 2
    has_bos = lm.bos_token_id is not None
    per_batch = args.batch_size * (args.context_length - int(has_bos))
    n_batches = -(-args.tokens // per_batch)
    stream = context_batches(lm, None, args.context_length, args.batch_size, seed=0)
    batches = list(islice(stream, n_batches))
    tokens = real_tokens(batches, has_bos)
    print(f"model {lm.name}, layer {layer}/{lm.n_layers}, device {lm.device}, dtype {lm.dtype}")
    print(f"{tokens} tokens in {len(batches)} batches of {args.batch_size}x{args.context_length}")

    def truncated(ids: torch.Tensor, mask: torch.Tensor) -> object:
        return capture_residual(lm, ids, mask, layer)

    def full(ids: torch.Tensor, mask: torch.Tensor) -> object:
        return lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device))

    time_forward(batches[:1], truncated)  # warm-up
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(tokens / time_forward(batches, truncated))
        ours.append(tokens / time_pipeline(lm, args, layer, tokens))
    full_batches = batches[: args.full_batches]
    full_rate = real_tokens(full_batches, has_bos) / time_forward(full_batches, full)
    report(bare, ours, full_rate)


def runs(rates: list[float]) -> str:
    return ", ".join(f"{rate:.1f}" for rate in rates)


def report(bare: list[float], ours: list[float], full_rate: float) -> None:
    bare_rate, our_rate = max(bare), max(ours)
    paired = statistics.median(o / b for o, b in zip(ours, bare, strict=True))
    print(f"bare truncated forward : {bare_rate:10.1f} tok/s  (runs: {runs(bare)})")
    print(f"hsae harvest pipeline  : {our_rate:10.1f} tok/s  (runs: {runs(ours)})")
    print(f"full forward (logits)  : {full_rate:10.1f} tok/s")
    print(
        f"pipeline / bare truncated forward = {our_rate / bare_rate:.3f} best-of, "
        f"{paired:.3f} median of paired runs  (target >= 0.90)"
    )
    print(f"pipeline / full forward           = {our_rate / full_rate:.3f}")


if __name__ == "__main__":
    main()
