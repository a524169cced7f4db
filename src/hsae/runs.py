"""Run folders: one place for a whole experiment, from harvested activations to metrics.

The folder's layout is owned by :mod:`hsae.layout` (every file written atomically; see
docs/runs.md); this module runs the stages that fill it.

Every stage skips work already done, so running a stage again (or ``--resume``) continues
where a killed run stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hsae import distributed
from hsae.config import ConfigError, HSAEConfig, refuse_bool
from hsae.errors import HSAEError
from hsae.io import write_json, write_text
from hsae.layout import (
    ACTIVATIONS_DIR,
    BASELINES,
    CACHE_MANIFEST,
    CHECKPOINTS_DIR,
    METRICS_FILE,
    MODEL_NAMES,
    RUN_FILE,
    TENSORBOARD_DIR,
    RunLayout,
    Which,
    baseline_mode,
)
from hsae.locking import LOCK_FILE, FolderInUseError, folder_lock
from hsae.model import HSAE, load_hsae
from hsae.model.hsae import CONFIG_FILE
from hsae.training import Trainer
from hsae.training.logging import (
    combine,
    jsonl_sink,
    missing_backends,
    tensorboard_sink,
    wandb_sink,
)
from hsae.training.parallel import rank_share

if TYPE_CHECKING:
    from hsae.evaluation.suite import SuiteSettings


class RunError(HSAEError, RuntimeError):
    """A run folder cannot be used as asked (wrong model or layer, missing stage, ...)."""


class RunInUseError(RunError):
    """Another process holds the run folder's lock (it is training, harvesting, ...)."""


