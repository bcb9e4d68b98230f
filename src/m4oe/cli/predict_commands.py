"""``m4oe predict``, ``evaluate``, ``overlay`` and ``experts``."""

from __future__ import annotations

from pathlib import Path

import typer

from .base import app, console, fail, tagged


def _angles(text: str | None) -> tuple[float, ...]:
    """``--tta-rotate``'s comma-separated angles; anything else is a PredictError naming the option."""
    from ..infer.predict import PredictError, check_rotations

    if not text:
        return ()
    try:
        return check_rotations([float(word) for word in text.split(",")])
    except ValueError as err:  # a word that is not a number, or an angle out of range (PredictError)
        detail = err if isinstance(err, PredictError) else "give angles in degrees separated by commas, e.g. 10,20"
        raise PredictError(f"--tta-rotate {text!r}: {detail}") from None


@app.command()
def predict(
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="Model bundle folder (e.g. RUN/best); give several (-m A -m B) for an ensemble."
    ),
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
    statistics: bool = typer.Option(
        False,
        help="Also write per-structure volume (ml), intensity, bounding box and border flags "
        "(CASE_statistics.json, statistics.csv).",
    ),
    uncertainty: bool = typer.Option(
        False,
        help="Also write per-voxel entropy and disagreement maps (CASE_entropy/_disagreement.nii.gz; with "
        "one mixture-of-experts model, one more pass per expert).",
    ),
    dicom_seg: bool = typer.Option(
        False, help="For DICOM series in: also a DICOM-SEG referencing the series (CASE_seg.dcm; m4oe[dicom])."
    ),
    routing: str = typer.Option(None, help="Override routing: hard (one expert: faster), soft, uniform."),
    batch_size: int = typer.Option(None, help="Slices per forward pass (default: 16 on a GPU, 8 on a CPU)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    precision: str = typer.Option(
        "auto", help="fp32, bf16, or auto: bf16 on a GPU, fp32 on a CPU (the one meaning of auto, as in training)."
    ),
    engine: str = typer.Option("torch", help="torch, or onnx: the model's slices through onnxruntime (CPU, fp32)."),
    onnx: Path = typer.Option(
        None, help="With --engine onnx: a file of m4oe export for this request (default: exported for it on the fly)."
    ),
    orientation: str = typer.Option(
        "auto",
        help="For a dataset whose files needed a flip: auto (the way the model is surer of), dataset (flip "
        "as its files), header (trust the input's header).",
    ),
    strict: bool = typer.Option(
        False,
        help="Refuse an input whose intensities look unlike the training scans (units, modality) instead of warning.",
    ),
) -> None:
    """Segment volumes; label maps keep the input's spacing, origin and direction."""
    from ..bundle import BundleError, load_bundle
    from ..infer.ensemble import EnsemblePredictor
    from ..infer.files import collect_inputs, predict_paths
    from ..infer.predict import PredictError, Predictor, cpu_has_bf16

    try:
        rotations = _angles(tta_rotate)
        members = [
            Predictor(load_bundle(path), device, batch_size, tta=tta, keep_largest=keep_largest, routing=routing,
                      precision=precision, postprocess=postprocess, rotations=rotations, engine=engine, onnx=onnx,
                      orientation=orientation, strict=strict)
            for path in model
        ]  # fmt: skip
        predictor = members[0] if len(members) == 1 else EnsemblePredictor(members)
        largest_only = predictor.resolve(dataset, modality).largest_only
        report = predict_paths(predictor, collect_inputs(inputs), out, dataset, modality, probabilities,
                               overwrite=overwrite, statistics=statistics, dicom_seg=dicom_seg,
                               uncertainty=uncertainty)  # fmt: skip
    except (BundleError, PredictError) as err:
        fail(err)
    if largest_only:
        console.print(f"largest connected component only: {', '.join(largest_only)}")
    if precision == "auto" and predictor.device.type == "cpu" and cpu_has_bf16():
        console.print("hint: this CPU computes bf16 natively; --precision bf16 predicts about 2x faster here "
                      "(label maps agreed on at least 99.9 % of voxels in docs/decisions.md)")  # fmt: skip
    for path, weights in report.experts.items():
        if len(weights) > 1 and modality is None:  # a mixture, not the input's modality (docs/results.md, routing)
            detail = ", ".join(f"{m} {w:.2f}" for m, w in weights.items())
            console.print(f"{Path(path).name}: mean gate weight per expert {detail}")
    for path, text in report.warnings:
        tagged("warning", "yellow", f"{path}: {text}")
    for path, reason in report.failed:
        tagged("skipped", "red", f"{path}: {reason}")
    console.print(f"{len(report.written)} label maps written to {out}")
    if report.statistics is not None:
        console.print(f"statistics per structure: {report.statistics} (and CASE_statistics.json per case)")
    if report.failed:
        raise typer.Exit(1)


