"""The ``m4oe`` command line: one module per group of commands, all on one Typer app."""

from . import commands  # noqa: F401  (registers the commands)
from .base import app, main

__all__ = ["app", "main"]
