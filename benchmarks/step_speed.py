"""Training-step throughput at steady state: HSAE vs its independent stack vs SAELens, in one run.

For each scale (d = 640 with levels 256/512/1024/2048, and d = 2304 with 2048/4096/8192/16384,
batch 1024) the script builds, on the same batches:

* ``hsae``: our trainer's step of the HSAE (constraint and perturbation active from step one);
* ``independent``: the same levels trained independently (our baseline);
* ``saelens``: SAELens's JumpReLU training step for the same sizes, started from our levels'
  weights and thresholds (needs ``pip install 'hsae[bench]'``);
* ``floor``: one matmul of the batch by all levels' encoders at once, the part of any step
  that sparsity cannot remove;
* with ``--compile MODE``, also ``hsae-compiled`` and ``independent-compiled``: the same two
  trainers on the dense path with the loss under ``torch.compile(mode=MODE)``
  (``HSAEConfig.compile``; compiled during the settling steps, which are not timed), and
  ``saelens-compiled``: SAELens's step with each SAE's training forward compiled alike (its
  runner's ``compile_sae``; compiled in the untimed warm-up step).

Steady state: before anything is timed, every JumpReLU level is brought to its target L0. Each
feature's threshold is set to its (1 - target_l0 / n) quantile of pre-activations over the
batches the timed steps cycle through (so their mean L0 is the target), then the trainer runs
``--settle`` steps with its sparsity controller; the L0 of the timed steps is printed beside the
timings. Timed steps are interleaved by round (every contender runs a few steps in turn), so
drift of a shared machine hits all of them alike. Our trainers' timed steps are the unlogged
kind (``exact_metrics=False``, as ``Trainer.fit`` runs between log points); SAELens's are its
non-logging steps.

Precision: on CUDA our trainer runs the forward under bf16 autocast by default
(``HSAEConfig.autocast`` "auto"), so every contender gets the same: SAELens's forward is wrapped
as its own trainer wraps it with ``autocast=True``, the floor's matmul and the dense loop too.
``--autocast off`` compares in float32 (on CUDA with TF32 matmuls, which our trainer turns on
process-wide, so for every contender); ``--autocast bf16`` autocasts on CPU as well.

Peak memory: each contender is built and stepped in a fresh subprocess (``--memory-probe``).
The figure is the peak of the bytes of live tensors while it steps, counted from before its
model was built (so parameters, gradients and Adam state count; the batches, and for SAELens and
the floor the model their weights are copied from, do not): on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before, on CPU from torch.profiler's
memory events (``profile_memory``). On CPU the probe's peak resident set (VmHWM) above its
resident set before the build is printed beside it: it also holds what malloc keeps, what is
not a tensor and, with transparent huge pages, whole 2 MB pages, and moves by some 15% from
run to run at d = 2304 where the tensors' figure does not.

On CPU the trainer has glibc keep freed memory for reuse (``hsae.devices.keep_freed_cpu_memory``;
at d = 2304 it saves the page faults of every large temporary); the setting is process-wide, so
SAELens and the floor, timed in the same process, get it too. ``--system-malloc`` leaves malloc
as it is, for comparison. Importing ``hsae`` puts large CPU tensors on transparent huge pages
(``hsae.devices.request_cpu_huge_pages``), for every contender alike; ``THP_MEM_ALLOC_ENABLE=0``
in the environment keeps 4 KB pages, for comparison. Both settings are printed.

Timings: wall clock, and on CPU also process CPU time, which a shared machine disturbs far
less; with several threads a busy machine inflates the wall clock of a step made of many small
operations (ours) much more than one of a few large ones, so compare on a quiet machine or with
``--threads 1`` and the CPU clock.

Trainer to trainer: in one process a trainer can step 10-30 % faster or slower than the next
one built (at d = 2304 on the 2-core CPU of the README: where its memory happens to lie), so
each of our kinds gets ``--instances`` trainers (2 by default), built in the order A B B A, and
the steps of a kind's trainers are pooled before the median.

Process to process: on a shared or virtual machine a whole process can run 10% faster or
slower than the next (its memory layout, the host's load), and not every contender alike.
``--processes N`` runs the measurement in N fresh processes one after the other and prints each
one's ratios and their median (memory is probed in the first only).

    python benchmarks/step_speed.py                      # both scales, on CUDA when present
    python benchmarks/step_speed.py --scale small        # d = 640 only
    python benchmarks/step_speed.py --d 1024 --sizes 1024 4096 --steps 5   # a custom scale
    python benchmarks/step_speed.py --scale small --processes 5   # the median of 5 processes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

import hsae.training.trainer as trainer_module
from hsae import HSAEConfig
from hsae.devices import KEEP_FREED_MEMORY_ENV, cpu_huge_pages, keep_freed_cpu_memory
from hsae.model.kernels import JumpReLU, L0WithSTE
from hsae.training import Trainer
from hsae.training.compiled import CUDA_GRAPH_MODES, CompileError

SCALES: dict[str, dict[str, object]] = {
    # name: d, sizes, timed steps per round, rounds, controller steps before timing, trainers
    # of each of our kinds (their steps pooled)
    "small": {
        "d": 640, "sizes": [256, 512, 1024, 2048], "steps": 10, "rounds": 3, "settle": 10,
        "instances": 2,
    },
    # At d = 2304, 6 rounds (24 timed steps of each of our kinds a process). The three
    # processes' HSAE-over-independent ratios spanned 0.07 and 0.14 in two runs of 3 rounds,
    # 0.03, 0.04 and 0.10 in three of 6: most of the spread is the process's, not the rounds'.
    "large": {
        "d": 2304, "sizes": [2048, 4096, 8192, 16384], "steps": 2, "rounds": 6, "settle": 2,
        "instances": 2,
    },
}  # fmt: skip
N_BATCHES = 6
INSTANCE = "#"
"""``hsae#2``: the HSAE's second trainer (``--instances``), its steps pooled with the first's."""
CONTENDERS = ("hsae", "independent", "saelens", "floor")
COMPILED = ("hsae-compiled", "independent-compiled")


