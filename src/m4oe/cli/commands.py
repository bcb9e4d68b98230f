"""Importing this registers every command on :data:`m4oe.cli.base.app`, in the order help lists them."""

from . import data_commands, train_commands, predict_commands, extra_commands  # noqa: F401, I001
