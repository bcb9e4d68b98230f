"""Predicting folders of files: the inputs (files, folders, DICOM series), the output names and the
rules of the output folder, and the pipeline that reads the next volume and writes the previous result
while the model predicts the current one. The model's side is :class:`m4oe.infer.predict.Predictor`."""

from __future__ import annotations

import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    Volume,
    check_file,
    from_canonical,
    negative_voxel_sizes,
    read_volume,
    strip_image_suffix,
    write_image,
    write_like_nifti,
    write_volume,
)
from ..files import OutputError, atomic_write, check_output_dir, dataset_root, mark_output_dir
from .predict import PredictError, Prediction, Predictor


def output_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case.nii.gz`` (nnU-Net naming); a DICOM folder -> ``folder.nii.gz``."""
    if path.is_dir():
        return f"{path.name}.nii.gz"
    return re.sub(r"_\d{4}$", "", strip_image_suffix(path.name)) + ".nii.gz"


def collect_inputs(path: Path) -> list[Path]:
    """A file, a folder of image files, a DICOM series folder, or a folder of DICOM series folders."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"{path}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES[:-1]))
    if files:
        return files
    if _has_dicom(path):
        return [path]
    series = sorted(p for p in path.iterdir() if p.is_dir() and _has_dicom(p))
    if not series:
        raise PredictError(f"{path}: no images (NIfTI, NRRD, MHA) or DICOM series found")
    return series


