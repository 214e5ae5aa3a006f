"""The ``kdistill`` command: one module per command; a module defining ``register(subparsers)`` is found
automatically, so a new command is one new file."""

from kdistill.cli.app import main

__all__ = ["main"]
