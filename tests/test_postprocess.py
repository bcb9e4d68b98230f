"""Largest-component post-processing: the operation, the choice on validation, its use in predict."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

import m4oe.bundle
from m4oe.cli import app
from m4oe.data.io import read_volume
from m4oe.data.postprocess import keep_largest_components
from m4oe.infer.files import predict_paths
from m4oe.infer.predict import Predictor
from m4oe.train.validate import largest_component_dice, summarise

from .data_helpers import write_image
from .test_predict import threshold_model

NEIGHBOURS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


def keep_largest_by_flood_fill(labels: np.ndarray, classes) -> np.ndarray:
    """Reference: breadth-first flood fill over the 26 neighbours, one voxel at a time."""
    out = labels.copy()
    for k in classes:
        seen = np.zeros(labels.shape, bool)
        components = []
        for start in zip(*np.nonzero(labels == k), strict=True):
            if seen[start]:
                continue
            seen[start], queue, members = True, [start], []
            while queue:
                voxel = queue.pop()
                members.append(voxel)
                for d in NEIGHBOURS:
                    n = tuple(v + s for v, s in zip(voxel, d, strict=True))
                    inside = all(0 <= i < size for i, size in zip(n, labels.shape, strict=True))
                    if inside and not seen[n] and labels[n] == k:
                        seen[n] = True
                        queue.append(n)
            components.append(members)
        if len(components) > 1:
            largest = max(len(c) for c in components)
            keep = next(c for c in components if len(c) == largest)  # ties: the first in scan order
            for c in components:
                if c is not keep:
                    for voxel in c:
                        out[voxel] = 0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_largest_matches_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((5, 9, 8)) < 0.25) * rng.integers(1, 4, (5, 9, 8))
    for classes in ([1, 2, 3], [2]):
        expected = keep_largest_by_flood_fill(labels, classes)
        np.testing.assert_array_equal(keep_largest_components(labels, classes), expected)
    np.testing.assert_array_equal(keep_largest_components(labels), keep_largest_by_flood_fill(labels, [1, 2, 3]))


def test_keep_largest_by_hand():
    labels = np.zeros((1, 5, 7), np.int64)
    labels[0, 0:3, 0:3] = 1  # 9 voxels
    labels[0, 4, 6] = 1  # an island
    labels[0, 3, 3] = 1  # touches the block only at a corner: the same 26-connected component
    labels[0, 0, 5] = 2
    labels[0, 4, 0] = 2  # two single voxels of class 2, not listed below
    out = keep_largest_components(labels, [1])
    assert out[0, 4, 6] == 0 and out[0, 3, 3] == 1 and (out[0, 0:3, 0:3] == 1).all()
    assert out[0, 0, 5] == 2 and out[0, 4, 0] == 2
    assert (labels[0, 4, 6]) == 1  # the input is not changed


def test_largest_component_dice_by_hand():
    ref = np.zeros((1, 4, 8), np.int64)
    ref[0, :, 0:2] = 1  # 8 voxels of class 1
    pred = ref.copy()
    pred[0, 0, 6] = 1  # one false-positive island
    pred[0, 3, 7] = 2  # class 2 predicted where the reference has none
    dice = largest_component_dice(pred, ref, [1, 2, 3])
    assert dice[1] == 1.0  # the island is gone (plain Dice: 16 / 17)
    assert dice[2] == 0.0
    assert math.isnan(dice[3])


def _case(dataset, plain, largest):
    return {"dataset": dataset, "case_id": "c", "dice": plain, "dice_largest": largest}


def test_the_choice_is_made_per_dataset_and_label():
    cases = [
        _case("CT", {"liver": 0.8, "spleen": 0.9}, {"liver": 0.9, "spleen": 0.5}),
        _case("CT", {"liver": 0.8, "spleen": 0.7}, {"liver": 0.8, "spleen": 0.8}),  # spleen: 0.8 -> 0.65 overall
        _case("MR", {"liver": 0.6, "spleen": 0.6}, {"liver": 0.6, "spleen": 0.7}),
    ]
    result = summarise(cases, {}, {})
    assert result["postprocessing"] == {"CT": ["liver"], "MR": ["spleen"]}  # a tie (MR liver) is not chosen
    assert result["dice"]["CT"] == pytest.approx({"liver": 0.8, "spleen": 0.8})
    assert result["dice_postprocessed"]["CT"] == pytest.approx({"liver": 0.85, "spleen": 0.8})
    assert result["dice_postprocessed"]["MR"] == pytest.approx({"liver": 0.6, "spleen": 0.7})
    assert result["dataset_mean_dice_postprocessed"] == pytest.approx({"CT": 0.825, "MR": 0.65})
    assert result["mean_dice"] == pytest.approx((0.8 + 0.6) / 2)


def _two_blobs(tmp_path):
    image = np.zeros((4, 32, 32), np.float32)
    image[:, 4:20, 4:20] = 1.0  # the organ
    image[:, 26:29, 26:29] = 1.0  # a small bright island the threshold model also calls liver
    return image, write_image(tmp_path / "in" / "case_0000.nii.gz", image)


def _liver_voxels(path) -> tuple[int, int]:
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return int((labels[:, 4:20, 4:20] == 6).sum()), int((labels[:, 24:32, 24:32] == 6).sum())


def test_prediction_applies_the_bundles_choice(tmp_path):
    image, path = _two_blobs(tmp_path)
    model = threshold_model()
    model.bundle_extra = {**model.bundle_extra, "postprocessing": {"keep_largest": {"phantom": ["liver"]}}}
    result = Predictor(model).predict_volume(read_volume(path), "phantom")
    assert result.largest_only == ["liver"]
    predict_paths(Predictor(model), [path], tmp_path / "chosen", dataset="phantom", progress=False)
    organ, island = _liver_voxels(tmp_path / "chosen" / "case.nii.gz")
    assert organ > 0.9 * image[:, 4:20, 4:20].size and island == 0
    # switched off, or without --dataset (no dataset's choice applies), the island stays
    predict_paths(Predictor(model, postprocess=False), [path], tmp_path / "off", dataset="phantom", progress=False)
    assert _liver_voxels(tmp_path / "off" / "case.nii.gz")[1] > 0
    assert Predictor(model).resolve(None, "CT").largest_only == []
    # --keep-largest cuts every class, whatever the bundle chose
    everything = Predictor(threshold_model(), keep_largest=True)
    assert everything.resolve("phantom", None).largest_only == ["liver", "spleen"]


def test_predict_command_reports_and_switches_the_choice(tmp_path, monkeypatch):
    _, path = _two_blobs(tmp_path)
    model = threshold_model()
    model.bundle_extra = {**model.bundle_extra, "postprocessing": {"keep_largest": {"phantom": ["liver"]}}}
    monkeypatch.setattr(m4oe.bundle, "load_bundle", lambda *args, **kwargs: model)  # a bundle rebuilds a real model
    runner = CliRunner()
    args = ["predict", "-m", str(tmp_path / "bundle"), "-i", str(path), "--dataset", "phantom", "--device", "cpu"]
    done = runner.invoke(app, [*args, "-o", str(tmp_path / "on")])
    assert done.exit_code == 0, done.output
    assert "largest connected component only: liver" in done.output
    assert _liver_voxels(tmp_path / "on" / "case.nii.gz")[1] == 0
    done = runner.invoke(app, [*args, "-o", str(tmp_path / "off"), "--no-postprocess"])
    assert done.exit_code == 0, done.output
    assert "largest connected component" not in done.output
    assert _liver_voxels(tmp_path / "off" / "case.nii.gz")[1] > 0
