"""``m4oe info`` and ``m4oe prepare``."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .base import app, console, overrides_option, split_words, tagged


@app.command()
def info(
    preset: str = typer.Option("m4oe-t", help="Model preset (m4oe-t, m4oe-convnext-s, ...: see the README)."),
    modalities: str = typer.Option("CT,MRI", help="Comma-separated modality names (one expert each)."),
    num_classes: int = typer.Option(14, help="Size of the union label vocabulary, background included."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters (total, experts, gates, head) and forward GFLOPs per slice of a preset."""
    from ..config import ConfigError
    from ..model import model_info

    try:
        result = model_info(preset, split_words(modalities), num_classes=num_classes)
    except (ConfigError, ValueError) as err:
        tagged("error:", "red", err)
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


@app.command()
def prepare(
    config: Path = typer.Argument(..., help="Experiment YAML (datasets, model)."),
    out: Path = typer.Option(None, "--out", "-o", help="Cache folder to write."),
    verify_only: bool = typer.Option(False, "--verify-only", help="Only check the data; write nothing."),
    img_size: int = typer.Option(None, help="Slice size (default: the config's model input size)."),
    storage: str = typer.Option("float16", help="float16, or uint8 (4x smaller than float32, per-slice affine)."),
    workers: int = typer.Option(2, help="Worker processes."),
    force: bool = typer.Option(False, help="Rebuild even if the cache is up to date."),
    overrides: list[str] = overrides_option(),
) -> None:
    """Check datasets (all problems listed at once) and write the slice cache."""
    from ..config import ConfigError, load_experiment
    from ..data.datasets import DataError
    from ..data.prepare import check
    from ..data.prepare import prepare as run_prepare

    try:
        experiment = load_experiment(config, overrides or ())
        if verify_only:
            sources, _ = check(experiment, workers=workers)
            cases = sum(len(s.cases) for s in sources)
            tagged("ok:", "green", f"{cases} cases in {len(sources)} datasets passed the integrity check")
            return
        if out is None:
            raise ConfigError("give --out CACHE_DIR (or --verify-only)")
        result = run_prepare(experiment, out, img_size=img_size, storage=storage, workers=workers, force=force)
    except (ConfigError, DataError) as err:
        tagged("error:", "red", err)
        raise typer.Exit(1) from err
    state = "up to date" if result.up_to_date else f"written in {result.seconds:.1f} s"
    console.print(
        f"cache {result.path}: {result.num_slices} slices from {result.num_cases} cases, "
        f"{result.size_bytes / 2**20:.1f} MiB ({state})",
    )
    for warning in result.warnings:
        tagged("warning:", "yellow", warning)
