"""Command line: parses and validates arguments, then calls the library. No logic lives here."""

from __future__ import annotations

from contextlib import ExitStack

import typer

from hsae.layout import MODEL_NAMES

app = typer.Typer(
    name="hsae",
    help="Train Hierarchical Sparse Autoencoders and explore their feature forest.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts show defaults as "[...]", which rich would eat as markup
)


@app.callback()
def main() -> None:
    """hsae: harvest activations, train an HSAE and its baseline, evaluate, explore, export."""


@app.command()
def harvest(
    model: str = typer.Option(None, help="hub id, local folder or .gguf [embedded Gemma 3 270M]"),
    layer: int = typer.Option(None, help="capture after this 0-based block [middle block]"),
    dataset: str = typer.Option(None, help="builtin | file/folder | hf:NAME[:CONFIG][@SPLIT]"),
    text_field: str = typer.Option("text", help="dataset column/field holding the text"),
    tokens: int = typer.Option(1_000_000, help="activation rows to harvest (train + held-out)"),
    out: str = typer.Option("activations", help="cache folder; an existing one is resumed"),
    context_length: int = typer.Option(128, help="tokens per context, BOS included"),
    batch_size: int = typer.Option(32, help="contexts per forward pass"),
    shard_tokens: int = typer.Option(65_536, help="activation rows per shard file"),
    dtype: str = typer.Option("float32", help="storage dtype: float32 | float16 | bfloat16"),
    heldout_fraction: float = typer.Option(0.05, help="fraction of tokens kept for held-out"),
    seed: int = typer.Option(0, help="document-order seed"),
    device: str = typer.Option(None, help="torch device [cuda if available, else cpu]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing cache first"),
) -> None:
    """Harvest residual-stream activations into a sharded, resumable on-disk cache."""
    from hsae.activations import HarvestConfig
    from hsae.activations import harvest as run_harvest

    try:
        config = HarvestConfig(
            model=model,
            layer=layer,
            dataset=dataset,
            tokens=tokens,
            context_length=context_length,
            batch_size=batch_size,
            shard_tokens=shard_tokens,
            dtype=dtype,
            heldout_fraction=heldout_fraction,
            seed=seed,
            device=device,
            text_field=text_field,
        )
        cache = run_harvest(config, out, overwrite=overwrite)
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(
        f"{cache.root}: {cache.n_tokens('train')} train + {cache.n_tokens('heldout')} held-out "
        f"activations, d_model {cache.d_model}, layer {cache.manifest['layer']}, "
        f"scale {cache.scale:.6g}"
    )


def _fail(error: Exception) -> typer.Exit:
    """Print ``error`` as one line on stderr (on a fresh line, after any progress bar)."""
    _close_progress_bars()
    typer.echo(f"error: {_one_line(error)}", err=True)
    return typer.Exit(code=2)


