"""The ``m4oe`` command line."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="M4oE: one segmentation model across imaging modalities.", no_args_is_help=True)
console = Console()


@app.callback()
def _root() -> None:
    """M4oE: one segmentation model across imaging modalities."""


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def info(
    preset: str = typer.Option("m4oe-t", help="Model preset: m4oe-t, m4oe-t-lite, swin-unet, tiny."),
    modalities: str = typer.Option("CT,MRI", help="Comma-separated modality names (one expert each)."),
    num_classes: int = typer.Option(14, help="Size of the union label vocabulary, background included."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters (total, experts, gates, head) and forward GFLOPs per slice of a preset."""
    from .config import ConfigError
    from .model import model_info

    try:
        result = model_info(preset, _split(modalities), num_classes=num_classes)
    except (ConfigError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{preset} ({', '.join(result['modalities'])}; {num_classes} classes; {result['img_size']}px)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in result["params"].items():
        table.add_row(f"parameters: {key}", f"{value:,}")
    table.add_row("GFLOPs / slice", f"{result['gflops_per_slice']:.2f}")
    if "gflops_per_slice_hard_routing" in result:
        table.add_row("GFLOPs / slice, hard routing", f"{result['gflops_per_slice_hard_routing']:.2f}")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
