"""``m4oe evaluate``: score a folder of predictions against references, the way papers report it.

Writes an nnU-Net-compatible ``summary.json`` (``metric_per_case`` with ``reference_file``,
``prediction_file`` and ``metrics`` keyed by label value; ``mean`` per label; ``foreground_mean``),
plus ``summary.csv`` (one row per case and label), ``summary.md`` (a table like the paper's Table 2:
organs as columns, mean last) and ``dice_boxplot.png``.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..files import save_figure, write_csv, write_json, write_text
from .metrics import METRICS, label_metrics, nanmean


class EvaluationError(ValueError):
    """References and predictions cannot be compared (missing files, shape or geometry mismatch)."""


def read_labels_json(path: Path) -> dict[int, str]:
    """Label value -> name from an nnU-Net (name -> value) or MSD (value -> name) dataset.json."""
    try:
        labels = json.loads(Path(path).read_text())["labels"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise EvaluationError(f"{path}: cannot read 'labels' ({err})") from err
    if all(str(k).isdigit() for k in labels):
        return {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    return {int(v): str(k) for k, v in labels.items() if isinstance(v, int) and v != 0}


def pair_files(gt_dir: Path, pred_dir: Path) -> list[tuple[Path, Path]]:
    """References and predictions matched by file name; a missing prediction is an error."""
    from ..data.io import IMAGE_SUFFIXES

    if not Path(gt_dir).is_dir():
        raise EvaluationError(f"{gt_dir}: reference folder not found")
    if not Path(pred_dir).is_dir():
        raise EvaluationError(f"{pred_dir}: prediction folder not found")
    refs = sorted(p for p in Path(gt_dir).iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES[:-1]))
    if not refs:
        raise EvaluationError(f"{gt_dir}: no reference label files")
    missing = [str(Path(pred_dir) / r.name) for r in refs if not (Path(pred_dir) / r.name).is_file()]
    if missing:
        raise EvaluationError(f"prediction files missing for {len(missing)} references: {missing[:10]}")
    return [(r, Path(pred_dir) / r.name) for r in refs]


def evaluate_case(task: tuple[str, str, list[int], float]) -> dict[str, Any]:
    from ..data.io import ImageReadError, read_label_map

    ref_path, pred_path, labels, tolerance = task
    declared = {0, *labels}
    try:
        ref = read_label_map(ref_path, declared, canonical=False)
        pred = read_label_map(pred_path, declared, canonical=False)
    except ImageReadError as err:
        raise EvaluationError(str(err)) from None
    if ref.array.shape != pred.array.shape:
        raise EvaluationError(
            f"{pred_path}: shape {pred.array.shape[::-1]} does not match reference {ref_path} "
            f"{ref.array.shape[::-1]} (x, y, z)"
        )
    mismatch = ref.geometry.mismatch(pred.geometry, tol=1e-3)
    if mismatch:
        raise EvaluationError(f"{pred_path}: geometry differs from reference {ref_path}: {mismatch}")
    metrics = {str(k): label_metrics(pred.array == k, ref.array == k, ref.spacing_zyx, tolerance) for k in labels}
    return {"reference_file": str(ref_path), "prediction_file": str(pred_path), "metrics": metrics}


def evaluate_folders(
    gt_dir: Path,
    pred_dir: Path,
    labels_json: Path,
    out: Path,
    nsd_tolerance_mm: float = 2.0,
    workers: int = 2,
) -> dict[str, Any]:
    """Score every reference case; write summary.json (+ .csv, .md, box plot) next to ``out``.

    Everything is checked before the cases are scored: the tolerance, and ``out``: a ``.json`` file
    name that is new or an earlier summary (never a folder or another file)."""
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm > 0):
        raise EvaluationError(f"--nsd-tolerance {nsd_tolerance_mm}: give the surface tolerance in mm, above 0")
    check_summary_path(Path(out))
    names = read_labels_json(labels_json)
    labels = sorted(names)
    tasks = [(str(r), str(p), labels, nsd_tolerance_mm) for r, p in pair_files(gt_dir, pred_dir)]
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_case = list(pool.map(evaluate_case, tasks))
    else:
        per_case = [evaluate_case(t) for t in tasks]
    summary = summarise(per_case, names, nsd_tolerance_mm)
    write_outputs(summary, Path(out))
    return summary


def check_summary_path(out: Path) -> None:
    """``out`` may take a summary: a ``.json`` name, not a folder, and if it exists, an earlier summary."""
    if out.is_dir():
        raise EvaluationError(f"-o {out}: is a folder; give the summary's file name, e.g. {out / 'summary.json'}")
    if out.suffix.lower() != ".json":
        raise EvaluationError(f"-o {out}: give a file name ending in .json (the .csv, .md and box plot go beside it)")
    if out.exists():
        try:
            earlier = json.loads(out.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            earlier = None
        if not (isinstance(earlier, dict) and "metric_per_case" in earlier):
            raise EvaluationError(f"-o {out}: exists and is not an m4oe summary; give a new file name")


def summarise(per_case: list[dict], names: dict[int, str], tolerance: float) -> dict[str, Any]:
    keys = [str(k) for k in sorted(names)]
    mean = {k: {m: nanmean(c["metrics"][k][m] for c in per_case) for m in METRICS} for k in keys}
    foreground = {m: nanmean(mean[k][m] for k in keys) for m in METRICS}
    return {
        "metric_per_case": per_case,
        "mean": mean,
        "foreground_mean": foreground,
        "label_names": {k: names[int(k)] for k in keys},
        "settings": {
            "nsd_tolerance_mm": tolerance,
            "hd95": "max of the two directed 95th-percentile surface distances, in mm (MONAI)",
            "empty": "both empty: NaN, left out of means; one empty: Dice=IoU=NSD=0, HD95=NaN",
        },
    }


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    write_json(out, summary)
    names = summary["label_names"]
    stem = out.with_suffix("")
    rows = []
    for case in summary["metric_per_case"]:
        for k, metrics in case["metrics"].items():
            rows.append({"case": Path(case["reference_file"]).name, "label": k, "name": names[k],
                         **{m: metrics[m] for m in METRICS}})  # fmt: skip
    write_csv(stem.with_name(stem.name + ".csv"), rows, ["case", "label", "name", *METRICS])
    write_text(stem.with_name(stem.name + ".md"), markdown_table(summary))
    boxplot(summary, stem.with_name(stem.name + "_dice_boxplot.png"))


def markdown_table(summary: dict[str, Any]) -> str:
    """Organs as columns, mean last; Dice and NSD in %, HD95 in mm (as the paper's Table 2)."""
    names = summary["label_names"]
    keys = list(names)
    header = "| metric | " + " | ".join(names[k] for k in keys) + " | mean |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for metric, scale, unit in (("Dice", 100, "DSC (%)"), ("NSD", 100, "NSD (%)"), ("HD95", 1, "HD95 (mm)")):
        cells = [_fmt(summary["mean"][k][metric] * scale) for k in keys]
        cells.append(_fmt(summary["foreground_mean"][metric] * scale))
        lines.append(f"| {unit} | " + " | ".join(cells) + " |")
    n = len(summary["metric_per_case"])
    return "\n".join(lines) + f"\n\n{n} cases; NaN where a label is empty in every case.\n"


def boxplot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = summary["label_names"]
    data, labels = [], []
    for k, name in names.items():
        values = [c["metrics"][k]["Dice"] for c in summary["metric_per_case"]]
        values = [v for v in values if not np.isnan(v)]
        if values:
            data.append(values)
            labels.append(name)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(labels) + 1), 4))
    if data:
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"Dice per label ({len(summary['metric_per_case'])} cases)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _fmt(value: float) -> str:
    return "NaN" if np.isnan(value) else f"{value:.2f}"