def _one_line(error: Exception) -> str:
    from hsae.errors import HSAEError

    if isinstance(error, OSError) and not isinstance(error, HSAEError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _close_progress_bars() -> None:
    """Close live tqdm bars: each ends its line, so the error starts on a fresh one."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _user_errors() -> tuple[type[Exception], ...]:
    """What the command line reports in one line: the package's errors (``hsae.errors``) and
    the operating system's refusals (no space, no permission, a path that cannot exist)."""
    from hsae.errors import HSAEError

    return (HSAEError, OSError)


def _parse_sizes(text: str | None, option: str = "--level-sizes") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise _fail(
            ValueError(f"{option}: expected comma-separated integers, got {text!r}")
        ) from None


def _parse_names(text: str) -> list[str]:
    """Comma-separated names (e.g. ``--baselines independent,matryoshka``)."""
    return [part for part in text.replace(" ", "").split(",") if part]


@app.command()
def train(
    config_file: str = typer.Argument(None, help="YAML file of run settings (optional)"),
    out: str = typer.Option(None, help="run folder to create [runs/<timestamp>]"),
    resume: str = typer.Option(None, help="continue the killed or unfinished run in this folder"),
    model: str = typer.Option(None, help="hub id or local path [embedded Gemma 3 270M]"),
    layer: int = typer.Option(None, help="residual stream after this block [middle]"),
    dataset: str = typer.Option(None, help="HF dataset, local file/folder [built-in WordNet]"),
    text_field: str = typer.Option(None, help="dataset column/field holding the text [text]"),
    tokens: int = typer.Option(None, help="activations to harvest (train + held-out)"),
    context_length: int = typer.Option(None, help="tokens per context, BOS included [128]"),
    activations: str = typer.Option(
        None, help="train on this existing activation cache instead of harvesting"
    ),
    train_tokens: int = typer.Option(None, help="tokens each model trains on"),
    level_sizes: str = typer.Option(None, help="comma-separated sizes, e.g. 256,512,1024,2048"),
    target_l0: float = typer.Option(None, help="L0 the sparsity controller steers to"),
    level: str = typer.Option(None, help="level kind: jumprelu | topk | batchtopk"),
    rho: float = typer.Option(None, help="weight of the parent-children constraint"),
    r: float = typer.Option(None, "--r", help="parent/children perturbation rate"),
    update_interval: int = typer.Option(None, help="steps between forest rebuilds"),
    similarity: str = typer.Option(
        None, help="encoder | decoder | coactivation | conditional | hybrid"
    ),
    tree: str = typer.Option(None, help="partial | full | binary | fixed"),
    lr: float = typer.Option(None, help="Adam learning rate"),
    batch_size: int = typer.Option(None, help="tokens per training step"),
    seed: int = typer.Option(None, help="random seed"),
    device: str = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    no_baseline: bool = typer.Option(False, "--no-baseline", help="train no baseline at all"),
    baselines: str = typer.Option(
        None, help="baselines to train, comma-separated: independent,matryoshka [independent]"
    ),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="also log to TensorBoard"),
    wandb_project: str = typer.Option(None, help="also log to this W&B project"),
) -> None:
    """Harvest (if needed), then train the HSAE and its independent baseline in a run folder.

    Under torchrun (torchrun --nproc-per-node N -m hsae train ...) the processes train one
    model data-parallel, batch_size being the global batch (docs/scale.md)."""
    from hsae import distributed
    from hsae.runs import Run, RunConfig, load_run_config_file, on_main_process

    run_settings = {
        "model": model,
        "layer": layer,
        "dataset": dataset,
        "text_field": text_field,
        "harvest_tokens": tokens,
        "context_length": context_length,
        "activations": activations,
        "seed": seed,
        "device": device,
        "tensorboard": tensorboard or None,
        "wandb_project": wandb_project,
    }
    hsae_settings = {
        "train_tokens": train_tokens,
        "level_sizes": _parse_sizes(level_sizes),
        "target_l0": target_l0,
        "level": level,
        "rho": rho,
        "perturbation_rate": r,
        "update_interval": update_interval,
        "similarity": similarity,
        "tree": tree,
        "lr": lr,
        "batch_size": batch_size,
    }
    given = {k: v for k, v in run_settings.items() if v is not None}
    given_hsae = {k: v for k, v in hsae_settings.items() if v is not None}
    with ExitStack() as held:
        try:
            if resume is not None:
                if given or given_hsae or config_file or no_baseline or baselines or out:
                    raise _fail(
                        ValueError("--resume takes no other settings: the run keeps its own")
                    )
                run = Run.open(resume)
                _join_processes(run.config.device)
                held.callback(distributed.destroy)
                if distributed.rank() == 0:
                    held.enter_context(run.lock("hsae train --resume"))
            else:
                if activations is not None and (tokens, dataset, text_field) != (None,) * 3:
                    raise _fail(
                        ValueError(
                            "--activations trains on an existing cache: --tokens, --dataset and "
                            "--text-field do not apply"
                        )
                    )
                values = load_run_config_file(config_file) if config_file else {}
                values |= given
                values["hsae"] = dict(values.get("hsae", {})) | given_hsae
                if no_baseline and baselines:
                    raise _fail(ValueError("--no-baseline and --baselines contradict each other"))
                if no_baseline:
                    values["baselines"] = []
                if baselines is not None:
                    values["baselines"] = _parse_names(baselines)
                config = RunConfig(**values)
                if distributed.launched() and out is None:
                    raise _fail(ValueError("--out: a multi-process run needs the run folder named"))
                folder = out or _default_run_folder()
                _join_processes(config.device)
                held.callback(distributed.destroy)

                def create() -> Run:
                    held.enter_context(Run.claim(folder, "hsae train", config))
                    return Run.create(folder, config)

                run = on_main_process(create, f"create the run folder {folder}")
                if run is None:
                    run = Run.open(folder)
            run.check_cache()
            if distributed.rank() == 0:
                typer.echo(f"run folder: {run.folder}")
            on_main_process(run.harvest, "harvest the activations")
            for which in run.wanted_models():
                run.train(which)
            main = distributed.rank() == 0
        except _user_errors() as error:
            raise _fail(error) from None
    if main:
        typer.echo(f"trained models are in {run.folder}; evaluate with: hsae eval {run.folder}")