def _has_dicom(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


@dataclass
class PredictReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    experts: dict[str, dict[str, float]] = field(default_factory=dict)
    warnings: list[tuple[Path, str]] = field(default_factory=list)
    statistics: Path | None = None  # the run's statistics.csv


def predict_paths(
    predictor: Predictor,
    inputs: list[Path],
    out_dir: Path,
    dataset: str | None = None,
    modality: str | None = None,
    probabilities: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    statistics: bool = False,
    dicom_seg: bool = False,
    uncertainty: bool = False,
) -> PredictReport:
    """Predict every input; a file that fails is reported and skipped, the others are written.

    ``out_dir`` must be new, empty or an earlier m4oe predictions folder; files already there are
    replaced only with ``overwrite`` (all of this is checked before any volume is read).

    Reading (and checking) the next volume and writing the previous result run on two background
    threads while the model predicts the current volume, so that a folder of scans is not bound by
    file I/O (on a GPU the model is the small part). At most one volume is read ahead and one result
    waits to be written, so memory stays that of about three volumes.
    """
    from tqdm.auto import tqdm

    predictor.check_request(dataset, modality)  # a bad request fails before any file is read
    out_dir = Path(out_dir)
    check_output_names(inputs, out_dir)
    check_existing_outputs(inputs, out_dir, Outputs(probabilities, statistics, dicom_seg, uncertainty), overwrite)
    if dicom_seg:
        from .dicom_seg import check_inputs

        check_inputs(inputs)
    mark_output_dir(out_dir, "predictions")
    outcomes: list[str | tuple[Future, dict]] = []  # per input: why it failed, or (its write, expert weights)
    report = PredictReport()
    with ThreadPoolExecutor(1, "m4oe-read") as reader, ThreadPoolExecutor(1, "m4oe-write") as writer:
        loading = reader.submit(_load, inputs[0]) if inputs else None
        writing = None
        for i, path in enumerate(tqdm(inputs, desc="predicting", unit="volume", disable=None if progress else True)):
            current, loading = loading, reader.submit(_load, inputs[i + 1]) if i + 1 < len(inputs) else None
            try:
                volume = current.result()
                result = predictor.predict_volume(volume, dataset, modality, probabilities, uncertainty=uncertainty)
            except PREDICT_FAILURES as err:
                outcomes.append(str(err))
                continue
            if writing is not None:
                wait([writing])  # one result waits behind the one being written, no more
            writing = writer.submit(_write, out_dir / output_name(path), volume, result, statistics,
                                    path if dicom_seg else None)  # fmt: skip
            outcomes.append((writing, result.expert_weights))
            report.warnings += [(path, text) for text in result.warnings]
    for path, outcome in zip(inputs, outcomes, strict=True):
        if isinstance(outcome, str):
            report.failed.append((path, outcome))
            continue
        try:
            report.written.append(outcome[0].result())
            report.experts[str(path)] = outcome[1]
        except PREDICT_FAILURES as err:
            report.failed.append((path, str(err)))
    if statistics and report.written:
        report.statistics = write_run_statistics(out_dir)
    return report


def check_output_names(inputs: list[Path], out_dir: Path) -> None:
    """Refuse inputs whose label maps would overwrite each other (``case_0000.nii.gz``,
    ``case_0001.nii.gz`` and ``case.mha`` all give ``case.nii.gz``), and writing into a folder of
    inputs (the next run would read the label maps back in as images)."""
    targets: dict[str, list[Path]] = {}
    for path in inputs:
        targets.setdefault(output_name(path), []).append(path)
    clashes = {name: paths for name, paths in targets.items() if len(paths) > 1}
    if clashes:
        name, paths = next(iter(clashes.items()))
        raise PredictError(
            f"{len(clashes)} output name(s) would be written twice, e.g. {name} from "
            f"{', '.join(p.name for p in paths)}: predict these inputs into separate folders"
        )
    roots = {root for root in map(dataset_root, inputs) if root is not None}  # their nnU-Net dataset folders
    try:
        check_output_dir(out_dir, "predictions", [*inputs, *roots])
    except OutputError as err:
        raise PredictError(str(err)) from None


@dataclass(frozen=True)
class Outputs:
    """What a prediction writes besides each label map."""

    probabilities: bool = False
    statistics: bool = False
    dicom_seg: bool = False
    uncertainty: bool = False


def output_files(path: Path, out_dir: Path, outputs: Outputs) -> list[Path]:
    """Every file predicting ``path`` into ``out_dir`` may write (the label map as NIfTI or, for a
    sheared direction, MetaImage; then what ``outputs`` asks for)."""
    name = output_name(path)
    files = [out_dir / name, out_dir / name.replace(".nii.gz", ".mha")]
    if outputs.probabilities:
        files.append(probabilities_path(out_dir / name))
    if outputs.statistics:
        files.append(statistics_path(out_dir / name))
    if outputs.dicom_seg:
        files.append(dicom_seg_path(out_dir / name))
    if outputs.uncertainty:
        files += [uncertainty_path(out_dir / n, kind) for n in files[:2] for kind in ("entropy", "disagreement")]
    return files


def check_existing_outputs(inputs: list[Path], out_dir: Path, outputs: Outputs, overwrite: bool) -> None:
    """Refuse to replace files a prediction would write over, unless ``overwrite``."""
    if overwrite:
        return
    existing = [f for p in inputs for f in output_files(p, Path(out_dir), outputs) if f.exists()]
    if existing:
        raise PredictError(
            f"-o {out_dir}: {len(existing)} output file(s) exist already, e.g. {existing[0].name}: pass --overwrite "
            "to replace them, or choose another -o folder"
        )


def probabilities_path(label_path: Path) -> Path:
    """``case.nii.gz`` / ``case.mha`` -> ``case_probabilities.npz``."""
    return label_path.with_name(f"{case_name(label_path)}_probabilities.npz")


def uncertainty_path(label_path: Path, kind: str) -> Path:
    """``case.nii.gz`` -> ``case_entropy.nii.gz`` / ``case_disagreement.nii.gz`` (``.mha`` beside a ``.mha``)."""
    suffix = ".mha" if label_path.suffix == ".mha" else ".nii.gz"
    return label_path.with_name(f"{case_name(label_path)}_{kind}{suffix}")


def dicom_seg_path(label_path: Path) -> Path:
    """``case.nii.gz`` -> ``case_seg.dcm``."""
    return label_path.with_name(f"{case_name(label_path)}_seg.dcm")


def statistics_path(label_path: Path) -> Path:
    """``case.nii.gz`` / ``case.mha`` -> ``case_statistics.json``."""
    return label_path.with_name(f"{case_name(label_path)}_statistics.json")


def case_name(label_path: Path) -> str:
    return strip_image_suffix(label_path.name)


def label_map_target(target: Path, geometry) -> Path:
    """Where a label map on ``geometry`` goes: ``target`` (NIfTI), or beside it as MetaImage for a
    sheared direction (NIfTI stores only rotations: ITK would write another direction)."""
    if geometry.orthonormal():
        return target
    return target.with_name(target.name.replace(".nii.gz", ".mha"))


def write_run_statistics(out_dir: Path) -> Path:
    """``statistics.csv``: a row per case and structure of every ``*_statistics.json`` in ``out_dir``."""
    from ..eval.statistics import csv_rows, read_case, write_run_csv

    rows = []
    for path in sorted(out_dir.glob("*_statistics.json")):
        case = read_case(path)
        rows += csv_rows(case["case"], case["structures"])
    return write_run_csv(out_dir / "statistics.csv", rows)


PREDICT_FAILURES = (ImageReadError, ValueError, RuntimeError, OSError)  # reported per file; other errors stop


def _load(path: Path) -> Volume:
    if not path.is_file():  # a DICOM series folder: nothing for check_file to check
        return read_volume(path)
    with ThreadPoolExecutor(1, "m4oe-check") as pool:
        problems = pool.submit(check_file, path)  # nibabel's pass over the file, beside SimpleITK's
        try:
            volume, read_error = read_volume(path), None
        except PREDICT_FAILURES as err:
            volume, read_error = None, err
        if problems.result():  # its message is the more precise one (truncation, NaN)
            raise ImageReadError("; ".join(problems.result()))
    if read_error is not None:
        raise read_error
    return volume


def _write(target: Path, volume: Volume, result: Prediction, statistics: bool = False,
           dicom_series: Path | None = None) -> Path:  # fmt: skip
    import SimpleITK as sitk

    target = label_map_target(target, volume.geometry)
    dtype = np.uint8 if max(result.label_values) < 256 else np.uint16
    # the label map in the file's own voxel order, once for the file, the statistics and the DICOM-SEG
    label_image = from_canonical(result.labels.astype(dtype), volume.geometry, volume.orientation)
    if target.name.endswith(".nii.gz") and volume.source is not None and negative_voxel_sizes(volume.source):
        # ITK would write positive sizes and a mirrored direction
        write_like_nifti(sitk.GetArrayFromImage(label_image), volume.source, target)
    else:
        write_image(label_image, target)
    if result.probabilities is not None:
        probabilities = in_file_order(result.probabilities, volume.geometry, volume.orientation)
        save_probabilities(probabilities_path(target), probabilities, result.class_names, result.label_values,
                           volume.geometry, result.largest_only)  # fmt: skip
    for kind, values in (result.uncertainty or {}).items():
        write_volume(values, volume.geometry, uncertainty_path(target, kind), volume.orientation)
    if statistics:
        _write_statistics(target, volume, result, label_image)
    if dicom_series is not None:
        from .dicom_seg import write_dicom_seg

        classes = dict(zip(result.label_values, result.class_names, strict=True))
        write_dicom_seg(dicom_series, sitk.GetArrayFromImage(label_image), classes, dicom_seg_path(target))
    return target


def _write_statistics(target: Path, volume: Volume, result: Prediction, labels) -> None:
    """``CASE_statistics.json`` of a prediction, on the label map file's grid (``labels``, the written
    label map's image), as ``m4oe statistics`` computes it."""
    from ..eval.statistics import structure_statistics, write_case

    image = from_canonical(volume.array, volume.geometry, volume.orientation)
    classes = dict(zip(result.label_values, result.class_names, strict=True))
    maps = {k: from_canonical(v, volume.geometry, volume.orientation) for k, v in (result.uncertainty or {}).items()}
    found = structure_statistics(labels, image, classes, fov_edge=result.fov_edge_values, maps=maps)
    write_case(statistics_path(target), case_name(target), found)


# the layout of ``CASE_probabilities.npz``, as docs/prediction.md and the README describe it
PROBABILITY_AXES = "class, z, y, x: the voxel order of the label map file (SimpleITK's GetArrayFromImage)"


def in_file_order(probabilities: np.ndarray, geometry, orientation: str) -> np.ndarray:
    """``[class, z, y, x]`` probabilities from the canonical (LPS) order into the file's own voxel
    order, the order in which the label map written beside them is stored."""
    import SimpleITK as sitk

    def reorder(channel: np.ndarray) -> np.ndarray:
        wide = channel.astype(np.float32) if channel.dtype == np.float16 else channel  # ITK has no float16
        return sitk.GetArrayFromImage(from_canonical(wide, geometry, orientation)).astype(channel.dtype)

    return np.stack([reorder(p) for p in probabilities])


def save_probabilities(path: Path, probabilities: np.ndarray, classes: list[str], values: list[int], geometry,
                       largest_only: list[str]) -> None:  # fmt: skip
    """``CASE_probabilities.npz``: ``[class, z, y, x]`` float16 in the label map file's voxel order, with
    the class names, their label values, the grid, and the classes post-processing cut to their
    largest component (what ``m4oe ensemble`` needs to give predict's answer)."""
    _save_npz(
        path,
        probabilities=probabilities,
        classes=np.array(classes),
        label_values=np.array(values),
        axes=np.array(PROBABILITY_AXES),
        spacing=np.array(geometry.spacing),
        origin=np.array(geometry.origin),
        direction=np.array(geometry.direction),
        largest_only=np.array(largest_only, dtype=str),
    )


def _save_npz(path: Path, **arrays) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)