class RunConfig(BaseModel):
    """Everything a run needs: what to harvest, how to train, how much to evaluate."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str | None = None
    """Hugging Face id or local path of a causal LM; None: the embedded Gemma 3 270M."""
    layer: int | None = Field(None, ge=0)
    """Residual stream after this block; None: the middle block."""
    dataset: str | None = None
    """HF dataset id, local text/JSON/JSONL/CSV/Parquet file or folder, or a datasets
    save_to_disk folder; None: the built-in WordNet corpus."""
    harvest_tokens: int = Field(1_000_000, ge=1024)
    """Activations to harvest, train and held-out together."""
    context_length: int = Field(128, ge=2)
    """Tokens per context (BOS included)."""
    text_field: str = Field("text", min_length=1)
    """Column (or JSON field) of the dataset that holds the text; not used for plain text files."""
    activations: str | None = None
    """An existing complete activation cache (hsae harvest --out) to train on instead of
    harvesting; its model, layer and context length must be the run's."""
    harvest_batch_size: int = Field(32, ge=1)
    """Contexts per forward pass while harvesting."""
    heldout_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    """Share of harvested tokens kept for evaluation."""
    hsae: dict[str, Any] = {}
    """HSAEConfig settings (d_in and the activation scale come from the activations)."""
    baselines: list[str] = ["independent"]
    """Baselines trained beside the HSAE on the same activations (hsae.layout.BASELINES):
    "independent" (the same levels trained independently, forest post hoc) and "matryoshka"
    (Matryoshka BatchTopK SAE, nested prefixes at the level sizes; docs/baselines.md)."""
    checkpoint_every: int = Field(500, ge=1)
    """Steps between training checkpoints."""
    log_every: int = Field(50, ge=1)
    """Steps between lines of the training log."""
    eval_tokens: int = Field(65_536, ge=256)
    """Held-out activations used for the metrics."""
    splice_contexts: int = Field(16, ge=0)
    """Contexts of held-out text for the spliced CE loss (0 skips it)."""
    tensorboard: bool = False
    """Also log training to TensorBoard (RUN/tensorboard; needs the tensorboard package)."""
    wandb_project: str | None = None
    """Also log training to this Weights & Biases project (needs the wandb package)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:N"."""
    seed: int = Field(0, ge=0)
    """Seed of the document order, training and perturbation."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            item = error.errors()[0]
            field = ".".join(str(p) for p in item["loc"]) or "run"
            text = str(item["msg"]).removeprefix("Value error, ")
            raise ConfigError(f"invalid run configuration: {field}: {text}") from None
        try:
            self.hsae_config(d_in=1)  # refuse bad HSAE settings now, not after the harvest
        except ConfigError as error:
            field = str(error).removeprefix("invalid HSAE configuration: ")
            field = field if field.startswith(("seed:", "device:")) else f"hsae.{field}"
            raise ConfigError(f"invalid run configuration: {field}") from None
        missing = missing_backends(self.tensorboard, self.wandb_project is not None)
        if missing:
            raise ConfigError("invalid run configuration: logging needs " + ", ".join(missing))

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool(cls, value, info)

    @model_validator(mode="before")
    @classmethod
    def _old_baseline_switch(cls, values: Any) -> Any:
        """Run files written before ``baselines`` said ``baseline: true/false``."""
        if isinstance(values, dict) and "baseline" in values:
            values = dict(values)
            old = values.pop("baseline")
            if not isinstance(old, bool):
                raise ValueError(f"baseline: expected true or false, got {old!r}")
            if "baselines" not in values:
                values["baselines"] = ["independent"] if old else []
            elif bool(values["baselines"]) != old:
                raise ValueError("baseline: give baselines only (baseline is the old switch)")
        return values

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in BASELINES:
                choices = ", ".join(repr(known) for known in BASELINES)
                raise ValueError(f"unknown baseline {name!r}; choose from {choices}")
        if len(set(names)) != len(names):
            raise ValueError(f"each baseline may be named once, got {names}")
        return names

    @field_validator("hsae")
    @classmethod
    def _no_fixed_fields(cls, values: dict[str, Any]) -> dict[str, Any]:
        for fixed in ("d_in", "activation_scale", "mode"):
            if fixed in values:
                raise ValueError(f"'{fixed}' is set by the run itself and cannot be given")
        return values

    def hsae_config(self, d_in: int, mode: str = "hsae", scale: float | None = None) -> HSAEConfig:
        settings = {"seed": self.seed, "device": self.device} | self.hsae
        return HSAEConfig(d_in=d_in, mode=mode, activation_scale=scale, **settings)

    def harvest_config(self) -> Any:
        from hsae.activations import HarvestConfig

        device = None if self.device == "auto" else self.device
        return HarvestConfig(
            model=self.model,
            layer=self.layer,
            dataset=self.dataset,
            tokens=self.harvest_tokens,
            context_length=self.context_length,
            batch_size=self.harvest_batch_size,
            heldout_fraction=self.heldout_fraction,
            seed=self.seed,
            device=device,
            text_field=self.text_field,
        )

    def check_activations(self) -> dict[str, Any] | None:
        """The manifest of ``activations`` (the cache to reuse) once checked against this
        run's model, layer and context length; None when the run harvests its own."""
        if self.activations is None:
            return None
        from hsae.activations.harvest import check_reusable

        return check_reusable(self.activations, self.model, self.layer, self.context_length)


def demo_config() -> RunConfig:
    """The offline demo: embedded Gemma 3 270M, middle layer, built-in corpus, 2 CPU cores.

    Sized to finish within 20 minutes on 2 CPU cores: 100k harvested tokens, each model trained
    for 800k tokens (about 8 passes), method settings at the library defaults.
    """
    return RunConfig(
        harvest_tokens=100_000,
        context_length=64,
        heldout_fraction=0.06,
        hsae={
            "level_sizes": [256, 512, 1024, 2048],
            "target_l0": 32,
            "train_tokens": 800_000,
            "lr": 1e-3,
            "l0_ema_momentum": 0.99,
            "l0_decay_rate": 0.005,
            "update_interval": 50,
        },
        checkpoint_every=200,
        eval_tokens=6_000,
        splice_contexts=8,
    )


