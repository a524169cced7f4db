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


if __name__ == "__main__":
    app()
