"""Command line: parses and validates arguments, then calls the library. No logic lives here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hsae",
    help="Train Hierarchical Sparse Autoencoders and explore their feature forest.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """hsae: harvest activations, train an HSAE and its baseline, evaluate, explore, export."""


@app.command()
def harvest(
    model: str = typer.Option(None, help="hub id, local folder or .gguf [embedded Gemma 3 270M]"),
    layer: int = typer.Option(None, help="capture after this 0-based block [middle block]"),
    dataset: str = typer.Option(None, help="builtin | file/folder | hf:NAME[:CONFIG][@SPLIT]"),
    tokens: int = typer.Option(1_000_000, help="activation rows to harvest (train + held-out)"),
    out: str = typer.Option("activations", help="cache folder; an existing one is resumed"),
    context_length: int = typer.Option(128, help="tokens per context, BOS included"),
    batch_size: int = typer.Option(32, help="contexts per forward pass"),
    shard_tokens: int = typer.Option(65_536, help="activation rows per shard file"),
    dtype: str = typer.Option("float32", help="storage dtype: float32 | float16"),
    heldout_fraction: float = typer.Option(0.05, help="fraction of tokens kept for held-out"),
    seed: int = typer.Option(0, help="document-order seed"),
    device: str = typer.Option(None, help="torch device [cuda if available, else cpu]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing cache first"),
) -> None:
    """Harvest residual-stream activations into a sharded, resumable on-disk cache."""
    from hsae.activations import HarvestConfig, HarvestError
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
        )
        cache = run_harvest(config, out, overwrite=overwrite)
    except HarvestError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"{cache.root}: {cache.n_tokens('train')} train + {cache.n_tokens('heldout')} held-out "
        f"activations, d_model {cache.d_model}, layer {cache.manifest['layer']}, "
        f"scale {cache.scale:.6g}"
    )


if __name__ == "__main__":
    app()
