"""``m4oe pretrain``, ``m4oe train`` and ``m4oe add-modality``."""

from __future__ import annotations

from pathlib import Path

import typer

from .base import app, console, fail, load_config, overrides_option


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    cache: Path = typer.Option(None, help="Slice cache (default: cache/<config name>; built if needed)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    epochs: int = typer.Option(None, help="Override train.pretrain_epochs."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    overrides: list[str] = overrides_option(),
) -> None:
    """Phase 1: MAE pre-training of each modality's expert (images only; labels not needed)."""
    from ..config import ConfigError
    from ..data.datasets import DataError
    from ..train.loop import TrainingDiverged
    from ..train.pretrain import run_pretrain

    try:
        experiment = load_config(config, overrides, pretrain_epochs=epochs)
        history = run_pretrain(experiment, out, cache, resume=resume, device=device)
    except (ConfigError, DataError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        fail(err)
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
    overrides: list[str] = overrides_option(),
) -> None:
    """Phase 2: gated end-to-end fine-tuning (from scratch without --init); baselines by config."""
    from ..bundle import BundleError
    from ..config import ConfigError
    from ..data.datasets import DataError
    from ..train.finetune import run_train
    from ..train.loop import TrainingDiverged

    try:
        experiment = load_config(config, overrides, epochs=epochs)
        histories = run_train(experiment, out, cache, init=init, resume=resume, device=device)
    except (ConfigError, DataError, BundleError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        fail(err)
    for name, history in histories.items():
        dice = [r["val_dice"] for r in history.rows if "val_dice" in r]
        where = out / name if name != "all" else out
        if dice:
            summary = f"best validation Dice {max(dice):.4f} (bundle {where / 'best'}), last bundle {where / 'last'}"
        else:
            summary = f"no validation; last bundle {where / 'last'}"
        console.print(f"{name}: {summary}")


@app.command("add-modality")
def add_modality(
    model: Path = typer.Option(..., "--model", "-m", help="Trained model bundle."),
    config: Path = typer.Option(..., "--config", "-c", help="YAML with the new modality's dataset(s)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    freeze_old: bool = typer.Option(
        True, "--freeze-old/--full", help="Train only the new expert, gate row and head rows (or everything)."
    ),
    pretrain: bool = typer.Option(False, help="Start the new expert from MAE pre-training on the new data."),
    cache: Path = typer.Option(None, help="Slice cache of the config (default: cache/<config name>)."),
    epochs: int = typer.Option(None, help="Override train.epochs."),
    device: str = typer.Option(None, help="cpu or cuda."),
    overrides: list[str] = overrides_option(),
) -> None:
    """Add one modality expert (and the new labels) to a trained model, then train it."""
    from ..bundle import BundleError
    from ..config import ConfigError
    from ..data.datasets import DataError
    from ..train.add_modality import run_add_modality

    mode = "freeze_old" if freeze_old else "full"
    try:
        experiment = load_config(config, overrides, epochs=epochs)
        history, info = run_add_modality(model, experiment, out, cache, mode, pretrain, device)
    except (ConfigError, DataError, BundleError, ValueError) as err:
        fail(err)
    added = info["parameters_added"]
    console.print(
        f"added expert {info['modality']} for {info['datasets']}: {added['total']:,} parameters "
        f"(expert {added['expert']:,}, gates {added['gates']:,}, head {added['head']:,}); mode {mode}",
    )
    dice = [r["val_dice"] for r in history.rows if "val_dice" in r]
    console.print(f"best validation Dice {max(dice):.4f}" if dice else "no validation")
    console.print(f"bundles in {out / 'best'} and {out / 'last'}")
