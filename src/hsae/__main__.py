"""``python -m hsae`` (and ``torchrun ... -m hsae harvest ...``): the command-line interface."""

from hsae.cli import app

app()
