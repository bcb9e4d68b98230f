"""``fov`` of a dataset whose targets fill only the middle of a wide field of view: the plan, the
cache's check against the labels, and prediction (background outside, a warning at the edge)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m4oe.config import ConfigError, ModelConfig, experiment_to_dict, parse_experiment
from m4oe.data.datasets import DataError
from m4oe.data.io import read_volume
from m4oe.data.prepare import prepare
from m4oe.data.resample import SlicePlan, fit_slices, fov_needed, outside_view, unfit_logits, view_box
from m4oe.infer.predict import Predictor
from m4oe.model.swin_unet import M4oEUNet

from .conftest import MICRO
from .data_helpers import make_dataset, phantom, write_image


def test_view_box_and_needed_fov_by_hand():
    assert view_box((24, 20), 0.8) == (2, 21, 2, 18)  # 19 of 24 rows from row 2, 16 of 20 columns from 2
    assert view_box((24, 20), 1.0) == (0, 24, 0, 20)
    assert view_box((5, 4), 0.01) == (2, 3, 1, 2)  # at least one pixel
    _, label = phantom(0)  # liver rows 4-11, columns 3-9; spleen rows 14-19, columns 12-17 (z 2-3)
    # columns: 10 - 3 = 7 left of the centre, 18 - 10 = 8 right of it -> 16 of 20 = 0.8; rows need 16 of 24
    assert fov_needed(label) == pytest.approx(0.8)
    assert outside_view(label, 0.8) == 0
    assert outside_view(label, 0.75) == 6 * 2  # fov 0.75 keeps columns 2-16: the spleen's column 17 is cut
    assert fov_needed(np.zeros((2, 5, 5))) == 0.0


def test_plan_with_fov_by_hand_and_fit_sees_only_the_view():
    plan = SlicePlan.fit((40, 30), (1.5, 1.0), 32, fov=0.6)
    assert plan.crop == (8, 32, 6, 24)  # 24 rows from 8, 18 columns from 6
    # the view spans 36 x 18 mm: 36 mm over 32 pixels, so 18 mm takes 16 of them, centred
    assert plan.resized == (32, 16) and plan.pad == (0, 8)
    assert SlicePlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert "crop" not in SlicePlan.fit((40, 30), (1.5, 1.0), 32).to_dict()  # older plans read back the same
    volume = torch.zeros(2, 40, 30)
    volume[:, 8:32, 6:24] = torch.arange(24 * 18, dtype=torch.float32).reshape(24, 18) / 100
    volume[:, :8] = 50.0  # outside the view: must not reach the model's input
    fitted = fit_slices(volume, plan)
    inside = fitted[:, :, 8:24]
    assert float(inside.max()) < 4.4 and float(inside.min()) >= 0.0
    # columns resampled 18 -> 16 and rows 24 -> 32: the first row's mean is near the view's first values
    assert float(fitted[0, 0, 8:24].mean()) < 0.3


def test_unfit_returns_background_outside_the_view():
    plan = SlicePlan.fit((40, 30), (1.0, 1.0), 32, fov=0.5)
    top, bottom, left, right = plan.crop
    label = torch.zeros(1, 40, 30, dtype=torch.long)
    label[0, top + 3 : bottom - 4, left + 2 : right - 3] = 1
    one_hot = torch.nn.functional.one_hot(fit_slices(label, plan, is_label=True).long(), 2).permute(0, 3, 1, 2)
    logits = (one_hot.float() * 2 - 1) * 5
    back = unfit_logits(logits, plan)
    assert back.shape == (1, 2, 40, 30)
    assert (back.argmax(1) == label).float().mean() > 0.99
    outside = torch.ones(40, 30, dtype=torch.bool)
    outside[top:bottom, left:right] = False
    assert (back[0, 0][outside] == 0).all() and (back[0, 1][outside] == -1e4).all()
    probs = unfit_logits(logits.softmax(1), plan, probabilities=True)
    assert (probs[0, 0][outside] == 1).all() and (probs[0, 1][outside] == 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 30))


@pytest.mark.parametrize("bad", [0, 1.5, 0.05, "half"])
def test_fov_config_is_checked(tmp_path, bad):
    with pytest.raises(ConfigError, match="fov"):
        parse_experiment({"datasets": [{"path": str(tmp_path), "fov": bad}]})


def test_fov_round_trips_through_the_resolved_config(tmp_path):
    exp = parse_experiment({"datasets": [{"path": str(tmp_path), "fov": 0.7}, {"path": str(tmp_path / "b")}]})
    assert exp.datasets[0].fov == 0.7 and exp.datasets[1].fov == 1.0
    assert "fov" not in experiment_to_dict(exp)["datasets"][1]
    assert parse_experiment(experiment_to_dict(exp)).datasets == exp.datasets


def _config(data, fov):
    return parse_experiment({"datasets": [{"path": str(data), "name": "A", "modality": "CT", "fov": fov}],
                             "split": {"folds": 2}})  # fmt: skip


def test_prepare_refuses_a_fov_that_cuts_labels_and_zooms_in_otherwise(tmp_path):
    data = make_dataset(tmp_path / "ct", n=2)  # every case needs fov 0.8 (see above)
    with pytest.raises(DataError) as err:
        prepare(_config(data, 0.75), tmp_path / "cut", img_size=32, workers=1, progress=False)
    assert len(err.value.problems) == 2
    assert "case_000.nii.gz: 12 labelled voxels lie outside fov 0.75 of dataset A" in err.value.problems[0]
    assert "needs fov >= 0.800" in err.value.problems[0]
    assert not (tmp_path / "cut").exists()

    def build(fov):
        out = tmp_path / f"cache{fov}"
        prepare(_config(data, fov), out, img_size=32, workers=1, progress=False)
        return json.loads((out / "meta.json").read_text()), np.load(out / "labels.npy")

    meta_all, labels_all = build(1.0)
    meta_fov, labels_fov = build(0.8)
    assert meta_fov["datasets"][0]["fov"] == 0.8 and meta_all["datasets"][0]["fov"] == 1.0
    assert meta_fov["datasets"][0]["fingerprint"] != meta_all["datasets"][0]["fingerprint"]
    assert meta_fov["cases"][0]["plan"]["crop"] == [2, 21, 2, 18] and "crop" not in meta_all["cases"][0]["plan"]
    # 19 rows instead of 24 fill the 32 pixels: every organ covers (24 / 19)^2 = 1.6 times the pixels
    for organ in (1, 2):
        ratio = (labels_fov == organ).sum() / (labels_all == organ).sum()
        assert ratio == pytest.approx((24 / 19) ** 2, rel=0.12)


class BrightModel(M4oEUNet):
    """Stand-in for a trained model: 'liver' wherever the fitted slice is brighter than 0.5."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        x = image[:, 0]
        logits = torch.stack([torch.zeros_like(x), (x - 0.5) * 20, torch.full_like(x, -1e4)], dim=1)
        return (logits, []) if return_gates else logits


