"""Per-structure statistics (``predict --statistics``, ``m4oe statistics``) against values computed by
hand on small volumes with anisotropic spacing, a moved origin and a mirrored axis."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from m4oe.cli import app
from m4oe.eval.statistics import StatisticsError, statistics_files, structure_statistics
from m4oe.infer.files import predict_paths
from m4oe.infer.predict import Predictor

from .data_helpers import write_image
from .test_predict import l_shape, threshold_model

SPACING, ORIGIN = (0.5, 0.8, 2.5), (10.0, -5.0, 3.0)  # x, y, z
MIRRORED_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def volumes():
    """Labels ``[z, y, x]`` = (4, 5, 6): structure 1 a box z 1-2, y 1-3, x 2-4 (18 voxels); structure 2
    one voxel in a corner of the image; and an image whose value is 100 z + 10 y + x."""
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 1:4, 2:5] = 1
    labels[0, 0, 0] = 2
    z, y, x = np.indices(labels.shape)
    return labels, (100 * z + 10 * y + x).astype(np.float32)


def image_of(array, direction=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_volume_intensity_box_and_border_by_hand():
    labels, values = volumes()
    found = structure_statistics(image_of(labels), image_of(values), {1: "liver", 2: "spleen", 3: "kidney"})
    liver = found["liver"]
    assert liver["voxels"] == 18
    assert liver["volume_ml"] == pytest.approx(18 * 0.5 * 0.8 * 2.5 / 1000)  # 0.018 ml
    inside = [100 * z + 10 * y + x for z in (1, 2) for y in (1, 2, 3) for x in (2, 3, 4)]
    mean = sum(inside) / len(inside)
    assert liver["intensity_mean"] == pytest.approx(mean)
    assert liver["intensity_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in inside) / len(inside)))
    assert liver["bbox_min_mm"] == pytest.approx([10 + 2 * 0.5, -5 + 1 * 0.8, 3 + 1 * 2.5])
    assert liver["bbox_max_mm"] == pytest.approx([10 + 4 * 0.5, -5 + 3 * 0.8, 3 + 2 * 2.5])
    assert liver["extent_mm"] == pytest.approx([3 * 0.5, 3 * 0.8, 2 * 2.5])
    assert liver["touches_border"] is False and found["spleen"]["touches_border"] is True
    assert found["spleen"]["voxels"] == 1 and found["spleen"]["intensity_std"] == 0.0
    assert found["kidney"] == {"label": 3, "voxels": 0, "volume_ml": 0.0, "intensity_mean": None,
                               "intensity_std": None, "bbox_min_mm": None, "bbox_max_mm": None, "extent_mm": None,
                               "touches_border": False, "touches_fov_edge": False}  # fmt: skip


def test_the_box_follows_a_mirrored_axis_into_physical_space():
    labels, _ = volumes()
    liver = structure_statistics(image_of(labels, MIRRORED_X), None, {1: "liver"})["liver"]
    assert liver["bbox_min_mm"][0] == pytest.approx(10 - 4 * 0.5)  # x runs the other way from the origin
    assert liver["bbox_max_mm"][0] == pytest.approx(10 - 2 * 0.5)
    assert liver["extent_mm"] == pytest.approx([1.5, 2.4, 5.0])
    assert liver["intensity_mean"] is None  # no image given


def test_without_names_every_value_found_is_a_structure():
    labels, _ = volumes()
    assert set(structure_statistics(image_of(labels))) == {"label_1", "label_2"}


def test_an_image_on_another_grid_is_refused():
    labels, values = volumes()
    moved = image_of(values)
    moved.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(StatisticsError, match="different grids .*origin"):
        structure_statistics(image_of(labels), moved)
    with pytest.raises(StatisticsError, match="voxels but the image"):
        structure_statistics(image_of(labels), image_of(values[:2]))


def test_the_command_pairs_folders_by_case_and_writes_json_and_csv(tmp_path):
    labels, values = volumes()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for case in ("a", "b"):
        sitk.WriteImage(image_of(values), str(tmp_path / "images" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(image_of(labels if case == "a" else labels * 0), str(tmp_path / "labels" / f"{case}.nii.gz"))
    names = tmp_path / "dataset.json"
    names.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    result = CliRunner().invoke(app, ["statistics", "-i", str(tmp_path / "images"), "-l", str(tmp_path / "labels"),
                                      "-o", str(tmp_path / "stats"), "--names", str(names)])  # fmt: skip
    assert result.exit_code == 0, result.output
    case_a = json.loads((tmp_path / "stats" / "a_statistics.json").read_text())
    assert case_a["case"] == "a" and case_a["structures"]["liver"]["voxels"] == 18
    with open(tmp_path / "stats" / "statistics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["structure"], r["voxels"]) for r in rows] == [
        ("a", "liver", "18"), ("a", "spleen", "1"), ("b", "liver", "0"), ("b", "spleen", "0")]  # fmt: skip
    assert rows[0]["extent_mm"] == "1.5 2.4 5"


def test_the_command_refuses_in_one_line_and_writes_nothing(tmp_path):
    labels, values = volumes()
    write_image(tmp_path / "scan.nii.gz", values, spacing=SPACING)
    write_image(tmp_path / "seg.nii.gz", labels, spacing=SPACING)
    runner = CliRunner()
    swapped = runner.invoke(app, ["statistics", "-i", str(tmp_path / "seg.nii.gz"), "-l", str(tmp_path / "scan.nii.gz"),
                                  "-o", str(tmp_path / "out")])  # fmt: skip
    assert swapped.exit_code == 1 and "not a label map" in swapped.output and "Traceback" not in swapped.output
    (tmp_path / "labels").mkdir()
    write_image(tmp_path / "labels" / "c.nii.gz", labels)
    (tmp_path / "images").mkdir()
    lonely = runner.invoke(app, ["statistics", "-i", str(tmp_path / "images"), "-l", str(tmp_path / "labels"),
                                 "-o", str(tmp_path / "out")])  # fmt: skip
    assert lonely.exit_code == 1 and "no image for 1 label map(s), e.g. c.nii.gz" in lonely.output
    assert not (tmp_path / "out").exists()


def test_predict_writes_what_the_command_computes_from_its_files(tmp_path):
    image = l_shape()
    path = write_image(tmp_path / "in" / "case_0000.nii.gz", image, spacing=(0.8, 1.3, 3.0),
                       direction=MIRRORED_X, origin=(10.0, -20.0, 5.0))  # fmt: skip
    report = predict_paths(Predictor(threshold_model()), [path], tmp_path / "out", dataset="phantom", progress=False,
                           statistics=True)  # fmt: skip
    assert report.failed == [] and report.statistics == tmp_path / "out" / "statistics.csv"
    during = json.loads((tmp_path / "out" / "case_statistics.json").read_text())
    after = statistics_files(path, tmp_path / "out" / "case.nii.gz", tmp_path / "again", {6: "liver", 1: "spleen"})
    assert json.loads(after[0].read_text()) == during
    liver = during["structures"]["liver"]
    assert liver["voxels"] == int(image.sum()) and liver["intensity_mean"] == pytest.approx(1.0)
    assert liver["volume_ml"] == pytest.approx(image.sum() * 0.8 * 1.3 * 3.0 / 1000)
    assert during["structures"]["spleen"]["voxels"] == 0


def test_a_structure_cut_by_the_models_field_of_view_is_flagged(tmp_path):
    model = threshold_model()
    model.bundle_extra = {"datasets": {"phantom": {**model.bundle_extra["datasets"]["phantom"], "fov": 0.5}}}
    image = np.zeros((3, 40, 40), np.float32)
    image[:, 5:35, 18:22] = 1.0  # a bar longer than the central half of the slice: cut at its edge
    path = write_image(tmp_path / "bar_0000.nii.gz", image)
    predict_paths(Predictor(model), [path], tmp_path / "out", dataset="phantom", progress=False, statistics=True)
    liver = json.loads((tmp_path / "out" / "bar_statistics.json").read_text())["structures"]["liver"]
    assert liver["touches_fov_edge"] is True and liver["touches_border"] is True  # z spans the whole volume
    assert 0 < liver["voxels"] < int(image.sum())  # what lies outside the field of view is not segmented