def _join_processes(device: str) -> None:
    """Join the torchrun process group (no-op in a single process): NCCL when the run
    trains on CUDA, gloo on the CPU."""
    from hsae import distributed
    from hsae.devices import parse_device

    if distributed.launched():
        distributed.init("nccl" if parse_device(device).type == "cuda" else "gloo")


def _default_run_folder() -> str:
    import time

    return f"runs/{time.strftime('%Y%m%d-%H%M%S')}"


@app.command("eval")
def evaluate_run(
    run_dir: str = typer.Argument(..., help="a run folder written by hsae train or hsae demo"),
    no_lm: bool = typer.Option(False, "--no-lm", help="never load the language model"),
    suite: str = typer.Option("standard", help="standard | full (every part possible here)"),
    parts: str = typer.Option(None, help="full-suite parts to attempt, comma-separated [all]"),
    judge_pairs: int = typer.Option(50, help="parent-child pairs per model for the LLM judge"),
    judge_features: int = typer.Option(30, help="features per model for LLM autointerp"),
    judge_max_requests: int = typer.Option(None, help="cap on judge HTTP requests [env/none]"),
    hf_probing_dataset: str = typer.Option(
        "fancyzhx/ag_news", help="labelled HF dataset for online sparse probing"
    ),
    hf_text_field: str = typer.Option("text", help="text column of that dataset"),
    hf_label_field: str = typer.Option("label", help="label column of that dataset"),
    absorption_words: int = typer.Option(3000, help="single-token words for absorption"),
    contexts_per_category: int = typer.Option(200, help="WordNet contexts per category"),
) -> None:
    """Evaluate a run's HSAE and baseline on held-out activations; write metrics.json.

    --suite full adds absorption, sparse probing, taxonomy alignment, LLM judges (when
    HSAE_JUDGE_* is set) and SAEBench (GPU), and says which parts were skipped and why.
    """
    from hsae.evaluation.suite import SuiteSettings, comparison_table, full_suite_table
    from hsae.runs import Run

    try:
        settings = SuiteSettings(
            parts=tuple(p for p in parts.split(",") if p) if parts else None,
            judge_pairs=judge_pairs,
            judge_features=judge_features,
            judge_max_requests=judge_max_requests,
            hf_probing_dataset=hf_probing_dataset,
            hf_text_field=hf_text_field,
            hf_label_field=hf_label_field,
            absorption_words=absorption_words,
            contexts_per_category=contexts_per_category,
        )
    except ValueError as error:
        raise _fail(error) from None
    try:
        run = Run.open(run_dir)
        results = run.evaluate(splice=not no_lm, suite=suite, suite_settings=settings)
    except _user_errors() as error:
        raise _fail(error) from None
    names = [n for n in MODEL_NAMES if n in results]
    typer.echo(comparison_table(results, names))
    if "suite" in results:
        typer.echo("\n" + full_suite_table(results, names))
    typer.echo(f"\nwrote {run.folder / 'metrics.json'} and {run.folder / 'summary.md'}")
    if results.get("suite", {}).get("failed"):
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="run folder (an ordinary run folder)"),
    suite: str = typer.Option("standard", help="standard | full (adds about 10 min on a CPU)"),
    baselines: str = typer.Option(
        None, help="baselines to train, comma-separated: independent,matryoshka [independent]"
    ),
) -> None:
    """Offline end to end on the embedded model and corpus: harvest, train both, evaluate."""
    import time

    from hsae.evaluation.suite import SUITES
    from hsae.runs import Run, RunConfig, demo_config

    if suite not in SUITES:
        raise _fail(ValueError(f"--suite must be one of {list(SUITES)}, got {suite!r}"))
    started = time.perf_counter()
    held = ExitStack()
    try:
        config = demo_config()
        if baselines is not None:
            config = RunConfig(**config.model_dump() | {"baselines": _parse_names(baselines)})
        held.enter_context(Run.claim(out, "hsae demo", config))
        run = Run.create(out, config)
        typer.echo(f"run folder: {run.folder}")
        run.harvest()
        for which in run.wanted_models():
            run.train(which)
        results = run.evaluate(suite=suite)
        from hsae.report import build_report

        report_started = time.perf_counter()
        page = build_report(run).html
        run.record_stage_time("report", time.perf_counter() - report_started)
    except _user_errors() as error:
        raise _fail(error) from None
    finally:
        held.close()
    from hsae.evaluation.suite import comparison_table, full_suite_table

    names = [n for n in MODEL_NAMES if n in results]
    typer.echo(comparison_table(results, names))
    if "suite" in results:
        typer.echo("\n" + full_suite_table(results, names))
    stages = ", ".join(f"{stage}: {seconds:.0f} s" for stage, seconds in run.timings.items())
    typer.echo(f"\nstage times: {stages}; total {time.perf_counter() - started:.0f} s")
    typer.echo(f"results: {run.folder / 'summary.md'} and {run.folder / 'metrics.json'}")
    typer.echo(f"feature explorer: {page} (plots in {run.folder / 'plots'})")


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="a run folder with a trained HSAE"),
    out: str = typer.Option(None, help="HTML file to write [RUN_DIR/report.html]"),
    which: str = typer.Option("hsae", help="hsae | baseline | matryoshka: whose forest to explore"),
    max_features: int = typer.Option(400, help="features embedded in the page"),
    max_children: int = typer.Option(16, help="children shown per node"),
    max_tokens: int = typer.Option(100_000, help="activation rows scanned for contexts"),
    projection: str = typer.Option("auto", help="auto (UMAP if installed) | umap | pca | none"),
    logit_lens: int = typer.Option(
        8, help="tokens each feature promotes/suppresses through the LM head (0: off)"
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="skip RUN_DIR/plots/*.png"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an existing --out file (never the run's own files)"
    ),
) -> None:
    """Write the feature-forest explorer (one self-contained HTML file) and PNG charts."""
    from hsae.report import ReportSettings, build_report
    from hsae.runs import Run

    try:
        settings = ReportSettings(
            which=which,
            max_features=max_features,
            max_children=max_children,
            max_tokens=max_tokens,
            projection=projection,
            logit_lens=logit_lens,
        )
        run = Run.open(run_dir)
        with run.lock("hsae report"):  # one writer per run folder (docs/reliability.md)
            result = build_report(run, settings, out=out, plots=not no_plots, overwrite=overwrite)
    except _user_errors() as error:
        raise _fail(error) from None
    meta = result.meta
    typer.echo(
        f"wrote {result.html} ({result.size_bytes / 1e6:.2f} MB, {meta['shown_features']} of "
        f"{meta['total_features']} features) in {result.seconds:.1f} s"
    )
    if meta["logit_lens"]["note"]:
        typer.echo(f"no logit lens in the page: {meta['logit_lens']['note']}")
    for path in result.plots:
        typer.echo(f"wrote {path}")


