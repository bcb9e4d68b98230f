"""``flip`` of a dataset whose header contradicts its anatomy: config, cache, prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.config import ConfigError, ModelConfig, experiment_to_dict, parse_experiment
from m4oe.data.io import flip_in_plane, read_volume
from m4oe.data.prepare import prepare
from m4oe.infer.files import predict_paths
from m4oe.infer.predict import Predictor
from m4oe.model.swin_unet import M4oEUNet

from .conftest import MICRO
from .data_helpers import make_dataset, write_image


def test_flip_in_plane_by_hand():
    array = np.arange(12).reshape(1, 3, 4)  # [z, y, x]
    assert flip_in_plane(array, ["y"])[0, 0].tolist() == [8, 9, 10, 11]
    assert flip_in_plane(array, ["x"])[0, 0].tolist() == [3, 2, 1, 0]
    assert flip_in_plane(array, ["x", "y"])[0, 0].tolist() == [11, 10, 9, 8]
    assert flip_in_plane(array, []) is array
    probs = np.arange(24).reshape(2, 1, 3, 4)  # a leading class axis is left alone
    assert (flip_in_plane(probs, ["y"])[1] == flip_in_plane(probs[1], ["y"])).all()


@pytest.mark.parametrize("bad", [["z"], ["y", "y"], "y"])
def test_flip_config_is_checked(tmp_path, bad):
    with pytest.raises(ConfigError, match="flip"):
        parse_experiment({"datasets": [{"path": str(tmp_path), "flip": bad}]})


def test_flip_round_trips_through_the_resolved_config(tmp_path):
    exp = parse_experiment({"datasets": [{"path": str(tmp_path), "flip": ["y"]}, {"path": str(tmp_path / "b")}]})
    assert exp.datasets[0].flip == ("y",) and exp.datasets[1].flip == ()
    again = parse_experiment(experiment_to_dict(exp))
    assert again.datasets == exp.datasets


def _row_centre(mask: np.ndarray) -> float:
    rows = mask.sum(axis=tuple(i for i in range(mask.ndim) if i != mask.ndim - 2))
    return float((rows * np.arange(rows.size)).sum() / rows.sum())


def test_prepare_flips_images_and_labels_together(tmp_path):
    data = make_dataset(tmp_path / "ct", n=2)  # liver in rows 4-11 of 24: the top of the slice

    def build(flip):
        exp = parse_experiment({"datasets": [{"path": str(data), "name": "A", "modality": "CT", "flip": flip}],
                                "split": {"folds": 2}})  # fmt: skip
        out = tmp_path / f"cache{len(flip)}"
        result = prepare(exp, out, img_size=32, workers=1, progress=False)
        images = np.load(out / "images.npy").astype(np.float32)
        labels = np.load(out / "labels.npy")
        return result, json.loads((out / "meta.json").read_text()), images, labels

    _, meta_plain, img_plain, lab_plain = build([])
    _, meta_flip, img_flip, lab_flip = build(["y"])
    assert meta_flip["datasets"][0]["flip"] == ["y"] and meta_plain["datasets"][0]["flip"] == []
    assert meta_flip["datasets"][0]["fingerprint"] != meta_plain["datasets"][0]["fingerprint"]
    liver = 1 + ["liver", "spleen"].index("liver")
    assert _row_centre(lab_plain == liver) < 16 < _row_centre(lab_flip == liver)
    # the bright organ moved with its label: images and labels stay registered
    assert img_flip[lab_flip == liver].mean() == pytest.approx(img_plain[lab_plain == liver].mean(), rel=0.05)


class TopModel(M4oEUNet):
    """Stand-in for a position-bound model: 'liver' where the slice is bright in its top half only."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        x = image[:, 0]
        top = (torch.arange(x.shape[-2]) < x.shape[-2] // 2).to(x.dtype)[:, None].expand_as(x)
        organ = (x > 0.5).to(x.dtype) * top
        logits = torch.stack([1 - organ, organ, torch.full_like(x, -1.0)], dim=1) * 10
        return (logits, []) if return_gates else logits


def test_prediction_applies_the_dataset_flip_and_undoes_it(tmp_path):
    names = ["background", "liver", "spleen"]
    model = TopModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT"], {"flipped": names})
    info = {"modality": "CT", "normalization": {"scheme": "none"}, "label_values": {"background": 0, "liver": 6,
            "spleen": 1}, "flip": ["y"]}  # fmt: skip
    model.bundle_extra = {"datasets": {"flipped": info}}
    image = np.zeros((3, 32, 32), np.float32)
    image[:, 22:29, 8:20] = 1.0  # an organ in the bottom half of the canonical slice
    path = write_image(tmp_path / "in" / "case_0000.nii.gz", image)
    report = predict_paths(Predictor(model), [path], tmp_path / "out", dataset="flipped", progress=False)
    assert report.failed == []
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz")))
    # the model saw the organ flipped into its top half, and the label came back where the organ is
    assert ((labels == 6) == (image > 0.5)).mean() > 0.985
    # without --dataset the request is not that dataset's files: nothing is flipped
    plain = Predictor(model).predict_volume(read_volume(path), None, "CT").labels
    assert (plain == 0).all()


def _three_organs(mirrored: bool) -> np.ndarray:
    """4 slices of 20 x 20: organ 1 at the top, 2 in the middle, 3 at the bottom (reversed if mirrored)."""
    labels = np.zeros((4, 20, 20), np.uint8)
    rows = [(2, 5), (8, 11), (14, 17)]
    for k, (r0, r1) in enumerate(reversed(rows) if mirrored else rows, start=1):
        labels[:, r0:r1, 2 + 5 * k : 5 + 5 * k] = k
    return labels


def test_mirrored_datasets_are_reported():
    from m4oe.data.mirrored import mirrored_datasets, organ_positions

    vocabulary = ["background", "liver", "kidney", "spleen"]
    labels = np.concatenate([_three_organs(False), _three_organs(True), _three_organs(False)])
    owner = np.repeat([0, 1, 2], 4)
    positions = organ_positions(labels, owner, 3, 4)
    # organ 1 fills rows 2-4 and columns 7-9, read at even pixels: rows 2 and 4, column 8
    assert positions[0, 1] == pytest.approx([3.0 / 20, 8.0 / 20])
    assert np.isnan(positions[:, 0]).sum() == 0 and np.isnan(organ_positions(labels, owner, 4, 5)[3]).all()
    warnings = mirrored_datasets(labels, owner, ["A", "B", "C"], vocabulary)
    assert len(warnings) == 2  # A-B and B-C along y; A-C agree; x agrees everywhere
    assert all("anterior-posterior" in w and "flip: [y]" in w for w in warnings)
    assert warnings[0].startswith("A and B share liver, kidney, spleen")
    # two shared organs are not enough to tell
    assert mirrored_datasets(np.where(labels == 3, 0, labels), owner, ["A", "B", "C"], vocabulary) == []


@pytest.mark.slow
@pytest.mark.shared_data
def test_prepare_reports_btcv_mirrored_against_chaos_until_flipped(tmp_path):
    from .conftest import SHARED_DATA

    def config(flip):
        return parse_experiment({"datasets": [
            {"path": str(SHARED_DATA / "Dataset001_BTCV"), "name": "BTCV", "modality": "CT", "max_cases": 2,
             "flip": flip},
            {"path": str(SHARED_DATA / "Dataset002_CHAOS_T2"), "name": "CHAOS", "modality": "MRI", "max_cases": 2},
        ]})  # fmt: skip

    plain = prepare(config([]), tmp_path / "plain", img_size=32, workers=1, progress=False)
    assert len(plain.warnings) == 1 and "BTCV and CHAOS" in plain.warnings[0] and "flip: [y]" in plain.warnings[0]
    assert prepare(config([]), tmp_path / "plain", img_size=32, workers=1, progress=False).warnings == plain.warnings
    assert prepare(config(["y"]), tmp_path / "flipped", img_size=32, workers=1, progress=False).warnings == []