def sparse_batches(d: int, n_batches: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Activations made of ~40 active directions (of a 4d dictionary) per token, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    atoms = 4 * d
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=generator), dim=1)
    per_token = 40
    out = []
    for _ in range(n_batches):
        index = torch.randint(0, atoms, (batch, per_token), generator=generator)
        weights = torch.rand(batch, per_token, generator=generator) * 3
        mixed = torch.nn.functional.embedding_bag(
            index, dictionary, mode="sum", per_sample_weights=weights
        )
        out.append(mixed + 0.05 * torch.randn(batch, d, generator=generator))
    return out


def _cycle(batches: list[torch.Tensor]):
    while True:
        yield from batches


def make_trainer(
    args: argparse.Namespace, mode: str, batches: list[torch.Tensor], compile: str = "off"
) -> Trainer:
    """Our trainer of ``mode`` at steady state's start; ``compile``: HSAEConfig.compile (on
    the dense path, which it needs)."""
    config = HSAEConfig(
        d_in=args.d,
        level_sizes=args.sizes,
        target_l0=args.target_l0,
        train_tokens=args.batch * 100_000,
        batch_size=args.batch,
        mode=mode,
        device=args.device,
        update_interval=99_999,  # the forest is built once, below, and never rebuilt while timed
        sparse_kernels=not args.dense_kernels and compile == "off",
        autocast=args.autocast,
        compile=compile,
    )
    with scale_estimated_from(trainer_module, args.batch):
        trainer = Trainer(config, _cycle(batches))
        trainer.initialise()
    calibrate_thresholds(trainer, batches)
    if mode == "hsae":
        trainer.update_forest()  # perturbation and constraint are active from the first step
    return trainer


