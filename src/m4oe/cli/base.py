"""What every command shares: the Typer app, the console, one-line errors and ``--debug``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

app = typer.Typer(help="M4oE: one segmentation model across imaging modalities.", no_args_is_help=True)
# markup off: paths and values the user gave ("scans [patient 1]", "[/y]") are printed as written
console = Console(soft_wrap=True, markup=False, highlight=False)


def tagged(tag: str, style: str, text: object) -> None:
    """One line, ``tag`` coloured, ``text`` exactly as given."""
    console.print(Text.assemble((tag, style), " ", str(text)))


@app.callback()
def _root() -> None:
    """M4oE: one segmentation model across imaging modalities."""
    from ..memory import keep_freed_memory

    keep_freed_memory()  # CPU forwards stop paying a page fault per 4 KiB of activations


def overrides_option() -> Any:
    """The ``--set SECTION.KEY=VALUE`` option of every command that reads an experiment YAML."""
    return typer.Option(
        None, "--set", help="Change a config value, SECTION.KEY=VALUE (YAML value); repeat it: --set train.lr=0.01"
    )


def split_words(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def load_config(config: Path, overrides: list[str] | None, epochs: int | None = None,
                pretrain_epochs: int | None = None):  # fmt: skip
    """The experiment of ``config`` with the ``--set`` words applied (``--epochs N`` is ``--set train.epochs=N``)."""
    from ..config import load_experiment

    words = list(overrides or ())
    if epochs is not None:
        words.append(f"train.epochs={epochs}")
    if pretrain_epochs is not None:
        words.append(f"train.pretrain_epochs={pretrain_epochs}")
    return load_experiment(config, words)


DEBUG = False  # --debug: errors keep their traceback


def fail(err: Exception) -> None:
    if DEBUG:
        raise err
    tagged("error:", "red", err)
    raise typer.Exit(1) from err


def main() -> None:
    """Entry point: errors are one line naming what is wrong; ``--debug`` (anywhere) shows the traceback."""
    import sys

    global DEBUG
    DEBUG = "--debug" in sys.argv[1:]
    if DEBUG:
        sys.argv.remove("--debug")
    from . import commands  # noqa: F401  (registers the commands on the app)

    try:
        app()
    except Exception as err:  # anything a command did not turn into a message itself
        if DEBUG:
            raise
        tagged("error:", "red", one_line(err))
        sys.exit(1)


def one_line(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}; check that the path exists, has the right kind and is writable"
    text = " ".join(str(err).split()) or type(err).__name__
    if type(err).__module__.startswith("m4oe") or isinstance(err, ValueError):
        return text  # m4oe's own errors and value checks already say what is wrong and where
    return f"{type(err).__name__}: {text} (unexpected: run again with --debug for the traceback)"
