"""The ``m4oe`` command line."""

from __future__ import annotations

import json
from pathlib import Path

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


@app.command()
def prepare(
    config: Path = typer.Argument(..., help="Experiment YAML (datasets, model)."),
    out: Path = typer.Option(None, "--out", "-o", help="Cache folder to write."),
    verify_only: bool = typer.Option(False, "--verify-only", help="Only check the data; write nothing."),
    img_size: int = typer.Option(None, help="Slice size (default: the config's model input size)."),
    storage: str = typer.Option("float16", help="float16, or uint8 (4x smaller than float32, per-slice affine)."),
    workers: int = typer.Option(2, help="Worker processes."),
    force: bool = typer.Option(False, help="Rebuild even if the cache is up to date."),
) -> None:
    """Check datasets (all problems listed at once) and write the slice cache."""
    from .config import ConfigError, load_experiment
    from .data.datasets import DataError
    from .data.prepare import check
    from .data.prepare import prepare as run_prepare

    try:
        experiment = load_experiment(config)
        if verify_only:
            sources, _ = check(experiment, workers=workers)
            cases = sum(len(s.cases) for s in sources)
            console.print(f"[green]ok[/green]: {cases} cases in {len(sources)} datasets passed the integrity check")
            return
        if out is None:
            raise ConfigError("give --out CACHE_DIR (or --verify-only)")
        result = run_prepare(experiment, out, img_size=img_size, storage=storage, workers=workers, force=force)
    except (ConfigError, DataError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(1) from err
    state = "up to date" if result.up_to_date else f"written in {result.seconds:.1f} s"
    console.print(
        f"cache {result.path}: {result.num_slices} slices from {result.num_cases} cases, "
        f"{result.size_bytes / 2**20:.1f} MiB ({state})",
        highlight=False,
    )


def _load(config: Path, epochs: int | None = None, pretrain_epochs: int | None = None):
    from dataclasses import replace

    from .config import load_experiment

    experiment = load_experiment(config)
    train = dict(experiment.train)
    if epochs is not None:
        train["epochs"] = epochs
    if pretrain_epochs is not None:
        train["pretrain_epochs"] = pretrain_epochs
    return replace(experiment, train=train)


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}", highlight=False)
    raise typer.Exit(1) from err


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    cache: Path = typer.Option(None, help="Slice cache (default: cache/<config name>; built if needed)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    epochs: int = typer.Option(None, help="Override train.pretrain_epochs."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Phase 1: MAE pre-training of each modality's expert (images only; labels not needed)."""
    from .config import ConfigError
    from .data.datasets import DataError
    from .train.loop import TrainingDiverged
    from .train.pretrain import run_pretrain

    try:
        history = run_pretrain(_load(config, pretrain_epochs=epochs), out, cache, resume=resume, device=device)
    except (ConfigError, DataError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        _fail(err)
    last = history.rows[-1] if history.rows else {}
    console.print(f"pre-training done: loss {last.get('loss', float('nan')):.4f}; bundle in {out / 'last'}")


@app.command()
def train(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    init: Path = typer.Option(None, help="A pretrain run folder: start from its encoder and experts."),
    cache: Path = typer.Option(None, help="Slice cache (default: cache/<config name>; built if needed)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    epochs: int = typer.Option(None, help="Override train.epochs."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
) -> None:
    """Phase 2: gated end-to-end fine-tuning (from scratch without --init); baselines by config."""
    from .bundle import BundleError
    from .config import ConfigError
    from .data.datasets import DataError
    from .train.finetune import run_train
    from .train.loop import TrainingDiverged

    try:
        histories = run_train(_load(config, epochs=epochs), out, cache, init=init, resume=resume, device=device)
    except (ConfigError, DataError, BundleError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        _fail(err)
    for name, history in histories.items():
        dice = [r["val_dice"] for r in history.rows if "val_dice" in r]
        where = out / name if name != "all" else out
        if dice:
            summary = f"best validation Dice {max(dice):.4f} (bundle {where / 'best'}), last bundle {where / 'last'}"
        else:
            summary = f"no validation; last bundle {where / 'last'}"
        console.print(f"{name}: {summary}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
