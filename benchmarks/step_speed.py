"""Training-step throughput: HSAE vs the same levels trained independently, in one run.

Also times a plain dense PyTorch JumpReLU loop over the same levels and, when ``sae-lens`` is
installed (``pip install 'hsae[bench]'``), SAELens's JumpReLU training step for the same sizes
on the same batches. Every number comes from this run, on this machine; the script prints
tokens/s and the ratios (HSAE / independent cost, our tokens/s over the others').

    python benchmarks/step_speed.py                       # d=640, 256/512/1024/2048, batch 1024
    python benchmarks/step_speed.py --device cuda --d 2304 --sizes 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hsae import HSAEConfig
from hsae.model.kernels import JumpReLU
from hsae.training import Trainer


def sparse_batches(d: int, n_batches: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Activations made of a few active directions out of a larger dictionary."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=generator), dim=1)
    out = []
    for _ in range(n_batches):
        codes = (torch.rand(batch, 4 * d, generator=generator) < 0.01).float()
        codes *= torch.rand(batch, 4 * d, generator=generator) * 3
        out.append(codes @ dictionary + 0.05 * torch.randn(batch, d, generator=generator))
    return out


def make_trainer(args: argparse.Namespace, mode: str, batches: list[torch.Tensor]) -> Trainer:
    config = HSAEConfig(
        d_in=args.d,
        level_sizes=args.sizes,
        target_l0=args.target_l0,
        train_tokens=args.batch * 100_000,
        batch_size=args.batch,
        mode=mode,
        device=args.device,
        update_interval=10**9,
    )
    trainer = Trainer(config, _cycle(batches))
    trainer.initialise()
    if mode == "hsae":
        trainer.update_forest()  # perturbation and constraint are active from the first step
    return trainer


def _cycle(batches: list[torch.Tensor]):
    while True:
        yield from batches


class DenseLoop:
    """The same levels as plain dense PyTorch: matmuls, JumpReLU STE, MSE + L0, Adam."""

    def __init__(self, args: argparse.Namespace, batches: list[torch.Tensor]):
        self.device = torch.device(args.device)
        trainer = make_trainer(args, "independent", batches)
        self.levels = trainer.model.levels
        self.scale = trainer.model.activation_scale
        self.optimizer = torch.optim.Adam(self.levels.parameters(), lr=3e-4, betas=(0.0, 0.995))
        self.batches = _cycle(batches)

    def step(self) -> None:
        x = next(self.batches).to(self.device) * self.scale
        loss = x.new_zeros(())
        for level in self.levels:
            pre = (x - level.b_dec) @ level.W_enc + level.b_enc
            acts = JumpReLU.apply(pre, level.threshold, 1e-3)
            loss = loss + (acts @ level.W_dec + level.b_dec - x).pow(2).sum(-1).mean()
            loss = loss + 0.1 * (pre > level.threshold).float().sum(-1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for level in self.levels:
                level.W_dec.div_(level.W_dec.norm(dim=1, keepdim=True))


def saelens_step(
    args: argparse.Namespace, batches: list[torch.Tensor]
) -> Callable[[], None] | None:
    try:
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    device = torch.device(args.device)
    saes = [
        JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(d_in=args.d, d_sae=size, device=str(device), dtype="float32")
        )
        for size in args.sizes
    ]
    params = [p for sae in saes for p in sae.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-4, betas=(0.0, 0.995))
    stream = _cycle(batches)

    def step() -> None:
        x = next(stream).to(device)
        optimizer.zero_grad(set_to_none=True)
        total = x.new_zeros(())
        for sae in saes:
            out = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=x,
                    coefficients={"l0": 1.0, "pre_act": 0.0},
                    dead_neuron_mask=None,
                    n_training_steps=1000,
                    is_logging_step=False,
                )
            )
            total = total + out.loss
        total.backward()
        optimizer.step()

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], steps: int, device: str) -> list[float]:
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=640)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--target-l0", type=float, default=50)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    batches = sparse_batches(args.d, 16, args.batch)
    contenders: dict[str, Callable[[], object]] = {}
    hsae_trainer = make_trainer(args, "hsae", batches)
    independent = make_trainer(args, "independent", batches)
    contenders["hsae"] = hsae_trainer.train_step
    contenders["independent"] = independent.train_step
    contenders["dense-pytorch"] = DenseLoop(args, batches).step
    saelens = saelens_step(args, batches)
    if saelens is not None:
        contenders["saelens"] = saelens

    for step in contenders.values():  # warm-up: thresholds settle, allocator warms
        time_steps(step, args.warmup, args.device)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):  # interleaved rounds, so drift hits everyone alike
        for name, step in contenders.items():
            samples[name] += time_steps(step, args.steps, args.device)

    median = {name: statistics.median(times) for name, times in samples.items()}
    tokens_per_s = {name: args.batch / t for name, t in median.items()}
    l0 = [round(v) for v in hsae_trainer.sparsity.l0_ema.tolist()]
    print(f"device={args.device} d={args.d} sizes={args.sizes} batch={args.batch} HSAE L0~{l0}")
    for name in contenders:
        print(f"{name:>14}: {median[name] * 1e3:8.1f} ms/step  {tokens_per_s[name]:9.0f} tokens/s")
    print(f"HSAE cost / independent stack: {median['hsae'] / median['independent']:.3f}x")
    over_dense = tokens_per_s["hsae"] / tokens_per_s["dense-pytorch"]
    print(f"HSAE tokens/s over dense PyTorch: {over_dense:.2f}x")
    if "saelens" in tokens_per_s:
        print(f"HSAE tokens/s over SAELens: {tokens_per_s['hsae'] / tokens_per_s['saelens']:.2f}x")
    else:
        print("SAELens not installed: pip install 'hsae[bench]' to compare against it")


if __name__ == "__main__":
    main()
