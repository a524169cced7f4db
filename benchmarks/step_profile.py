"""Where a training step's time goes: launches, device syncs and kernel time against the wall.

For the HSAE and its independent stack at one scale of ``step_speed.py`` (same batches, same
settled start), this script times a few unlogged steps, then profiles a few more with
``torch.profiler`` and prints, per step:

(``--compile MODE``: our trainers on the dense path with the loss under torch.compile; the
kernels inductor generated for it are counted too.)

* the wall-clock time;
* the aten operations dispatched from Python and autograd (each costs launch overhead), and
  those that wait for the device on CUDA (``SYNCING``: a result whose size or value the host
  reads), counted on any device, so the CPU tells how a step would sync on a GPU;
* on CUDA, the kernels launched, their summed GPU time, and the device-to-host copies, each of
  which makes the CPU wait for the GPU (a sync);
* the kernels (or, on CPU, the operations) that take the most time.

A step whose summed kernel time is far below its wall-clock time is launch-bound: what slows
it is the number of operations, not their size.

    python benchmarks/step_profile.py                   # d = 2304, on CUDA when present
    python benchmarks/step_profile.py --scale small     # d = 640
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import step_speed  # this folder's script, on sys.path when run as one

SYNCING = (
    "aten::nonzero",
    "aten::_local_scalar_dense",  # .item(), bool(tensor), int(tensor)
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::bincount",
    "aten::masked_select",
    "aten::repeat_interleave",
)
"""Operations that make the host wait for a CUDA device (data-dependent sizes or values read
back); ``repeat_interleave`` only without ``output_size``, ``bincount`` to size its output."""


def profile_mode(args: argparse.Namespace, mode: str, batches: list[torch.Tensor]) -> None:
    if args.compile:
        import torch._inductor.config as inductor
        from torch._inductor import metrics

        inductor.fx_graph_cache = False  # compile afresh, so the kernels are counted
        metrics.reset()
    trainer = step_speed.make_trainer(args, mode, batches, args.compile or "off")
    step_speed.settle(trainer, args.settle)
    cuda = args.device.startswith("cuda")
    step_speed._sync(args.device)
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(exact_metrics=False)
    step_speed._sync(args.device)
    wall = (time.perf_counter() - started) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step(exact_metrics=False)
        step_speed._sync(args.device)
    events = prof.events()
    dispatched = sum(
        1
        for event in events
        if event.name.startswith("aten::")
        and not _inside(event)  # count each dispatch once, not its nested calls
    )
    print(f"\n### {mode}: d={args.d} sizes={args.sizes} device={args.device}")
    print(f"wall clock           {wall * 1e3:9.2f} ms/step")
    # CPU fused Adam reads each parameter's step count (.item()); its CUDA kernel does not.
    skipped = SYNCING + ("aten::_fused_adam_",)
    syncing = Counter(
        event.name for event in events if event.name in SYNCING and not _inside(event, skipped)
    )
    print(f"aten ops dispatched  {dispatched / args.steps:9.0f} /step")
    if args.compile:
        # Each kernel of the (static) compiled forward and backward runs once a step, beside
        # the aten operations above (matmuls and the like it calls, and the eager remainder).
        print(f"generated kernels    {metrics.generated_kernel_count:9d} (compiled fwd + bwd)")
    print(
        f"host-syncing ops     {sum(syncing.values()) / args.steps:9.0f} /step  "
        + ", ".join(f"{name[6:]} {n / args.steps:.0f}" for name, n in syncing.most_common())
    )
    if cuda:
        kernel_time: Counter[str] = Counter()
        kernel_count: Counter[str] = Counter()
        for event in events:
            for kernel in event.kernels:  # each device event once, under its launching call
                kernel_time[kernel.name] += kernel.duration
                kernel_count[kernel.name] += 1
        copies_to_host = sum(n for name, n in kernel_count.items() if "DtoH" in name)
        launched = sum(n for name, n in kernel_count.items() if not name.startswith("Mem"))
        busy = sum(kernel_time.values()) / args.steps / 1e3
        print(f"kernels launched     {launched / args.steps:9.0f} /step")
        print(f"device-to-host syncs {copies_to_host / args.steps:9.0f} /step")
        print(f"summed kernel time   {busy:9.2f} ms/step ({busy / (wall * 1e3):.0%} of the wall)")
        print("top kernels by time (ms/step, launches/step):")
        for name, total in kernel_time.most_common(args.top):
            print(
                f"  {total / args.steps / 1e3:8.3f} {kernel_count[name] / args.steps:6.0f}  "
                f"{name[:90]}"
            )
    else:
        print("top operations by self time (ms/step, calls/step):")
        averages = prof.key_averages()
        for row in sorted(averages, key=lambda r: r.self_cpu_time_total, reverse=True)[: args.top]:
            print(
                f"  {row.self_cpu_time_total / args.steps / 1e3:8.3f} "
                f"{row.count / args.steps:6.0f}  {row.key[:90]}"
            )


def _inside(event, names: tuple[str, ...] | None = None) -> bool:
    """Whether an enclosing call is one of ``names`` (None: any aten operation)."""
    parent = event.cpu_parent
    while parent is not None:
        if (parent.name in names) if names is not None else parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    step_speed.add_scale_arguments(parser, list(step_speed.SCALES), "large")
    parser.add_argument("--steps", type=int, default=5, help="timed and profiled steps")
    parser.add_argument("--settle", type=int, default=10, help="controller steps first")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto")
    parser.add_argument("--dense-kernels", action="store_true")
    parser.add_argument(
        "--compile",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="profile our trainers compiled with this torch.compile mode (on the dense path)",
    )
    parser.add_argument("--modes", nargs="+", default=["hsae", "independent"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if (args.d is None) != (args.sizes is None):
        parser.error("a custom scale needs both --d and --sizes")
    if args.d is None:
        scale = step_speed.SCALES[args.scale]
        args.d, args.sizes = scale["d"], scale["sizes"]
    batches = step_speed.sparse_batches(args.d, step_speed.N_BATCHES, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for mode in args.modes:
        profile_mode(args, mode, batches)


if __name__ == "__main__":
    main()
