"""The ``m4oe`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="M4oE: one segmentation model across imaging modalities.", no_args_is_help=True)
# markup off: paths and values the user gave ("scans [patient 1]", "[/y]") are printed as written
console = Console(soft_wrap=True, markup=False, highlight=False)


def _tagged(tag: str, style: str, text: object) -> None:
    """One line, ``tag`` coloured, ``text`` exactly as given."""
    console.print(Text.assemble((tag, style), " ", str(text)))


@app.callback()
def _root() -> None:
    """M4oE: one segmentation model across imaging modalities."""
    from .memory import keep_freed_memory

    keep_freed_memory()  # CPU forwards stop paying a page fault per 4 KiB of activations


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def info(
    preset: str = typer.Option("m4oe-t", help="Model preset (m4oe-t, m4oe-convnext-s, ...: see the README)."),
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
        _tagged("error:", "red", err)
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
    overrides: list[str] = typer.Option(
        None, "--set", help="Change a config value, SECTION.KEY=VALUE (YAML value); repeat it: --set train.lr=0.01"
    ),
) -> None:
    """Check datasets (all problems listed at once) and write the slice cache."""
    from .config import ConfigError, load_experiment
    from .data.datasets import DataError
    from .data.prepare import check
    from .data.prepare import prepare as run_prepare

    try:
        experiment = load_experiment(config, overrides or ())
        if verify_only:
            sources, _ = check(experiment, workers=workers)
            cases = sum(len(s.cases) for s in sources)
            _tagged("ok:", "green", f"{cases} cases in {len(sources)} datasets passed the integrity check")
            return
        if out is None:
            raise ConfigError("give --out CACHE_DIR (or --verify-only)")
        result = run_prepare(experiment, out, img_size=img_size, storage=storage, workers=workers, force=force)
    except (ConfigError, DataError) as err:
        _tagged("error:", "red", err)
        raise typer.Exit(1) from err
    state = "up to date" if result.up_to_date else f"written in {result.seconds:.1f} s"
    console.print(
        f"cache {result.path}: {result.num_slices} slices from {result.num_cases} cases, "
        f"{result.size_bytes / 2**20:.1f} MiB ({state})",
    )
    for warning in result.warnings:
        _tagged("warning:", "yellow", warning)


def _load(config: Path, overrides: list[str] | None, epochs: int | None = None, pretrain_epochs: int | None = None):
    """The experiment of ``config`` with the ``--set`` words applied (``--epochs N`` is ``--set train.epochs=N``)."""
    from .config import load_experiment

    words = list(overrides or ())
    if epochs is not None:
        words.append(f"train.epochs={epochs}")
    if pretrain_epochs is not None:
        words.append(f"train.pretrain_epochs={pretrain_epochs}")
    return load_experiment(config, words)


DEBUG = False  # --debug: errors keep their traceback


def _fail(err: Exception) -> None:
    if DEBUG:
        raise err
    _tagged("error:", "red", err)
    raise typer.Exit(1) from err


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder."),
    cache: Path = typer.Option(None, help="Slice cache (default: cache/<config name>; built if needed)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    epochs: int = typer.Option(None, help="Override train.pretrain_epochs."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    overrides: list[str] = typer.Option(
        None, "--set", help="Change a config value, SECTION.KEY=VALUE (YAML value); repeat it: --set train.lr=0.01"
    ),
) -> None:
    """Phase 1: MAE pre-training of each modality's expert (images only; labels not needed)."""
    from .config import ConfigError
    from .data.datasets import DataError
    from .train.loop import TrainingDiverged
    from .train.pretrain import run_pretrain

    try:
        experiment = _load(config, overrides, pretrain_epochs=epochs)
        history = run_pretrain(experiment, out, cache, resume=resume, device=device)
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
    overrides: list[str] = typer.Option(
        None, "--set", help="Change a config value, SECTION.KEY=VALUE (YAML value); repeat it: --set train.lr=0.01"
    ),
) -> None:
    """Phase 2: gated end-to-end fine-tuning (from scratch without --init); baselines by config."""
    from .bundle import BundleError
    from .config import ConfigError
    from .data.datasets import DataError
    from .train.finetune import run_train
    from .train.loop import TrainingDiverged

    try:
        experiment = _load(config, overrides, epochs=epochs)
        histories = run_train(experiment, out, cache, init=init, resume=resume, device=device)
    except (ConfigError, DataError, BundleError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        _fail(err)
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
    overrides: list[str] = typer.Option(
        None, "--set", help="Change a config value, SECTION.KEY=VALUE (YAML value); repeat it: --set train.lr=0.01"
    ),
) -> None:
    """Add one modality expert (and the new labels) to a trained model, then train it."""
    from .bundle import BundleError
    from .config import ConfigError
    from .data.datasets import DataError
    from .train.add_modality import run_add_modality

    mode = "freeze_old" if freeze_old else "full"
    try:
        experiment = _load(config, overrides, epochs=epochs)
        history, info = run_add_modality(model, experiment, out, cache, mode, pretrain, device)
    except (ConfigError, DataError, BundleError, ValueError) as err:
        _fail(err)
    added = info["parameters_added"]
    console.print(
        f"added expert {info['modality']} for {info['datasets']}: {added['total']:,} parameters "
        f"(expert {added['expert']:,}, gates {added['gates']:,}, head {added['head']:,}); mode {mode}",
    )
    dice = [r["val_dice"] for r in history.rows if "val_dice" in r]
    console.print(f"best validation Dice {max(dice):.4f}" if dice else "no validation")
    console.print(f"bundles in {out / 'best'} and {out / 'last'}")


