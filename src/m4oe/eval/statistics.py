"""Per-structure statistics of a label map: volume, intensity inside, bounding box, and whether the
structure touches the image border (or the model's field of view), where its volume is a lower bound.

Computed on the label map file's own voxel grid, so ``m4oe statistics`` on label maps written earlier
gives what ``m4oe predict --statistics`` gives while segmenting. Written as ``CASE_statistics.json``
per case and one ``statistics.csv`` per run (a row per case and structure).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_csv, write_json

CSV_COLUMNS = ["case", "structure", "label", "voxels", "volume_ml", "intensity_mean", "intensity_std",
               "bbox_min_mm", "bbox_max_mm", "extent_mm", "touches_border", "touches_fov_edge",
               "entropy_mean", "disagreement_mean"]  # fmt: skip


class StatisticsError(ValueError):
    """The image and the label map cannot be read together (another grid, another size)."""


def structure_statistics(labels, image=None, classes: dict[int, str] | None = None,
                         fov_edge: set[int] | frozenset[int] = frozenset(),
                         maps: dict | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Statistics of every structure of ``labels`` (a SimpleITK label image).

    Args:
        labels: the label map (SimpleITK image, integer values).
        image: the scan on the same grid (SimpleITK image), for the intensity inside each structure.
        classes: label value -> structure name; every named structure gets a row, present or not
            (default: the values found, named ``label_N``). Value 0 (background) is left out.
        fov_edge: label values that reach the edge of the model's field of view (from prediction).
        maps: name -> per-voxel map on the same grid (SimpleITK images; ``predict --uncertainty``'s
            ``entropy`` and ``disagreement``): each adds ``NAME_mean``, its mean inside the structure.

    Returns:
        name -> ``label``, ``voxels``, ``volume_ml`` (voxels x voxel volume), ``intensity_mean`` and
        ``intensity_std`` (population std; ``None`` without an image or voxels), ``bbox_min_mm`` /
        ``bbox_max_mm`` (physical corners, x y z, of the box around the voxel centres), ``extent_mm``
        (its size along the file's voxel axes, whole voxels counted), ``touches_border`` (a voxel on a
        face of the image), ``touches_fov_edge``.
    """
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(labels)  # [z, y, x] in the file's voxel order
    intensities = None
    if image is not None:
        _check_same_grid(labels, image)
        intensities = sitk.GetArrayViewFromImage(image)
    if classes is None:
        classes = {int(v): f"label_{int(v)}" for v in np.unique(values) if v != 0}
    views = {}
    for kind, image_map in (maps or {}).items():
        _check_same_grid(labels, image_map)
        views[kind] = sitk.GetArrayViewFromImage(image_map)
    spacing = np.asarray(labels.GetSpacing(), dtype=np.float64)  # x, y, z
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for value, name in classes.items():
        if value == 0:
            continue
        mask = values == value
        out[name] = _one(labels, mask, intensities, spacing, voxel_ml, value, value in fov_edge)
        for kind, array in views.items():
            out[name][f"{kind}_mean"] = float(array[mask].mean(dtype=np.float64)) if mask.any() else None
    return out


def _one(labels, mask: np.ndarray, intensities, spacing: np.ndarray, voxel_ml: float, value: int,
         at_fov_edge: bool) -> dict[str, Any]:  # fmt: skip
    voxels = int(np.count_nonzero(mask))
    row: dict[str, Any] = {"label": int(value), "voxels": voxels, "volume_ml": voxels * voxel_ml,
                           **dict.fromkeys(CSV_COLUMNS[5:10]),  # intensity and box: none without voxels
                           "touches_border": False, "touches_fov_edge": bool(at_fov_edge)}  # fmt: skip
    if not voxels:
        return row
    if intensities is not None:
        inside = np.asarray(intensities[mask], dtype=np.float64)
        row["intensity_mean"], row["intensity_std"] = float(inside.mean()), float(inside.std())
    where = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    low_zyx = [int(w[0]) for w in where]
    high_zyx = [int(w[-1]) for w in where]
    low, high = low_zyx[::-1], high_zyx[::-1]  # x, y, z
    corners = np.array([labels.TransformIndexToPhysicalPoint([int(c) for c in corner])
                        for corner in itertools.product(*zip(low, high, strict=True))])  # fmt: skip
    row["bbox_min_mm"] = corners.min(0).round(4).tolist()
    row["bbox_max_mm"] = corners.max(0).round(4).tolist()
    row["extent_mm"] = ((np.asarray(high) - np.asarray(low) + 1) * spacing).round(4).tolist()
    size = mask.shape
    row["touches_border"] = bool(any(low_zyx[a] == 0 or high_zyx[a] == size[a] - 1 for a in range(3)))
    return row