def _model(fov: float) -> BrightModel:
    names = ["background", "liver", "spleen"]
    model = BrightModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["MRI"], {"heart": names})
    info = {"modality": "MRI", "normalization": {"scheme": "none"}, "fov": fov,
            "label_values": {"background": 0, "liver": 3, "spleen": 1}}  # fmt: skip
    model.bundle_extra = {"datasets": {"heart": info}}
    return model


@pytest.mark.parametrize("tta", [False, True])
def test_prediction_sees_the_dataset_view_and_warns_at_its_edge(tmp_path, tta):
    bright = np.ones((3, 40, 30), np.float32)
    path = write_image(tmp_path / "all.nii.gz", bright)
    predictor = Predictor(_model(0.5), tta=tta)
    result = predictor.predict_volume(read_volume(path), "heart")
    top, bottom, left, right = view_box((40, 30), 0.5)
    expected = np.zeros((3, 40, 30), np.uint8)
    expected[:, top:bottom, left:right] = 3
    assert (result.labels == expected).all()  # the model's view is liver; outside it is background
    assert len(result.warnings) == 1 and "edge of the model's field of view" in result.warnings[0]
    # a modality-only request: the view its datasets share
    assert (predictor.predict_volume(read_volume(path), None, "MRI").labels > 0).sum() == (expected > 0).sum()

    organ = np.zeros((3, 40, 30), np.float32)
    organ[:, 16:24, 12:18] = 1.0
    small = predictor.predict_volume(read_volume(write_image(tmp_path / "small.nii.gz", organ)), "heart")
    assert small.warnings == []
    assert ((small.labels == 3) == (organ > 0.5)).mean() > 0.98
    # the same model without a view sees the whole slice
    whole = Predictor(_model(1.0), tta=tta).predict_volume(read_volume(path), "heart")
    assert (whole.labels == 3).all() and whole.warnings == []


def test_a_request_without_its_dataset_is_cut_only_where_the_datasets_agree():
    names = ["background", "liver", "spleen"]
    model = BrightModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["MRI", "CT"],
                        {"heart": names, "belly": names, "ct": names})  # fmt: skip
    info = {"normalization": {"scheme": "none"}, "label_values": {"background": 0, "liver": 1, "spleen": 2}}
    model.bundle_extra = {"datasets": {"heart": {**info, "modality": "MRI", "fov": 0.5},
                                       "belly": {**info, "modality": "MRI"},  # before fov existed: 1
                                       "ct": {**info, "modality": "CT", "fov": 0.7}}}  # fmt: skip
    predictor = Predictor(model)
    assert predictor.resolve("heart", None).fov == 0.5 and predictor.resolve("belly", None).fov == 1.0
    assert predictor.resolve(None, "MRI").fov == 1.0  # heart and belly disagree: nothing is cut
    assert predictor.resolve(None, "CT").fov == 0.7