@contextmanager
def scale_estimated_from(module: ModuleType, tokens: int) -> Iterator[None]:
    """Within the block, ``module`` (a ``hsae.training.trainer``) estimates the activation scale
    from ``tokens`` tokens rather than 16k: at d = 2304 the data-dependent initialisation would
    otherwise form [16k, 16k] pre-activations. Restored after, so that a caller's later trainers
    in the same process keep the default."""
    default = module.SCALE_ESTIMATION_TOKENS
    module.SCALE_ESTIMATION_TOKENS = tokens
    try:
        yield
    finally:
        module.SCALE_ESTIMATION_TOKENS = default


@torch.no_grad()
def calibrate_thresholds(trainer: Trainer, batches: list[torch.Tensor]) -> None:
    """Each JumpReLU threshold at its feature's (1 - target / n) pre-activation quantile over
    all the ``batches`` the timed steps cycle through, so that every level starts at its
    target L0 on them (one batch's quantile left the widest level at d = 2304 some 30% above
    target after the few settling steps there: the third largest of 1,024 values is a noisy
    estimate). The quantile is the k-th largest value, kept batch by batch (no [tokens,
    features] tensor of all the batches)."""
    scale = trainer.model.activation_scale
    n_tokens = sum(batch.shape[0] for batch in batches)
    for level in trainer.model.levels:
        if not hasattr(level, "log_threshold"):
            continue
        rate = min(0.5, trainer.config.target_l0 / level.n_features)
        k = max(1, round(rate * n_tokens))
        top: torch.Tensor | None = None
        for batch in batches:
            pre = level.pre_activations(batch.to(trainer.device) * scale)
            if top is not None:
                pre = torch.cat([top, pre])
            top = pre.topk(min(k, pre.shape[0]), dim=0).values
        assert top is not None
        level.log_threshold.copy_(top[-1].clamp(min=1e-3).log())


def settle(trainer: Trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step(exact_metrics=False)


def saelens_step(
    args: argparse.Namespace, batches: list[torch.Tensor], source: Trainer, compile: str = "off"
) -> Callable[[], object] | None:
    """SAELens JumpReLU training step for the same sizes, from ``source``'s levels' weights;
    ``compile``: each SAE's training forward under torch.compile with this mode, as SAELens's
    runner does with ``compile_sae`` and ``sae_compilation_mode``."""
    try:
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    device = source.device
    saes = []
    for level in source.model.levels:
        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                d_in=args.d,
                d_sae=level.n_features,
                device=str(device),
                dtype="float32",
                jumprelu_bandwidth=source.config.bandwidth,
            )
        )
        with torch.no_grad():
            sae.W_enc.copy_(level.W_enc)
            sae.b_enc.copy_(level.b_enc)
            sae.W_dec.copy_(level.W_dec)
            sae.b_dec.copy_(level.b_dec)
            sae.threshold.copy_(level.threshold)
        if compile != "off":
            sae.training_forward_pass = torch.compile(  # type: ignore[method-assign]
                sae.training_forward_pass, mode=None if compile == "default" else compile
            )
        saes.append(sae)
    graphed = compile in CUDA_GRAPH_MODES and device.type == "cuda"
    params = [p for sae in saes for p in sae.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-4, betas=(0.0, 0.995))
    stream = _cycle(batches)
    scale = source.model.activation_scale

    autocast = source.autocast  # SAELens's trainer wraps its forward alike (cfg.autocast)

    def step() -> None:
        if graphed:  # the graphs' outputs of the last step may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        x = next(stream).to(device) * scale
        optimizer.zero_grad(set_to_none=True)
        total = x.new_zeros(())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
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


def floor_step(batches: list[torch.Tensor], source: Trainer) -> Callable[[], object]:
    """The batch times every level's encoder in one matmul (no bias, no backward)."""
    encoders = torch.cat([level.W_enc.detach() for level in source.model.levels], dim=1).clone()
    stream = _cycle(batches)
    device = source.device
    autocast = source.autocast

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return next(stream).to(device) @ encoders

    return step