@app.command("export")
def export_run(
    run_dir: str = typer.Argument(..., help="a run folder, an extracted archive or a model folder"),
    out: str = typer.Argument(..., help="folder (saelens) or .tar.gz file (archive) to write"),
    format: str = typer.Option("saelens", "--format", help="saelens | archive"),
    model_name: str = typer.Option(None, help="model name for SAELens/SAEBench [the run's]"),
    layer: int = typer.Option(None, help="layer of a model folder outside any run [the run's]"),
    sparsity_tokens: int = typer.Option(
        65_536, help="held-out rows for sparsity.safetensors (0: leave it out)"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an existing OUT (never the run's own files)"
    ),
) -> None:
    """Export a run: each level as a SAELens SAE (a Hub-ready folder), or one run archive."""
    from hsae.interop import export_archive, export_saelens
    from hsae.interop.saelens import SPARSITY_FILE

    if format not in ("saelens", "archive"):
        raise _fail(ValueError(f"--format must be 'saelens' or 'archive', got {format!r}"))
    try:
        if format == "archive":
            typer.echo(f"wrote {export_archive(run_dir, out, overwrite=overwrite)}")
            return
        written = export_saelens(
            run_dir, out, model_name, overwrite, layer, sparsity_tokens=sparsity_tokens
        )
    except _user_errors() as error:
        raise _fail(error) from None
    for which, folders in written.items():
        sparsity = (
            "sparsity.safetensors from held-out activations"
            if (folders[0] / SPARSITY_FILE).is_file()
            else "no sparsity.safetensors (no held-out activations, or --sparsity-tokens 0)"
        )
        typer.echo(
            f"{which}: {len(folders)} SAELens SAEs with parent links + forest.json, {sparsity}, "
            f"in {folders[0].parent}"
        )


@app.command("upload")
def upload_run(
    run_dir: str = typer.Argument(..., help="a run folder, an extracted archive or a model folder"),
    repo_id: str = typer.Argument(..., help="Hugging Face Hub model repository: owner/name"),
    private: bool = typer.Option(False, "--private", help="create the repository private"),
    revision: str = typer.Option("main", help="branch to commit to (created if missing)"),
    model_name: str = typer.Option(None, help="model name for SAELens/SAEBench [the run's]"),
    layer: int = typer.Option(None, help="layer of a model folder outside any run [the run's]"),
) -> None:
    """Push the SAELens export of a run to the Hugging Face Hub (needs network and a token)."""
    from hsae.interop.hub import upload

    try:
        url = upload(run_dir, repo_id, private, revision, model_name, layer)
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(f"uploaded {run_dir} to {repo_id}: {url}")
    typer.echo(f'load a level with SAE.from_pretrained("{repo_id}", "hsae/level_0")')


@app.command("import-saelens")
def import_saelens(
    folders: list[str] = typer.Argument(..., help="SAELens JumpReLU SAEs, smallest first"),  # noqa: B008
    out: str = typer.Option(..., help="model folder to write (open it with hsae.load)"),
    similarity: str = typer.Option(
        None,
        help="rebuild the forest with encoder | decoder similarity [the folders' own parent "
        "links when they carry them (an hsae export), else decoder]",
    ),
    tree: str = typer.Option("partial", help="partial | full | binary"),
    scale: float = typer.Option(
        None, help="activation scale c the HSAE applies to raw inputs [an export's own, else 1]"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace the model in an existing --out folder"
    ),
) -> None:
    """Build an HSAE from SAELens JumpReLU SAEs of growing size: the parent links an hsae
    export carries, or a post-hoc forest."""
    from hsae.interop.saelens import check_model_out, import_forest, save_model_folder

    try:
        check_model_out(out, overwrite)  # before the work: the same check as the save
        model, source = import_forest(folders, similarity, scale, tree=tree)
        save_model_folder(model, out, overwrite=overwrite)
    except _user_errors() as error:
        raise _fail(error) from None
    linked = sum(int((links >= 0).sum()) for links in model.forest())
    typer.echo(f"wrote {out}: levels {model.config.level_sizes}, {linked} parent links: {source}")


@app.command("saebench")
def saebench(
    run_dir: str = typer.Argument(..., help="a run folder (or an extracted run archive)"),
    out: str = typer.Option(None, help="results folder [RUN_DIR/saebench]"),
    evals: str = typer.Option(
        "core,absorption,autointerp,ravel,scr,sparse_probing", help="comma-separated evals"
    ),
    levels: str = typer.Option(None, help="comma-separated levels to evaluate [all]"),
    model_name: str = typer.Option(None, help="TransformerLens model name [the run's]"),
    device: str = typer.Option("cuda", help="torch device"),
    llm_batch_size: int = typer.Option(32, help="contexts per language-model batch"),
    llm_dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    api_key_file: str = typer.Option(None, help="OpenAI key file for autointerp [skip it]"),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="let SAEBench run the dataset's own loading code from the Hub (off: refused)",
    ),
) -> None:
    """Run SAEBench's Table 1 evaluations on a run's HSAE and baseline (GPU, sae-bench)."""
    from pathlib import Path

    from hsae.interop.saebench import run_saebench, table1_markdown

    try:
        api_key = Path(api_key_file).read_text().strip() if api_key_file else None
        table = run_saebench(
            run_dir,
            out or str(Path(run_dir) / "saebench"),
            evals=[name for name in evals.split(",") if name],
            model_name=model_name,
            levels=_parse_sizes(levels, "--levels"),
            device=device,
            llm_batch_size=llm_batch_size,
            llm_dtype=llm_dtype,
            api_key=api_key,
            trust_remote_code=trust_remote_code,
        )
    except (*_user_errors(), OSError) as error:
        raise _fail(error) from None
    typer.echo(table1_markdown(table))