def _angles(text: str | None) -> tuple[float, ...]:
    """``--tta-rotate``'s comma-separated angles; anything else is a PredictError naming the option."""
    from .infer.predict import PredictError, check_rotations

    if not text:
        return ()
    try:
        return check_rotations([float(word) for word in text.split(",")])
    except ValueError as err:  # a word that is not a number, or an angle out of range (PredictError)
        detail = err if isinstance(err, PredictError) else "give angles in degrees separated by commas, e.g. 10,20"
        raise PredictError(f"--tta-rotate {text!r}: {detail}") from None


@app.command()
def predict(
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (e.g. RUN/best)."),
    inputs: Path = typer.Option(..., "--input", "-i", help="Image file, folder of images, or DICOM series folder."),
    out: Path = typer.Option(..., "--output", "-o", help="Folder for the label maps (NIfTI)."),
    dataset: str = typer.Option(None, help="Label set and normalisation of this training dataset."),
    modality: str = typer.Option(None, help="Expert of the input; without it the gate decides."),
    tta: bool = typer.Option(False, help="Average with the left-right mirrored prediction."),
    tta_rotate: str = typer.Option(
        None, help="Also average over in-plane rotations by + and - each angle in degrees, e.g. 10,20 (5 views)."
    ),
    keep_largest: bool = typer.Option(False, help="Keep the largest connected component of every label."),
    postprocess: bool = typer.Option(
        True, help="With --dataset: keep the largest component of the labels where training's validation chose it."
    ),
    probabilities: bool = typer.Option(
        False, help="Also write class probabilities (CASE_probabilities.npz: the label map's voxel order, geometry)."
    ),
    overwrite: bool = typer.Option(False, help="Replace label maps (and probabilities) already in the -o folder."),
    routing: str = typer.Option(None, help="Override routing: hard (one expert: faster), soft, uniform."),
    batch_size: int = typer.Option(None, help="Slices per forward pass (default: 16 on a GPU, 8 on a CPU)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    precision: str = typer.Option(
        "auto", help="fp32, bf16, or auto: bf16 on a GPU or a CPU with bf16 instructions, else fp32."
    ),
) -> None:
    """Segment volumes; label maps keep the input's spacing, origin and direction."""
    from .bundle import BundleError, load_bundle
    from .infer.files import collect_inputs, predict_paths
    from .infer.predict import PredictError, Predictor

    try:
        rotations = _angles(tta_rotate)
        bundle = load_bundle(model)
        predictor = Predictor(
            bundle, device, batch_size, tta=tta, keep_largest=keep_largest, routing=routing, precision=precision,
            postprocess=postprocess, rotations=rotations,
        )  # fmt: skip
        largest_only = predictor.resolve(dataset, modality).largest_only
        report = predict_paths(predictor, collect_inputs(inputs), out, dataset, modality, probabilities,
                               overwrite=overwrite)  # fmt: skip
    except (BundleError, PredictError) as err:
        _fail(err)
    if largest_only:
        console.print(f"largest connected component only: {', '.join(largest_only)}")
    for path, weights in report.experts.items():
        if len(weights) > 1 and modality is None:
            top = max(weights, key=weights.get)
            detail = ", ".join(f"{m} {w:.2f}" for m, w in weights.items())
            console.print(f"{Path(path).name}: expert {top} dominated (mean gate weight {detail})")
    for path, text in report.warnings:
        _tagged("warning", "yellow", f"{path}: {text}")
    for path, reason in report.failed:
        _tagged("skipped", "red", f"{path}: {reason}")
    console.print(f"{len(report.written)} label maps written to {out}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    gt: Path = typer.Option(..., "--gt", help="Folder of reference label maps."),
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted label maps (same file names)."),
    labels: Path = typer.Option(..., "--labels", help="dataset.json naming the labels."),
    out: Path = typer.Option(Path("summary.json"), "--output", "-o", help="summary.json to write."),
    nsd_tolerance: float = typer.Option(2.0, help="Surface Dice tolerance in mm."),
    workers: int = typer.Option(2, help="Worker processes."),
) -> None:
    """Dice, IoU, HD95 (mm) and surface Dice per case and label: summary.json/.csv/.md + box plot."""
    from .eval.evaluate import EvaluationError, evaluate_folders, markdown_table

    try:
        summary = evaluate_folders(gt, pred, labels, out, nsd_tolerance, workers)
    except EvaluationError as err:
        _fail(err)
    console.print(markdown_table(summary))
    console.print(f"written {out} (+ .csv, .md, _dice_boxplot.png)")


