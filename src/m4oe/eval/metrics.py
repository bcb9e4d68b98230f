"""Per-label segmentation metrics in physical units: Dice, IoU, HD95 (mm) and normalised surface Dice.

Overlap counts are plain numpy; the surface distances come from MONAI
(``compute_hausdorff_distance`` with ``percentile=95`` and ``compute_surface_dice``), given the voxel
spacing so that distances are in millimetres.

Empty masks, explicitly:

* reference and prediction both empty: every metric is NaN (nothing to score) and is left out of
  means, as nnU-Net and MONAI do;
* exactly one of them empty: Dice = IoU = NSD = 0 and HD95 = NaN (a distance to nothing is undefined;
  the case still counts as a failure through Dice and NSD).

HD95 follows MONAI: the larger of the two directed 95th-percentile surface distances.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

METRICS = ("Dice", "IoU", "HD95", "NSD")


def label_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx, nsd_tolerance_mm: float = 2.0) -> dict[str, float]:
    """Metrics of one binary mask pair (``[z, y, x]`` bool arrays) with voxel size ``spacing_zyx`` (mm)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    tp = int((pred & ref).sum())
    fp = int((pred & ~ref).sum())
    fn = int((~pred & ref).sum())
    n_pred, n_ref = tp + fp, tp + fn
    out = {"TP": tp, "FP": fp, "FN": fn, "n_pred": n_pred, "n_ref": n_ref}
    if n_pred == 0 and n_ref == 0:
        return {**out, **{m: math.nan for m in METRICS}}
    out["Dice"] = 2 * tp / (n_pred + n_ref)
    out["IoU"] = tp / (tp + fp + fn)
    if n_pred == 0 or n_ref == 0:
        return {**out, "HD95": math.nan, "NSD": 0.0}
    out["HD95"], out["NSD"] = _surface_metrics(pred, ref, spacing_zyx, nsd_tolerance_mm)
    return out


def _surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing_zyx, tolerance: float) -> tuple[float, float]:
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()
    spacing = [float(s) for s in spacing_zyx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation chatter
        hd95 = compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(p, r, class_thresholds=[tolerance], spacing=spacing, include_background=True)
    return float(hd95.item()), float(nsd.item())


def nanmean(values) -> float:
    finite = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(finite)) if finite else math.nan