@app.command("export")
def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder."),
    out: Path = typer.Option(..., "--output", "-o", help="ONNX file to write."),
    dataset: str = typer.Option(None, help="The label set (and dataset embedding) the file serves."),
    modality: str = typer.Option(None, help="The expert (with --routing hard: the only one exported)."),
    routing: str = typer.Option(None, help="soft (the gate; default), hard (one expert: faster) or uniform."),
) -> None:
    """Export a bundle for one request to ONNX (image -> logits), checked against PyTorch."""
    from ..bundle import BundleError, load_bundle
    from ..infer.onnx import export_onnx
    from ..infer.predict import PredictError

    if out.suffix != ".onnx":
        fail(PredictError(f"-o {out}: give a file name ending in .onnx"))
    try:
        done = export_onnx(load_bundle(model), out, dataset, modality, routing)
    except (BundleError, PredictError) as err:
        fail(err)
    meta = done["meta"]
    console.print(f"written {out} ({meta['routing']} routing, dataset {meta['dataset']}, expert {meta['modality']}) "
                  f"in {done['seconds']:.1f} s; largest |logit difference| against PyTorch on random slices: "
                  f"{done['max_abs_diff']:.2e}")  # fmt: skip


@app.command()
def ensemble(
    folders: list[Path] = typer.Argument(..., help="Folders of CASE_probabilities.npz (predict --probabilities)."),
    out: Path = typer.Option(..., "--output", "-o", help="Folder for the ensemble's label maps."),
    probabilities: bool = typer.Option(False, help="Also write the mean probabilities (CASE_probabilities.npz)."),
) -> None:
    """Label maps of the mean softmax of saved predictions: what predict -m A -m B gives."""
    from ..infer.ensemble import ensemble_folders
    from ..infer.predict import PredictError

    try:
        written = ensemble_folders(folders, out, probabilities)
    except (PredictError, OSError, KeyError) as err:
        fail(err)
    console.print(f"{len(written)} label maps of the ensemble of {len(folders)} written to {out}")


@app.command("statistics")
def statistics_command(
    image: Path = typer.Option(..., "--image", "-i", help="Image file (or DICOM series folder), or folder of images."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Label map file, or a folder of label maps."),
    out: Path = typer.Option(..., "--output", "-o", help="Folder for CASE_statistics.json and statistics.csv."),
    names: Path = typer.Option(None, "--names", help="dataset.json naming the labels (default: label_N)."),
) -> None:
    """Volume (ml), intensity, bounding box and border flags per structure of existing label maps."""
    from ..data.io import ImageReadError
    from ..eval.evaluate import EvaluationError, read_labels_json
    from ..eval.statistics import StatisticsError, statistics_files
    from ..files import OutputError

    try:
        classes = read_labels_json(names) if names else None
        written = statistics_files(image, labels, out, classes)
    except (StatisticsError, EvaluationError, ImageReadError, OutputError) as err:
        fail(err)
    console.print(f"statistics of {len(written)} label map(s) written to {out / 'statistics.csv'}")


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
    from ..eval.evaluate import EvaluationError, evaluate_folders, markdown_table

    try:
        summary = evaluate_folders(gt, pred, labels, out, nsd_tolerance, workers)
    except EvaluationError as err:
        fail(err)
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
    from ..data.io import ImageReadError
    from ..eval.evaluate import read_labels_json
    from ..viz.overlay import overlay_files

    try:
        names = read_labels_json(labels) if labels else None
        path = overlay_files(image, out, gt, pred, names)
    except (ImageReadError, ValueError) as err:
        fail(err)
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
    from ..bundle import BundleError, load_bundle
    from ..data.io import ImageReadError
    from ..infer.predict import PredictError, Predictor
    from ..viz.experts import render_experts

    try:
        predictor = Predictor(load_bundle(model), device)
        table = render_experts(predictor, image, out, dataset, modality)
    except (BundleError, PredictError, ImageReadError, ValueError) as err:
        fail(err)
    weights = ", ".join(f"{m} {w:.3f}" for m, w in zip(predictor.model.modalities, table["all blocks"], strict=True))
    console.print(f"mean gate weight over all blocks: {weights}; written {out / 'experts.png'}")


@app.command()
def routing(
    model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder."),
    cache: Path = typer.Option(..., "--cache", help="Slice cache with the cases to score (m4oe prepare)."),
    out: Path = typer.Option(None, "--output", "-o", help="routing.json to write (routing.md beside it)."),
    split: str = typer.Option("val", help="The cache's cases to use: val, train or all."),
    batch_size: int = typer.Option(32, help="Slices per forward pass."),
    device: str = typer.Option(None, help="cpu or cuda."),
) -> None:
    """Do the experts specialise by modality? Gate weights per block and modality, a specialisation
    figure (0: one mixture for all, 1: an expert per modality), and Dice under soft, hard and uniform routing."""
    from ..bundle import BundleError, check_segmentation_bundle, load_bundle
    from ..data.datasets import DataError
    from ..data.loader import SliceCache
    from ..devices import resolve_device
    from ..eval.routing import markdown, routing_report
    from ..files import write_json, write_text

    try:
        if split not in ("val", "train", "all"):
            raise ValueError(f"--split {split!r}: use val, train or all")
        if out is not None and (out.suffix.lower() != ".json" or out.is_dir()):
            raise ValueError(f"-o {out}: give a file name ending in .json (routing.md goes beside it)")
        bundle = load_bundle(model)
        check_segmentation_bundle(bundle, "--model")
        target = resolve_device(device)
        report = routing_report(bundle.to(target).eval(), SliceCache(cache), target, batch_size, split)
    except (BundleError, DataError, ValueError) as err:
        fail(err)
    text = markdown(report)
    console.print(text)
    if out is not None:
        write_json(out, report, indent=2)
        write_text(out.with_suffix(".md"), text)
        console.print(f"written {out} and {out.with_suffix('.md')}")