class DenseLoop:
    """The same levels as plain dense PyTorch: matmuls, JumpReLU and L0 with their
    straight-through estimators, MSE + 0.1 L0, Adam, decoder rows renormalised.

    ``graphed`` (CUDA only): the whole step (forward, backward, Adam, renormalisation) is
    captured once in a CUDA graph and replayed, so no operation pays a launch from Python. Not
    a contender of ours: the ceiling a step of this shape reaches without launch overheads.
    """

    def __init__(
        self, args: argparse.Namespace, batches: list[torch.Tensor], graphed: bool = False
    ):
        self.device = torch.device(args.device)
        trainer = make_trainer(args, "independent", batches)
        self.levels = trainer.model.levels
        self.scale = trainer.model.activation_scale
        self.optimizer = torch.optim.Adam(
            self.levels.parameters(),
            lr=3e-4,
            betas=(0.0, 0.995),
            fused=self.device.type == "cuda",
            capturable=graphed,
        )
        self.batches = _cycle(batches)
        self.autocast = trainer.autocast
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = torch.zeros(args.batch, args.d, device=self.device)
        if graphed:
            self._capture()

    def step(self) -> None:
        self.x.copy_(next(self.batches).to(self.device) * self.scale)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def _step(self) -> None:
        x = self.x
        loss = x.new_zeros(())
        # No autocast weight cache: a captured graph must not keep casts from its capture.
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False
        ):
            for level in self.levels:
                pre = (x - level.b_dec) @ level.W_enc + level.b_enc
                acts = JumpReLU.apply(pre, level.threshold, 1e-3)
                loss = loss + (acts @ level.W_dec + level.b_dec - x).pow(2).sum(-1).mean()
                loss = loss + 0.1 * L0WithSTE.apply(pre, level.threshold, 1e-3)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for level in self.levels:
                level.W_dec.div_(level.W_dec.norm(dim=1, keepdim=True))

    def _capture(self) -> None:
        # Warm-up steps on a side stream (they allocate gradients and Adam's state), then one
        # captured step, as torch.cuda.graph's documentation does for a whole training step.
        self.x.copy_(next(self.batches).to(self.device) * self.scale)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], steps: int, device: str) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each step."""
    times = []
    for _ in range(steps):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


def build(
    args: argparse.Namespace, names: list[str], batches: list[torch.Tensor]
) -> tuple[dict[str, Callable[[], object]], dict[str, Trainer]]:
    """The contenders' step functions (settled), and our trainers by name."""
    trainers: dict[str, Trainer] = {}
    steps: dict[str, Callable[[], object]] = {}
    source = None
    for name in names:
        kind = name.partition(INSTANCE)[0]  # hsae#2: another trainer of the HSAE
        if kind in ("hsae", "independent", *COMPILED):
            mode, _, compiled = kind.partition("-")
            trainer = make_trainer(args, mode, batches, args.compile if compiled else "off")
            started = time.perf_counter()
            try:
                settle(trainer, max(args.settle, 3) if compiled else args.settle)
            except CompileError as error:  # report it, time the others
                print(f"  {name}: {error}")
                continue
            if trainer.compiled_loss is not None:
                worst, difference = trainer.compiled_loss.largest_gradient_difference
                print(
                    f"  {name}: {trainer.compiled_loss.variants_checked} step variant(s) "
                    f"compiled and checked in {time.perf_counter() - started:.0f} s; largest "
                    f"gradient difference from the eager step {difference:.2g} ({worst or '-'})"
                )
            trainers[name] = trainer
            steps[name] = lambda t=trainer: t.train_step(exact_metrics=False)
        elif name == "dense-pytorch":
            steps[name] = DenseLoop(args, batches).step
        elif name == "dense-graphed":
            try:
                steps[name] = DenseLoop(args, batches, graphed=True).step
            except RuntimeError as error:  # capture failed: report it, time the others
                print(f"  dense-graphed: CUDA graph capture failed: {error}")
        else:
            if source is None:  # saelens and the floor read the levels' weights from it
                source = trainers.get("independent") or make_trainer(args, "independent", batches)
            if name == "floor":
                steps[name] = floor_step(batches, source)
            else:
                compile = args.compile if name == "saelens-compiled" else "off"
                saelens = saelens_step(args, batches, source, compile)
                if saelens is not None:
                    steps[name] = saelens
    return steps, trainers


