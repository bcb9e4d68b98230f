"""Evaluation metrics against hand-computed values, the empty-mask policy and summary.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from m4oe.eval.evaluate import EvaluationError, evaluate_folders
from m4oe.eval.metrics import label_metrics

from .data_helpers import write_image


def cube(shape=(12, 12, 12), start=(3, 3, 3), size=5) -> np.ndarray:
    mask = np.zeros(shape, bool)
    z, y, x = start
    mask[z : z + size, y : y + size, x : x + size] = True
    return mask


def test_dice_iou_and_hd95_by_hand():
    ref = cube()
    pred = cube(start=(4, 3, 3))  # shifted by one slice
    m = label_metrics(pred, ref, spacing_zyx=(2.0, 1.0, 1.0))
    # overlap 4 x 5 x 5 = 100 voxels of 125 each
    assert m["TP"] == 100 and m["FP"] == 25 and m["FN"] == 25
    assert m["Dice"] == pytest.approx(2 * 100 / 250)
    assert m["IoU"] == pytest.approx(100 / 150)
    # the 25 voxels of the new top face (well over 5% of the surface) are one slice = 2 mm away
    assert m["HD95"] == pytest.approx(2.0)
    # HD95 is in mm: with 4 mm slices the same voxels are 4 mm away
    assert label_metrics(pred, ref, spacing_zyx=(4.0, 1.0, 1.0))["HD95"] == pytest.approx(4.0)
    # every surface point is within 2 mm of the other surface, not all within 1 mm
    assert label_metrics(pred, ref, (2.0, 1.0, 1.0), nsd_tolerance_mm=2.0)["NSD"] == pytest.approx(1.0)
    assert label_metrics(pred, ref, (2.0, 1.0, 1.0), nsd_tolerance_mm=1.0)["NSD"] < 1.0


def test_identical_masks():
    m = label_metrics(cube(), cube(), (1.0, 1.0, 1.0))
    assert m["Dice"] == m["IoU"] == m["NSD"] == 1.0 and m["HD95"] == 0.0


def test_empty_policy():
    empty = np.zeros((12, 12, 12), bool)
    both = label_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert all(math.isnan(both[k]) for k in ("Dice", "IoU", "HD95", "NSD"))
    missed = label_metrics(empty, cube(), (1.0, 1.0, 1.0))
    assert missed["Dice"] == 0 and missed["IoU"] == 0 and missed["NSD"] == 0 and math.isnan(missed["HD95"])
    spurious = label_metrics(cube(), empty, (1.0, 1.0, 1.0))
    assert spurious["Dice"] == 0 and math.isnan(spurious["HD95"])


def _write_pair(root, name, ref, pred, spacing=(1.0, 1.0, 2.0)):
    write_image(root / "gt" / name, ref.astype(np.uint8), spacing=spacing)
    write_image(root / "pred" / name, pred.astype(np.uint8), spacing=spacing)


def _labels_json(root):
    path = root / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    return path


def test_summary_json_schema_and_nan_means(tmp_path):
    a_ref = cube().astype(np.uint8)
    a_ref[0:2, 0:2, 0:2] = 2
    a_pred = cube(start=(4, 3, 3)).astype(np.uint8)
    a_pred[0:2, 0:2, 0:2] = 2
    _write_pair(tmp_path, "a.nii.gz", a_ref, a_pred)
    _write_pair(tmp_path, "b.nii.gz", cube().astype(np.uint8), cube().astype(np.uint8))  # no spleen anywhere
    out = tmp_path / "eval" / "summary.json"
    summary = evaluate_folders(tmp_path / "gt", tmp_path / "pred", _labels_json(tmp_path), out, workers=1)
    saved = json.loads(out.read_text().replace("NaN", "null"))
    assert set(saved) >= {"metric_per_case", "mean", "foreground_mean"}
    case = saved["metric_per_case"][0]
    assert case["reference_file"].endswith("gt/a.nii.gz") and case["prediction_file"].endswith("pred/a.nii.gz")
    assert set(case["metrics"]) == {"1", "2"}
    assert set(case["metrics"]["1"]) >= {"Dice", "IoU", "HD95", "NSD", "TP", "FP", "FN", "n_ref", "n_pred"}
    # spleen is empty in both files of case b: NaN there, and the mean is case a's alone
    assert math.isnan(summary["metric_per_case"][1]["metrics"]["2"]["Dice"])
    assert summary["mean"]["2"]["Dice"] == 1.0
    assert summary["mean"]["1"]["Dice"] == pytest.approx((0.8 + 1.0) / 2)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((0.8 + 1.0) / 2 + 1.0) / 2)
    table = (tmp_path / "eval" / "summary.md").read_text()
    assert table.splitlines()[0] == "| metric | liver | spleen | mean |"
    assert "| DSC (%) | 90.00 | 100.00 | 95.00 |" in table
    assert (tmp_path / "eval" / "summary.csv").read_text().count("\n") == 5
    assert (tmp_path / "eval" / "summary_dice_boxplot.png").stat().st_size > 1000


def test_bad_inputs(tmp_path):
    _write_pair(tmp_path, "a.nii.gz", cube(), cube())
    write_image(tmp_path / "gt" / "b.nii.gz", cube().astype(np.uint8))
    labels = _labels_json(tmp_path)
    with pytest.raises(EvaluationError, match=r"prediction files missing .*pred/b.nii.gz"):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred", labels, tmp_path / "s.json", workers=1)
    write_image(tmp_path / "pred" / "b.nii.gz", np.zeros((12, 12, 11), np.uint8))
    with pytest.raises(EvaluationError, match=r"pred/b.nii.gz: shape \(11, 12, 12\) does not match reference"):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred", labels, tmp_path / "s.json", workers=1)
    write_image(tmp_path / "pred" / "b.nii.gz", cube().astype(np.uint8), spacing=(1.0, 1.0, 3.0))
    with pytest.raises(EvaluationError, match=r"pred/b.nii.gz: geometry differs .* spacing"):
        evaluate_folders(tmp_path / "gt", tmp_path / "pred", labels, tmp_path / "s.json", workers=1)
    with pytest.raises(EvaluationError, match="nowhere: prediction folder not found"):
        evaluate_folders(tmp_path / "gt", tmp_path / "nowhere", labels, tmp_path / "s.json", workers=1)
    assert not (tmp_path / "s.json").exists()