@app.command()
def overlay(
    image: Path = typer.Option(..., "--image", "-i", help="Image volume."),
    out: Path = typer.Option(..., "--output", "-o", help="PNG to write."),
    gt: Path = typer.Option(None, "--gt", help="Reference label map."),
    pred: Path = typer.Option(None, "--pred", help="Predicted label map."),
    labels: Path = typer.Option(None, "--labels", help="dataset.json to name the labels in a legend."),
) -> None:
    """Image, reference and prediction through the organ centre: axial, coronal, sagittal."""
    from .data.io import ImageReadError
    from .eval.evaluate import read_labels_json
    from .viz.overlay import overlay_files

    try:
        names = read_labels_json(labels) if labels else None
        path = overlay_files(image, out, gt, pred, names)
    except (ImageReadError, ValueError) as err:
        _fail(err)
    console.print(f"written {path}")


@app.command()
def experts(
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder."),
    image: Path = typer.Option(..., "--input", "-i", help="Image volume or DICOM series folder."),
    out: Path = typer.Option(..., "--output", "-o", help="Folder for experts.png / .csv / .md."),
    dataset: str = typer.Option(None, help="Label set and normalisation of this training dataset."),
    modality: str = typer.Option(None, help="Modality of the scan (for normalisation; the gate routes)."),
    device: str = typer.Option(None, help="cpu or cuda."),
) -> None:
    """Maps of the expert the gate favours per token and block, and mean gate weight per expert."""
    from .bundle import BundleError, load_bundle
    from .data.io import ImageReadError
    from .infer.predict import PredictError, Predictor
    from .viz.experts import render_experts

    try:
        predictor = Predictor(load_bundle(model), device)
        table = render_experts(predictor, image, out, dataset, modality)
    except (BundleError, PredictError, ImageReadError, ValueError) as err:
        _fail(err)
    weights = ", ".join(f"{m} {w:.3f}" for m, w in zip(predictor.model.modalities, table["all blocks"], strict=True))
    console.print(f"mean gate weight over all blocks: {weights}; written {out / 'experts.png'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), "--output", "-o", help="Folder for everything the demo makes."),
    quick: bool = typer.Option(False, help="A much shorter run (seconds; for CI)."),
    device: str = typer.Option(None, help="cpu or cuda."),
) -> None:
    """The whole path on shipped data: prepare, pre-train, train, predict, evaluate, overlay, experts."""
    from .demo.run import run_demo

    console.print(
        "m4oe demo: a small m4oe-convnext-s model trained for about three minutes on 4 MRI volumes "
        "and 1 CT shipped with the package. It shows the workflow; its Dice is not a benchmark result.",
    )
    result = run_demo(out, quick=quick, device=device, say=console.print)
    table = Table(title=f"held-out MRI case, Dice ({result.seconds:.0f} s in all)")
    for name in result.dice:
        table.add_column(name, justify="right")
    table.add_column("mean", justify="right")
    table.add_row(*(f"{v:.3f}" for v in result.dice.values()), f"{result.mean_dice:.3f}")
    console.print(table)
    console.print(f"results in {result.out}/: train/ (bundles, metrics.csv, curve.png), predictions/, "
                  f"evaluation/summary.json, {result.overlay.name}, experts/experts.png")  # fmt: skip