def peak_memory_mb(args: argparse.Namespace, name: str) -> dict[str, float] | None:
    """Peak memory of a fresh process that builds and steps ``name`` (module docstring):
    ``peak_mb`` (tensors) and on CPU ``rss_mb`` (the resident set)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-probe",
        name,
        "--d",
        str(args.d),
        "--sizes",
        *map(str, args.sizes),
        "--batch",
        str(args.batch),
        "--target-l0",
        str(args.target_l0),
        "--device",
        args.device,
        "--autocast",
        args.autocast,
    ]
    command += ["--dense-kernels"] if args.dense_kernels else []
    command += [] if args.compile is None else ["--compile", args.compile]
    command += [] if args.threads is None else ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"  memory probe of {name} failed: {done.stderr.strip()[-300:]}")
        return None
    return json.loads(lines[-1])


def _peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


class TensorMemory:
    """The peak of the bytes of live CPU tensors while :meth:`measured` runs, from the memory
    events of a torch.profiler session (:func:`tensor_memory`): counted from the session's start,
    so it covers what was allocated since, not what existed before. Memory the kernels take
    outside tensors (their scratch vectors, the interpreter) is not in it."""

    _MARK = "step_speed.measured"

    def __init__(self, profiler: torch.profiler.profile | None) -> None:
        self.profiler = profiler
        self.peak_mb = float("nan")

    @contextmanager
    def measured(self) -> Iterator[None]:
        with torch.profiler.record_function(self._MARK):
            yield

    def _read(self) -> None:
        """Set :attr:`peak_mb` from the finished session."""
        assert self.profiler is not None
        with tempfile.TemporaryDirectory() as folder:
            trace = Path(folder) / "trace.json"
            self.profiler.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        marks = [e for e in events if e.get("name") == self._MARK and e.get("ph") == "X"]
        if len(marks) != 1:
            raise RuntimeError(f"tensor memory: expected one measured range, found {len(marks)}")
        start, end = marks[0]["ts"], marks[0]["ts"] + marks[0]["dur"]
        totals = [
            e["args"]["Total Allocated"]
            for e in events
            if e.get("name") == "[memory]" and start <= e["ts"] <= end
        ]
        if not totals:
            raise RuntimeError("tensor memory: no allocation while measured")
        self.peak_mb = max(totals) / 2**20


@contextmanager
def tensor_memory(enabled: bool = True) -> Iterator[TensorMemory]:
    """A torch.profiler session that records CPU allocations (``profile_memory``); its
    :class:`TensorMemory` has the peak once the block is done. ``enabled=False``: no session."""
    if not enabled:
        yield TensorMemory(None)
        return
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profiler:
        memory = TensorMemory(profiler)
        yield memory
    memory._read()


def memory_probe(args: argparse.Namespace) -> None:
    """Build and step ``args.memory_probe`` in this fresh process and print its peak memory as
    JSON: ``peak_mb``, the tensors' (on CUDA the allocator's peak; on CPU the peak of the bytes
    of live tensors while the timed steps run, from torch.profiler's memory events) and, on
    CPU, ``rss_mb``, the resident set's peak above where it was before the build."""
    name = args.memory_probe
    batches = sparse_batches(args.d, N_BATCHES, args.batch)
    args.settle = 1
    cuda = args.device.startswith("cuda")
    step: Callable[[], object] | None = None
    source = None
    if name in ("saelens", "floor", "saelens-compiled"):
        # Their weights come from one of our models; its memory is not theirs.
        source = make_trainer(args, "independent", batches)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _current_rss_mb()
    # On CPU the tensors' bytes are counted from the build on (the profiler counts what is
    # allocated while it runs), so parameters, gradients and optimizer state are in the peak.
    with tensor_memory(enabled=not cuda) as tensors:
        if source is not None:
            compile = args.compile if name == "saelens-compiled" else "off"
            step = (
                floor_step(batches, source)
                if name == "floor"
                else saelens_step(args, batches, source, compile)
            )
        else:
            step = build(args, [name], batches)[0].get(name)
        if step is None:
            raise SystemExit(f"{name} unavailable")
        with tensors.measured():
            time_steps(step, 2, args.device)
    if cuda:
        peak = {"peak_mb": torch.cuda.max_memory_allocated() / 2**20 - before}
    else:
        peak = {"peak_mb": tensors.peak_mb, "rss_mb": _peak_rss_mb() - before}
    print(json.dumps(peak))


