"""``python -m headstart`` (and ``torchrun ... -m headstart``): the ``headstart`` command."""

from .cli import command

command()