def _parse_values(option: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise _fail(
            ValueError(f"{option}: expected comma-separated numbers, got {text!r}")
        ) from None


@app.command()
def ablate(
    run_dir: str = typer.Argument(..., help="a run folder with harvested activations"),
    out: str = typer.Option(None, help="ablation folder, resumed if it exists [RUN_DIR/ablations]"),
    variants: str = typer.Option(
        "all", help="comma-separated groups (all, core, tree, similarity, rho, r) or variant names"
    ),
    train_tokens: int = typer.Option(None, help="tokens per variant (default: the run's)"),
    rho_sweep: str = typer.Option("0.03,0.1,0.3,1", help="constraint weights of the rho sweep"),
    r_sweep: str = typer.Option("0,0.02,0.05,0.1,0.2", help="perturbation rates of the r sweep"),
) -> None:
    """Train the paper's ablations on a run's activations; write one table and Figure 8."""
    from pathlib import Path

    from hsae.ablations import AblationSettings, markdown_table
    from hsae.ablations import ablate as run_ablations

    try:
        settings = AblationSettings(
            variants=tuple(v for v in variants.replace(" ", "").split(",") if v),
            train_tokens=train_tokens,
            rho_sweep=_parse_values("--rho-sweep", rho_sweep),
            r_sweep=_parse_values("--r-sweep", r_sweep),
        )
        results = run_ablations(run_dir, out, settings)
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(markdown_table(results))
    folder = Path(results["out"])
    typer.echo(f"wrote {folder / 'ablations.json'}, ablations.md and figure8.png")


@app.command()
def plan(
    d_model: int = typer.Option(2304, help="activation width (gemma-2-2b: 2304)"),
    level_sizes: str = typer.Option("2048,4096,8192,16384", help="comma-separated level sizes"),
    train_tokens: int = typer.Option(100_000_000, help="tokens the model trains on"),
    harvest_tokens: int = typer.Option(None, help="activations to harvest [= train tokens]"),
    batch_size: int = typer.Option(1024, help="tokens per step, over all processes"),
    target_l0: float = typer.Option(50.0, help="target L0 per level"),
    world_size: int = typer.Option(1, help="training processes (torchrun --nproc-per-node)"),
    cache_dtype: str = typer.Option("bfloat16", help="bfloat16 | float16 | float32"),
    cache_dir: str = typer.Option(".", help="where the cache would go (free disk is checked)"),
    device: str = typer.Option("auto", help="device the step is measured on"),
    no_measure: bool = typer.Option(False, "--no-measure", help="skip the timed step"),
    json_out: str = typer.Option(None, "--json", help="also write the plan as JSON here"),
) -> None:
    """What a run costs: cache size on disk, memory per process, FLOPs per token, and the wall
    time from one measured step at full size (plus a FLOP bound on named accelerators)."""
    from hsae.io import write_json
    from hsae.plan import PlanInputs, format_plan, make_plan

    try:
        inputs = PlanInputs(
            d_model=d_model,
            level_sizes=_parse_sizes(level_sizes) or [],
            train_tokens=train_tokens,
            harvest_tokens=harvest_tokens,
            batch_size=batch_size,
            target_l0=target_l0,
            world_size=world_size,
            cache_dtype=cache_dtype,
            cache_dir=cache_dir,
        )
        result = make_plan(inputs, device=device, measure=not no_measure)
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(format_plan(result))
    if json_out:
        write_json(json_out, result.to_dict())


@app.command()
def steer(
    run_dir: str = typer.Argument(..., help="a run folder with a trained model"),
    feature: str = typer.Option(..., help="the feature to steer with, as LEVEL:INDEX"),
    prompt: str = typer.Option(..., help="text to continue"),
    strength: float = typer.Option(
        None, help="activation added to each feature [its own held-out maximum]"
    ),
    children: bool = typer.Option(False, "--children", help="also steer with each child"),
    max_new_tokens: int = typer.Option(24, help="greedy tokens generated per line"),
    which: str = typer.Option("hsae", help="hsae | baseline | matryoshka: whose features"),
    lens: int = typer.Option(
        5, help="tokens each feature promotes/suppresses via the head (0: off)"
    ),
) -> None:
    """Greedy continuations of a prompt: clean, steered by a feature and by each child."""
    from hsae.steering import format_comparison, parse_feature, steer_run

    try:
        level, index = parse_feature(feature)
        lines = steer_run(
            run_dir, level, index, prompt, strength, children, max_new_tokens, which, lens_k=lens
        )
    except _user_errors() as error:
        raise _fail(error) from None
    typer.echo(format_comparison(prompt, lines, which))


if __name__ == "__main__":
    app()