@app.command()
def bench(
    preset: str = typer.Option("m4oe-t", help="Comma-separated presets."),
    routing: str = typer.Option("soft", help="Comma-separated routing modes: soft, hard, uniform."),
    precision: str = typer.Option("bf16", help="Comma-separated: fp32, bf16."),
    batch: int = typer.Option(36, help="Training batch."),
    infer_batch: int = typer.Option(64, help="Inference batch."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    compile_mode: str = typer.Option(None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)."),
    attention: str = typer.Option("sdpa", help="Comma-separated window attention kernels: sdpa, explicit."),
    hard_kernel: str = typer.Option(
        "auto", help="Comma-separated kernels for hard routing of mixed batches: grouped, onehot, auto."
    ),
    experts: int = typer.Option(3, help="Number of modality experts."),
    steps: int = typer.Option(20, help="Timed steps per measurement."),
    warmup: int = typer.Option(5, help="Untimed steps first."),
    img_size: int = typer.Option(None, help="Override the preset's input size."),
    peak_tflops: float = typer.Option(None, help="The device's peak TFLOP/s, for the utilisation column."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    quick: bool = typer.Option(False, help="Tiny model, 2 steps: checks the harness (CI)."),
    train: bool = typer.Option(True, "--train/--no-train", help="Measure training (else inference only)."),
    pure_bf16: bool = typer.Option(False, help="Inference with the model cast to bf16 (no autocast)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON."),
) -> None:
    """Training/inference slices/s, peak memory, TFLOP/s; fused M4oE layer vs loop reference."""
    from dataclasses import replace

    from .bench import HARD_KERNELS, BenchConfig, bench_model, bench_moe_layer, environment
    from .config.choices import ATTENTION_KERNELS
    from .files import write_json

    base = BenchConfig(batch=batch, infer_batch=infer_batch, compile=compile, compile_mode=compile_mode,
                       experts=experts, steps=steps,
                       warmup=warmup, img_size=img_size, peak_tflops=peak_tflops, train=train,
                       pure_bf16_infer=pure_bf16)  # fmt: skip
    if device:
        base = replace(base, device=device)
    if quick:
        base = replace(base, batch=4, infer_batch=4, steps=2, warmup=1)
        preset = "tiny"
    for name, values, allowed in (("attention kernel", attention, ATTENTION_KERNELS),
                                  ("hard kernel", hard_kernel, HARD_KERNELS)):  # fmt: skip
        unknown = [v for v in _split(values) if v not in allowed]
        if unknown:
            _fail(ValueError(f"{name} must be one of {', '.join(allowed)}, got {', '.join(unknown)}"))
    rows = []
    for p in _split(preset):
        for r in _split(routing):
            for prec in _split(precision):
                for kernel in _split(attention):
                    for hard in _split(hard_kernel) if r == "hard" else ["auto"]:
                        config = replace(base, preset=p, routing=r, precision=prec, attention=kernel, hard_kernel=hard)
                        rows.append(bench_model(config))
    layer = bench_moe_layer(replace(base, precision=_split(precision)[0]), tokens=4096 if quick else None)
    table = Table(title=f"m4oe bench on {environment(base.device).get('gpu', 'CPU')} (torch {torch_version()})")
    for col in ("preset", "routing", "precision", "attention", "compile", "train sl/s", "train GiB", "train TFLOP/s",
                "infer sl/s", "infer GiB", "infer TFLOP/s"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in rows:
        precision = "bf16 (pure)" if row["pure_bf16_infer"] else row["precision"]
        compiled = (row["compile_mode"] or "yes") if row["compile"] else "no"
        routing = f"hard ({row['hard_kernel_used']})" if row["routing"] == "hard" else row["routing"]
        cells = [row["preset"], routing, precision, row["attention"], compiled]
        for mode in ("train", "infer"):
            if f"{mode}_slices_per_s" not in row:
                cells += ["-", "-", "-"]
                continue
            cells += [
                f"{row[mode + '_slices_per_s']:.1f}",
                str(row[mode + "_peak_gib"]),
                f"{row[mode + '_tflops']:.3g}",
            ]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"M4oE layer ({layer['tokens']} tokens x {layer['dim']}, {layer['experts']} experts, fwd+bwd, "
        f"{layer['precision']}): fused {layer['fused_ms']} ms, loop reference {layer['loop_ms']} ms, "
        f"speed-up {layer['speedup']}x"
    )
    payload = {"environment": environment(base.device), "models": rows, "moe_layer": layer}
    typer.echo(json.dumps(payload))
    if json_out:
        write_json(json_out, payload)


def torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    """Entry point: errors are one line naming what is wrong; ``--debug`` (anywhere) shows the traceback."""
    import sys

    global DEBUG
    DEBUG = "--debug" in sys.argv[1:]
    if DEBUG:
        sys.argv.remove("--debug")
    try:
        app()
    except Exception as err:  # anything a command did not turn into a message itself
        if DEBUG:
            raise
        _tagged("error:", "red", _one_line(err))
        sys.exit(1)


def _one_line(err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}; check that the path exists, has the right kind and is writable"
    text = " ".join(str(err).split()) or type(err).__name__
    if type(err).__module__.startswith("m4oe") or isinstance(err, ValueError):
        return text  # m4oe's own errors and value checks already say what is wrong and where
    return f"{type(err).__name__}: {text} (unexpected: run again with --debug for the traceback)"


if __name__ == "__main__":
    main()