def load_run_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (or JSON) file, as a dict to merge with command-line overrides."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist or is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {file} is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"config file {file} is not readable: {error.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {_yaml_problem(file, error)}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {file} must hold a mapping of settings, got {type(values).__name__}"
        )
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {file}: setting names must be text, got {key!r}")
        if key == "hsae" and not isinstance(value, dict):
            raise ConfigError(
                f"config file {file}: hsae: must be a mapping of HSAE settings, got {value!r}"
            )
    for key in values.get("hsae", {}):
        if not isinstance(key, str):
            raise ConfigError(f"config file {file}: hsae: setting names must be text, got {key!r}")
    return values


def _yaml_problem(file: Path, error: Exception) -> str:
    """One line for a YAML error: file, line, column and the problem (PyYAML prints seven)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or type(error).__name__
    where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
    context = getattr(error, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{where}: invalid YAML: {' '.join(str(detail).split())}"


def check_run_config(config: RunConfig) -> None:
    """What a run needs from this machine, checked before anything is written: the device
    exists, a local dataset is there and readable (UTF-8 text, known file type, its text field
    present) and a cache to reuse (``activations``) is complete and matches the run."""
    from hsae.activations import open_corpus
    from hsae.devices import parse_device

    parse_device(config.device)
    if config.activations is not None:
        config.check_activations()
    else:
        open_corpus(config.dataset, config.text_field)


def prepare_run_folder(folder: str | Path) -> Path:
    """Check that ``folder`` can hold a run and create it; nothing is written when it cannot.

    Refused: a path that is (or lies below) a regular file, a folder that cannot be created or
    written, and an existing folder that holds other files but no run.
    """
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise RunError(f"run folder {root} exists and is not a folder")
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"cannot create run folder {root}: {probe} is a file, not a folder")
    if root.is_dir() and not (root / RUN_FILE).is_file():
        others = sorted(p.name for p in root.iterdir() if p.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise RunError(
                f"{root} holds other files ({shown}) and no run ({RUN_FILE}); "
                "choose a new or empty folder for --out"
            )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"cannot create run folder {root}: {probe} is not writable")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe_file = root / LOCK_FILE
        probe_file.touch(exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create run folder {root}: {error.strerror or error}") from None
    return root


class Run:
    """A run folder and the stages that fill it."""

    def __init__(
        self, folder: str | Path, config: RunConfig, activations_dir: str | Path | None = None
    ):
        """``activations_dir``: train on another run's activation cache instead of this
        folder's own (the ablations share one cache among many run folders)."""
        self.folder = Path(folder)
        self.config = config
        self.timings: dict[str, float] = {}
        if activations_dir is None and config.activations is not None:
            activations_dir = Path(config.activations).expanduser()  # reused, never written
        self._activations_dir = Path(activations_dir) if activations_dir is not None else None

    # --- opening ------------------------------------------------------------------------
    @classmethod
    def create(
        cls, folder: str | Path, config: RunConfig, activations_dir: str | Path | None = None
    ) -> Run:
        """Start a new run; refuse a folder that already holds another run.

        Checked before anything is written: the device exists here, the folder can be created
        and holds no other files, and no other process holds the folder's lock."""
        root = Path(folder)
        with Run.claim(root, "create the run", config):
            record = root / RUN_FILE
            existing = _read_record(record) if record.exists() else None
            if existing is not None and not _has_work(root):
                existing = None  # nothing done yet (e.g. a refused start): take the new settings
            saved = _with_defaults(existing.get("config", {})) if existing is not None else {}
            if existing is not None and saved != config.model_dump():
                raise RunError(
                    f"{root} already holds a run with other settings "
                    f"({_describe_difference(saved, config.model_dump())}); "
                    f"continue it with --resume {root} or choose another --out"
                )
            run = cls(root, config, activations_dir)
            if existing is not None:  # same settings: continue the run, keeping its stage times
                run.timings = dict(existing.get("timings", {}))
            run._write_record()
        return run

    @staticmethod
    @contextmanager
    def claim(folder: str | Path, purpose: str, config: RunConfig | None = None) -> Iterator[Path]:
        """Check ``config`` (its device exists here, its dataset is readable), check and
        create the run folder, then hold its lock for the block (one writer per run folder;
        see :meth:`lock`). Nothing is written when a check fails."""
        if config is not None:
            check_run_config(config)
        root = prepare_run_folder(folder)
        with _locked(root, purpose):
            yield root

    @classmethod
    def open(cls, folder: str | Path) -> Run:
        """Open an existing run folder (for resume, eval, report, export)."""
        root = Path(folder)
        record = root / RUN_FILE
        if not record.is_file():
            raise RunError(f"{root} is not a run folder (no {RUN_FILE})")
        payload = _read_record(record)
        try:
            config = RunConfig(**payload["config"])
        except (KeyError, TypeError) as error:
            raise RunError(f"{record} is corrupt: {error!r}") from None
        run = cls(root, config)
        run.timings = dict(payload.get("timings", {}))
        return run

    @contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Hold the run folder's lock (``RUN/.lock``) for the block: a second process that
        tries to write the run is refused at once with a :class:`RunError` naming the folder
        and the holder's pid. Re-entrant within a process; released when the process dies."""
        with _locked(self.folder, purpose):
            yield

    def _write_record(self, **extra: Any) -> None:
        path = self.folder / RUN_FILE
        previous = _read_record(path) if path.exists() else {}
        payload = previous | {"config": self.config.model_dump(), "timings": self.timings} | extra
        write_json(path, payload)

    # --- paths ---------------------------------------------------------------------------
    @property
    def activations_dir(self) -> Path:
        return self._activations_dir or self.layout.activations

    @property
    def reuses_cache(self) -> bool:
        """Whether the run trains on an existing cache (``activations``) it never writes."""
        return self.config.activations is not None and (
            self._activations_dir == Path(self.config.activations).expanduser()
        )

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.folder)

    def model_dir(self, which: Which) -> Path:
        return self.layout.model(which)

    def checkpoint_dir(self, which: Which) -> Path:
        return self.layout.checkpoint(which)

    def log_path(self, which: Which) -> Path:
        return self.layout.log(which)

    def trained(self, which: Which) -> bool:
        return (self.model_dir(which) / CONFIG_FILE).is_file()

    def wanted_models(self) -> list[Which]:
        wanted = {BASELINES[name] for name in self.config.baselines}
        return [name for name in MODEL_NAMES if name == "hsae" or name in wanted]

    def unfinished_models(self) -> dict[str, str]:
        """The wanted models without a saved model, each with what is known of it: "still
        training (checkpoint at step N)" when a checkpoint exists, else "not trained yet"."""
        found = {}
        for which in self.wanted_models():
            if self.trained(which):
                continue
            record = self.checkpoint_dir(which) / "trainer.json"
            if record.is_file():
                try:
                    step = int(json.loads(record.read_text(encoding="utf-8"))["step"])
                    found[which] = f"still training (checkpoint at step {step})"
                except (OSError, ValueError, KeyError, TypeError):
                    found[which] = "still training (checkpoint unreadable)"
            else:
                found[which] = "not trained yet"
        return found

    # --- stages ----------------------------------------------------------------------------
    def record_stage_time(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to a stage's time in run.json and timings.json."""
        self._timed(stage, seconds)

    def _timed(self, stage: str, seconds: float) -> None:
        with self.lock("record stage times"):
            self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 2)
            self._write_record()
            write_json(self.layout.timings, self.timings)

    @contextmanager
    def _stage_clock(self, stage: str, every: float = 2.0) -> Iterator[Callable[[], None]]:
        """Time a stage across launches: yields ``tick``, which adds the time since the last
        tick to the stage's total at most every ``every`` seconds, and adds the rest when the
        block ends, however it ends. A killed launch loses at most ``every`` seconds."""
        last = time.perf_counter()

        def tick(force: bool = False) -> None:
            nonlocal last
            now = time.perf_counter()
            if force or now - last >= every:
                self._timed(stage, now - last)
                last = now

        try:
            yield tick
        finally:
            tick(force=True)

    def harvest(self, progress: bool = True) -> Any:
        """Fill (or resume) the activation cache; refuse a cache harvested with other settings."""
        from hsae.activations import ActivationCache, harvest

        with self.lock("harvest"):
            manifest = self.check_cache()
            if manifest is not None and manifest.get("status") == "complete":
                return ActivationCache(self.activations_dir)
            if self.reuses_cache:  # checked complete above: only a vanished cache gets here
                raise RunError(f"activation cache {self.activations_dir} is gone or incomplete")
            with self._stage_clock("harvest") as tick:
                harvest(
                    self.config.harvest_config(),
                    self.activations_dir,
                    progress=progress,
                    on_progress=tick,
                    parallel=False,  # under torchrun only process 0 harvests a run's cache
                )
            return ActivationCache(self.activations_dir)

    def check_cache(self) -> dict[str, Any] | None:
        """The manifest of the run's activation cache, once checked against the run's settings
        (a cache of another model, layer, context length, ... is refused, naming the field);
        None when nothing is harvested yet."""
        from hsae.activations.cache import read_manifest
        from hsae.activations.harvest import check_manifest_matches

        if self.reuses_cache:
            return self.config.check_activations()
        if not (self.activations_dir / CACHE_MANIFEST).is_file():
            return None
        manifest = read_manifest(self.activations_dir)
        check_manifest_matches(
            manifest,
            self.config.harvest_config(),
            self.activations_dir,
            advice="it is not this run's cache: move it away or use another run folder",
        )
        return manifest

    def cache(self) -> Any:
        """The run's complete activation cache, once checked against the run's settings."""
        from hsae.activations import ActivationCache

        manifest = self.check_cache()
        if manifest is None:
            raise RunError(f"{self.folder} has no harvested activations yet; run the harvest first")
        if manifest.get("status") != "complete":
            raise RunError(
                f"{self.folder}: the activation cache is incomplete; finish the harvest with "
                f"hsae train --resume {self.folder}"
            )
        return ActivationCache(self.activations_dir)

    def train(self, which: Which, progress: bool = True) -> HSAE:
        """Train (or resume training) one of the run's models and save it.

        Under ``torchrun`` every process calls it (data-parallel training, docs/scale.md):
        each reads its share of every batch; process 0 alone holds the lock and writes the
        log, checkpoints, stage times and the saved model."""
        main = distributed.rank() == 0
        with self.lock(f"train {which}") if main else nullcontext():
            distributed.barrier()  # every process looks at the folder in the same state
            if self.trained(which):
                return load_hsae(self.model_dir(which))
            cache = self.cache()
            mode = baseline_mode(which)
            model_class = HSAE.class_for(mode)
            config = model_class.adapt_training_config(
                self.config.hsae_config(cache.d_model, mode, cache.scale)
            )
            reader = cache.reader(
                config.batch_size, split="train", seed=self.config.seed, loop=True
            )
            trainer = Trainer(config, rank_share(reader), model_class(config))
            checkpoint = self.checkpoint_dir(which)
            if (checkpoint / "trainer.json").is_file() or checkpoint.with_name(
                f".{checkpoint.name}.old"
            ).exists():
                trainer.resume(checkpoint)
            if not main:
                model = trainer.fit(
                    progress=False,
                    log_every=self.config.log_every,
                    checkpoint_dir=checkpoint,
                    checkpoint_every=self.config.checkpoint_every,
                )
                distributed.barrier()  # process 0 saves the model
                return model
            # The log keeps the steps the resumed state has (none without a checkpoint), so a
            # step is never logged twice.
            _truncate_log(self.log_path(which), trainer.step)
            sink = self._log_sink(which, config)
            # Ticked at every logged step (already a write): a kill loses less than one log
            # interval of the stage's time, however short the launch.
            with self._stage_clock(f"train_{which}", every=0.0) as tick:

                def on_log(log: Any) -> None:
                    sink(log)
                    tick()

                model = trainer.fit(
                    progress=progress,
                    log_every=self.config.log_every,
                    on_log=on_log,
                    checkpoint_dir=checkpoint,
                    checkpoint_every=self.config.checkpoint_every,
                )
                model.save(self.model_dir(which))
            distributed.barrier()
            return model

    def evaluate(
        self,
        splice: bool = True,
        suite: str = "standard",
        suite_settings: SuiteSettings | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Evaluate the trained models side by side; write metrics.json and summary.md.

        ``suite="full"`` adds every part of :func:`hsae.evaluation.suite.run_full_suite` this
        environment can run (metrics.json is rewritten after each part); ``splice=False``
        keeps the language model out of it entirely.
        """
        from hsae.evaluation.suite import SUITES

        if suite not in SUITES:
            raise RunError(f"suite must be one of {list(SUITES)}, got {suite!r}")
        try:
            with self.lock("evaluate"):
                return self._evaluate(splice, suite, suite_settings, progress)
        except RunInUseError:
            pending = self.unfinished_models()
            state = "; ".join(f"{k}: {v}" for k, v in pending.items()) or "models trained"
            raise RunError(
                f"cannot evaluate {self.folder} now: another hsae process holds it "
                f"({_holder(self.folder)}; {state}); evaluate once it has finished"
            ) from None

    def _evaluate(
        self,
        splice: bool,
        suite: str,
        suite_settings: SuiteSettings | None,
        progress: bool,
    ) -> dict[str, Any]:
        from hsae.evaluation.suite import (
            SuiteInputs,
            SuiteSettings,
            evaluate_models,
            run_full_suite,
        )

        cache = self.cache()
        pending = self.unfinished_models()
        if pending:
            state = "; ".join(f"{which} is {what}" for which, what in pending.items())
            raise RunError(
                f"cannot evaluate {self.folder}: {state}; finish it with "
                f"hsae train --resume {self.folder}"
            )
        names = list(self.wanted_models())
        models = {name: self.load(name) for name in names}
        heldout = cache.all_activations("heldout")[: self.config.eval_tokens]
        if heldout.shape[0] == 0:
            raise RunError(f"{self.folder}: the activation cache has no held-out tokens")
        start = time.perf_counter()
        language_model = functools.cache(self._language_model)
        splice_inputs = None
        if splice and self.config.splice_contexts > 0:
            splice_inputs = self._splice_inputs(cache, language_model())
        results = evaluate_models(models, heldout, splice_inputs)
        results["run"] = {
            "model": cache.manifest.get("model"),
            "layer": cache.manifest.get("layer"),
        }
        self._write_metrics(results, names)
        if suite == "full":
            inputs = SuiteInputs(
                run=self,
                models=models,
                layer=int(cache.manifest["layer"]),
                load_lm=language_model if splice else None,
                settings=suite_settings or SuiteSettings(seed=self.config.seed),
                progress=progress,
            )
            run_full_suite(inputs, results, on_part_done=lambda r: self._write_metrics(r, names))
        self._timed("evaluate", time.perf_counter() - start)
        return results

    def _write_metrics(self, results: dict[str, Any], names: list[str]) -> None:
        from hsae.evaluation.suite import comparison_table, full_suite_table

        write_json(self.layout.metrics, results)
        tables = comparison_table(results, names)
        if "suite" in results:
            tables += "\n\n" + full_suite_table(results, names)
        write_text(self.layout.summary, _summary_markdown(self, tables))

    def _language_model(self) -> Any:
        from hsae.activations import load_language_model

        return load_language_model(self.config.model)

    def _splice_inputs(self, cache: Any, lm: Any) -> tuple[Any, torch.nn.Module, list[Any]]:
        from hsae.activations.models import decoder_layers

        layer = int(cache.manifest["layer"])
        batches = heldout_context_batches(cache, lm, self.config.splice_contexts)
        return lm.model, decoder_layers(lm.model)[layer], batches

    def _log_sink(self, which: Which, config: HSAEConfig) -> Any:
        sinks = [jsonl_sink(self.log_path(which))]
        if self.config.tensorboard:
            sinks.append(tensorboard_sink(self.folder / TENSORBOARD_DIR, which))
        if self.config.wandb_project:
            tag = f"{self.folder.name}-{which}"
            sinks.append(wandb_sink(self.config.wandb_project, tag, config.model_dump()))
        return combine(sinks)

    def load(self, which: Which) -> HSAE:
        if not self.trained(which):
            raise RunError(f"{self.folder} has no trained {which} model yet")
        return load_hsae(self.model_dir(which))

    def top_contexts(
        self, level: int, index: int, k: int = 10, which: Which = "hsae", **options: Any
    ) -> list[dict[str, Any]]:
        """The ``k`` highest-activating contexts of feature ``level:index``, decoded, with
        per-token activations (:func:`hsae.explore.top_contexts`)."""
        from hsae.explore import top_contexts

        return top_contexts(self, level, index, k, which, **options)


def on_main_process(action: Callable[[], Any], what: str) -> Any:
    """Run ``action`` on process 0 only (a single process: just run it); every process then
    learns whether it succeeded, so the others fail with a one-line error instead of waiting
    for a process that has stopped. A collective under ``torchrun``: every process calls it."""
    result: Any = None
    error: BaseException | None = None
    if distributed.rank() == 0:
        try:
            result = action()
        except Exception as caught:  # passed on below, after the others have been told
            error = caught
    if not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise RunError(f"process 0 could not {what}; its own message says why")
    return result


def heldout_context_batches(
    cache: Any, lm: Any, n_contexts: int, batch_size: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rebuild the first ``n_contexts`` held-out contexts as (ids, mask, splice-mask) batches."""
    info = cache.token_info("heldout")
    contexts = []
    for context in dict.fromkeys(info.context_ids.tolist()):
        if len(contexts) == n_contexts:
            break
        rows = info.context_ids == context
        order = info.positions[rows].argsort()
        contexts.append(torch.as_tensor(info.token_ids[rows][order], dtype=torch.long))
    from hsae.activations.prompts import pad_prompts

    batches = []
    for start in range(0, len(contexts), batch_size):
        ids, mask, prefix = pad_prompts(contexts[start : start + batch_size], lm)
        keep = mask.bool()
        keep[:, :prefix] = False
        batches.append((ids.to(lm.device), mask.to(lm.device), keep.to(lm.device)))
    return batches


def _summary_markdown(run: Run, table: str) -> str:
    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in run.timings.items())
    source = f"dataset: {run.config.dataset or 'built-in WordNet corpus'}"
    if run.config.activations is not None:
        source = f"activations: the existing cache {run.config.activations}"
    return (
        f"# Run {run.folder.name}\n\n"
        f"Model: {run.config.model or 'embedded Gemma 3 270M'}, layer: "
        f"{run.config.layer if run.config.layer is not None else 'middle'}, "
        f"{source}\n\n"
        f"{table}\n\nTimings: {timings or 'n/a'}\n"
    )


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run configuration with the defaults of settings added since it was written (an
    older run.json lacks them), so that only real differences count."""
    try:
        return RunConfig(**saved).model_dump()
    except (ConfigError, TypeError):
        return saved


def _describe_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {_short(saved.get(k))} vs {_short(wanted.get(k))}" for k in keys)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncate_log(path: Path, step: int) -> None:
    """Keep only complete log lines up to ``step`` (the checkpoint being resumed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) <= step:
            kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


@contextmanager
def _locked(folder: Path, purpose: str) -> Iterator[None]:
    with ExitStack() as held:
        try:
            held.enter_context(folder_lock(folder, purpose))
        except FolderInUseError:
            raise RunInUseError(
                f"{folder} is in use by another hsae process ({_holder(folder)}); one process "
                "writes a run folder at a time: wait for it to finish or stop it"
            ) from None
        yield


def _holder(folder: Path) -> str:
    from hsae.locking import holder_of

    return holder_of(folder) or "pid unknown"


def _has_work(root: Path) -> bool:
    """Whether a run folder holds anything but its record: activations, checkpoints, models."""
    return any(
        (root / name).exists()
        for name in (ACTIVATIONS_DIR, CHECKPOINTS_DIR, *MODEL_NAMES, METRICS_FILE)
    )


def _read_record(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path} is corrupt or unreadable: {error}") from None
    if not isinstance(payload, dict):
        raise RunError(f"{path} is corrupt: expected a JSON object")
    return payload