def _check_same_grid(labels, image) -> None:
    from ..data.io import Geometry

    if labels.GetSize() != image.GetSize():
        raise StatisticsError(f"the label map is {labels.GetSize()} voxels but the image {image.GetSize()}: "
                              "give the image the label map was made from")  # fmt: skip
    problem = Geometry.of(labels).mismatch(Geometry.of(image))
    if problem:
        raise StatisticsError(f"the label map and the image lie on different grids ({problem}): "
                              "give the image the label map was made from")  # fmt: skip


def write_case(path: Path, case: str, statistics: dict[str, dict[str, Any]]) -> Path:
    write_json(path, {"case": case, "structures": statistics}, indent=2)
    return path


def csv_rows(case: str, statistics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"case": case, "structure": name, **{k: _cell(v) for k, v in row.items()}}
            for name, row in statistics.items()]  # fmt: skip


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(f"{v:g}" for v in value)
    return "" if value is None else value


def write_run_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    return write_csv(path, rows, CSV_COLUMNS)


def read_case(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def statistics_files(images: Path, labels: Path, out: Path, classes: dict[int, str] | None = None) -> list[Path]:
    """``m4oe statistics``: the statistics of existing label maps, without segmenting again.

    ``images`` and ``labels`` are two files, or two folders whose files pair by case name (a label map
    ``case.nii.gz`` with the image ``case_0000.nii.gz`` or ``case.nii.gz``). Writes
    ``OUT/CASE_statistics.json`` per case and ``OUT/statistics.csv``; returns the JSON files.
    """
    from ..data.io import read_sitk
    from ..files import check_output_dir, mark_output_dir

    pairs = _pairs(Path(images), Path(labels))
    check_output_dir(out, "statistics", [images, labels])
    results = []
    for image_path, label_path in pairs:  # read and computed before anything is written
        case, label_map = _case(label_path), read_sitk(label_path)
        if "float" in label_map.GetPixelIDTypeAsString():
            raise StatisticsError(f"{label_path}: holds {label_map.GetPixelIDTypeAsString()} values, not a label "
                                  "map; give the segmentation as --labels and the scan as --image")  # fmt: skip
        found = structure_statistics(label_map, read_sitk(image_path), classes)
        results.append((case, found))
    mark_output_dir(out, "statistics")
    written = [write_case(Path(out) / f"{case}_statistics.json", case, found) for case, found in results]
    write_run_csv(Path(out) / "statistics.csv", [row for case, found in results for row in csv_rows(case, found)])
    return written


def _case(path: Path) -> str:
    from ..data.io import strip_image_suffix

    return strip_image_suffix(path.name)


def _pairs(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    from ..data.io import IMAGE_SUFFIXES

    if labels.is_file() and images.exists():  # an image file, or a DICOM series folder
        return [(images, labels)]
    if not (images.is_dir() and labels.is_dir()):
        raise StatisticsError(f"--image {images} and --labels {labels}: give two files, or two folders")
    maps = sorted(p for p in labels.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES[:-1]))
    if not maps:
        raise StatisticsError(f"--labels {labels}: no label maps (NIfTI, NRRD, MHA) in this folder")
    scans = {}
    for p in images.iterdir():
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES[:-1]):
            scans.setdefault(re.sub(r"_0000$", "", _case(p)), p)
    missing = [m.name for m in maps if _case(m) not in scans]
    if missing:
        raise StatisticsError(f"--image {images}: no image for {len(missing)} label map(s), e.g. {missing[0]} "
                              "(expected CASE_0000.nii.gz or CASE.nii.gz beside it)")  # fmt: skip
    return [(scans[_case(m)], m) for m in maps]