def run_scale(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Time one scale and print its table; returns, per clock, the ratios of the summary."""
    batches = sparse_batches(args.d, N_BATCHES, args.batch)
    names = list(CONTENDERS) + (["dense-pytorch"] if args.dense_loop else [])
    for instance in range(2, args.instances + 1):  # the first ones are in CONTENDERS: A B B A
        ours = [f"{name}{INSTANCE}{instance}" for name in ("hsae", "independent")]
        at = 2 * (instance - 1)  # after the trainers built before
        names[at:at] = ours if instance % 2 else ours[::-1]
    names += [*COMPILED, "saelens-compiled"] if args.compile else []
    if args.dense_loop and args.device.startswith("cuda"):
        names.append("dense-graphed")
    started = time.perf_counter()
    steps, trainers = build(args, names, batches)
    print(
        f"\n== d={args.d} sizes={args.sizes} batch={args.batch} target L0={args.target_l0} "
        f"device={args.device} bf16 autocast={any(t.autocast for t in trainers.values())} "
        f"(built and settled in {time.perf_counter() - started:.0f} s)"
    )
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    l0s: dict[str, list[torch.Tensor]] = {name: [] for name in trainers}
    for name, trainer in trainers.items():  # record the L0 of the steps that are timed
        steps[name] = _recording(trainer, l0s[name])
    for name, step in list(steps.items()):  # untimed steps: allocator and caches warm
        if name != "saelens-compiled":
            step()
            continue
        try:  # compiled on the first call, its CUDA graphs recorded on a later one
            for _ in range(3):
                step()
        except Exception as error:  # torch.compile of SAELens's code failed: time the others
            print(f"  saelens-compiled: {type(error).__name__}: {str(error).strip()[:300]}")
            del steps[name], samples[name]
    for _ in range(args.rounds):  # interleaved rounds, so drift hits everyone alike
        for name, step in steps.items():
            samples[name] += time_steps(step, args.steps, args.device)

    if args.compile:
        counters = torch._dynamo.utils.counters
        print(
            f"compiled graphs so far: {counters['stats']['unique_graphs']}; CUDA graphs "
            f"skipped: {counters['inductor']['cudagraph_skips']}"
        )
    for name, values in l0s.items():
        mean_l0 = torch.stack(values[1:]).mean(0).tolist()
        print(f"{name:>20} L0 while timed: {[round(v, 1) for v in mean_l0]}")
    for name in list(samples):  # pooled: each kind's trainers under its name
        kind, _, instance = name.partition(INSTANCE)
        if instance:
            samples[kind] += samples.pop(name)
    if args.instances > 1:
        print(f"our trainers: {args.instances} of each kind, their timed steps pooled")
    names = list(samples)
    del steps, trainers, l0s  # free this run's models before the probes build theirs
    gc.collect()
    memory = {}
    if not args.no_memory:
        memory = {name: peak_memory_mb(args, name) for name in names}
    # Wall-clock medians; on CPU also process CPU time, which a shared machine disturbs far
    # less (compare like with like: the same thread count for every contender).
    clocks = [("wall", 0)] + ([] if args.device.startswith("cuda") else [("cpu", 1)])
    ratios: dict[str, dict[str, float]] = {}
    for clock, index in clocks:
        median = {name: statistics.median(t[index] for t in samples[name]) for name in names}
        tokens_per_s = {name: args.batch / t for name, t in median.items()}
        ratios[clock] = {}
        if "saelens" in median:
            ratios[clock]["HSAE tokens/s over SAELens"] = median["saelens"] / median["hsae"]
        ratios[clock]["HSAE cost over independent"] = median["hsae"] / median["independent"]
        ratios[clock]["floor share of HSAE"] = median["floor"] / median["hsae"]
        ratios[clock].update({f"{name} ms": t * 1e3 for name, t in median.items()})
        counts = sorted({len(samples[name]) for name in names}, reverse=True)
        print(f"-- {clock} clock, median of {' or '.join(map(str, counts))} steps each")
        for name in names:
            mem = memory.get(name)
            mem_text = "" if mem is None else f"  peak memory {mem['peak_mb']:8.0f} MiB"
            if mem is not None and "rss_mb" in mem:
                mem_text += f" (resident set {mem['rss_mb']:.0f} MiB)"
            print(
                f"{name:>20}: {median[name] * 1e3:9.1f} ms/step  {tokens_per_s[name]:9.0f} "
                f"tokens/s{mem_text}"
            )
        print(f"HSAE cost / independent stack: {median['hsae'] / median['independent']:.3f}x")
        print(
            f"encoder-forward floor share of the HSAE step: {median['floor'] / median['hsae']:.2f}"
        )
        print(
            "encoder-forward floor share of the independent step: "
            f"{median['floor'] / median['independent']:.2f}"
        )
        if "saelens" in tokens_per_s:
            print(
                f"HSAE tokens/s over SAELens: {tokens_per_s['hsae'] / tokens_per_s['saelens']:.2f}x"
            )
        else:
            print("SAELens not installed: pip install 'hsae[bench]' to compare against it")
        if "dense-pytorch" in tokens_per_s:
            over_dense = tokens_per_s["hsae"] / tokens_per_s["dense-pytorch"]
            print(f"HSAE tokens/s over dense PyTorch: {over_dense:.2f}x")
        if "hsae-compiled" in tokens_per_s and "independent-compiled" in tokens_per_s:
            compiled = median["hsae-compiled"]
            print(
                f"compiled ({args.compile}): HSAE cost / independent stack: "
                f"{compiled / median['independent-compiled']:.3f}x; HSAE tokens/s over the "
                f"eager HSAE: {median['hsae'] / compiled:.2f}x"
                + (
                    f", over SAELens: {median['saelens'] / compiled:.2f}x"
                    if "saelens" in median
                    else ""
                )
                + (
                    f", over SAELens compiled alike: {median['saelens-compiled'] / compiled:.2f}x"
                    if "saelens-compiled" in median
                    else ""
                )
            )
        if "dense-graphed" in tokens_per_s:
            over_graphed = tokens_per_s["hsae"] / tokens_per_s["dense-graphed"]
            print(f"HSAE tokens/s over the CUDA-graphed dense loop: {over_graphed:.2f}x")
    return ratios


def run_processes(argv: list[str], n: int) -> None:
    """Run this script n times in fresh processes (memory probed in the first only) and print
    every process's summary ratios and their median, per scale and clock."""
    runs: list[list[dict[str, object]]] = []
    for index in range(n):
        with tempfile.TemporaryDirectory() as folder:
            summary = Path(folder) / "summary.json"
            child = [*argv, "--summary-json", str(summary)] + (["--no-memory"] if index else [])
            print(f"\n#### process {index + 1} of {n}", flush=True)
            done = subprocess.run([sys.executable, __file__, *child], check=False)
            if done.returncode != 0:
                raise SystemExit(f"process {index + 1} failed with exit status {done.returncode}")
            runs.append(json.loads(summary.read_text()))
    print(f"\n#### {n} processes: each one's ratios, then their median")
    for scale_index, scale in enumerate(runs[0]):
        print(f"== d={scale['d']} sizes={scale['sizes']}")
        for clock in scale["ratios"]:  # type: ignore[union-attr]
            per_run = [run[scale_index]["ratios"][clock] for run in runs]  # type: ignore[index]
            for key in (k for k in per_run[0] if not k.endswith(" ms")):
                values = [r[key] for r in per_run]
                listed = " / ".join(f"{value:.2f}" for value in values)
                print(
                    f"  {clock:>4} clock, {key:>26}: median {statistics.median(values):.2f}"
                    f"  ({listed})"
                )
            times = [
                f"{key[:-3]} {statistics.median(r[key] for r in per_run):.1f}"
                for key in per_run[0]
                if key.endswith(" ms")
            ]
            print(f"  {clock:>4} clock, median ms/step: {', '.join(times)}")


def _recording(trainer: Trainer, into: list[torch.Tensor]) -> Callable[[], object]:
    def step() -> object:
        out = trainer.train_step(exact_metrics=False)
        into.append(out.l0.detach().cpu())
        return out

    return step


def add_scale_arguments(parser: argparse.ArgumentParser, scales: list[str], default: str) -> None:
    """The options that pick what is timed, shared by the step benchmarks: a named scale
    (``SCALES``) or a custom one (``--d`` with ``--sizes``), the batch and the target L0."""
    parser.add_argument("--scale", choices=scales, default=default)
    parser.add_argument("--d", type=int, help="custom scale: width (with --sizes)")
    parser.add_argument("--sizes", type=int, nargs="+", help="custom scale: level sizes")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--target-l0", type=float, default=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_scale_arguments(parser, [*SCALES, "both"], "both")
    parser.add_argument("--steps", type=int, help="timed steps per round (default per scale)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default per scale)")
    parser.add_argument("--settle", type=int, help="controller steps before timing")
    parser.add_argument(
        "--instances",
        type=int,
        help="trainers of the HSAE and of the independent stack, built in the order A B B A, "
        "their timed steps pooled (default per scale; at d = 2304 each is 2.6 GiB on CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--autocast",
        choices=["auto", "bf16", "off"],
        default="auto",
        help="bf16 autocast of every contender's forward (HSAEConfig.autocast; auto: on CUDA)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument(
        "--dense-loop",
        action="store_true",
        help="also time a plain dense loop (and on CUDA the same loop captured in a CUDA graph)",
    )
    parser.add_argument(
        "--dense-kernels", action="store_true", help="our models on the dense reference path"
    )
    parser.add_argument(
        "--compile",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="also time both trainers on the dense path compiled with this torch.compile mode",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (the trainer otherwise keeps freed memory on CPU)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the measurement in this many fresh processes and print the median ratios",
    )
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--summary-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.instances is not None and args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.processes > 1:  # the children run once each: without --processes
        argv = sys.argv[1:]
        if "--processes" in argv:
            at = argv.index("--processes")
            del argv[at : at + 2]
        run_processes([a for a in argv if not a.startswith("--processes=")], args.processes)
        return
    if args.system_malloc:  # read by hsae.devices.keep_freed_cpu_memory; the probes inherit it
        os.environ[KEEP_FREED_MEMORY_ENV] = "0"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    if args.d is not None or args.sizes is not None:
        if args.d is None or args.sizes is None:
            parser.error("a custom scale needs both --d and --sizes")
        scales = [
            {"d": args.d, "sizes": args.sizes, "steps": 3, "rounds": 2, "settle": 5, "instances": 1}
        ]
    else:
        scales = [SCALES[name] for name in (SCALES if args.scale == "both" else [args.scale])]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    if not args.device.startswith("cuda"):
        kept = keep_freed_cpu_memory()  # what the trainer does; every contender shares it
        print(f"CPU malloc keeps freed memory (hsae.devices.keep_freed_cpu_memory): {kept}")
        huge = cpu_huge_pages()  # set when hsae was imported; every contender shares it
        print(f"CPU tensors on transparent huge pages (hsae.devices.cpu_huge_pages): {huge}")
    summaries = []
    for scale in scales:
        run = argparse.Namespace(**vars(args))
        for key, value in scale.items():
            if key in ("d", "sizes") or getattr(args, key) is None:
                setattr(run, key, value)
        summaries.append({"d": run.d, "sizes": run.sizes, "ratios": run_scale(run)})
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summaries))


if __name__ == "__main__":
    main()
