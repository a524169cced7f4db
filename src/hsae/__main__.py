"""``python -m hsae`` (and ``torchrun ... -m hsae``): the command line of :mod:`hsae.cli`."""

from hsae.cli import app

app(prog_name="hsae")
