"""Uncertainty maps (``predict --uncertainty``): entropy and disagreement against a hand computation,
the maps and the per-structure scores rising on a corrupted scan, and an ensemble's maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.config import ModelConfig
from m4oe.infer.files import predict_paths
from m4oe.infer.predict import Predictor
from m4oe.infer.uncertainty import disagreement, normalised_entropy

from .conftest import MICRO
from .data_helpers import write_image
from .test_predict import EXTRA, LABELS, ThresholdModel, l_shape


def test_entropy_and_disagreement_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])[:, :, None]  # two voxels, three classes
    assert normalised_entropy(p)[:, 0].tolist() == pytest.approx([math.log(2) / math.log(3), 0.0], abs=1e-6)
    a, b = torch.tensor([[0.9, 0.1]])[..., None], torch.tensor([[0.1, 0.9]])[..., None]
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q)) / math.log(2)  # noqa: E731
    assert disagreement([a, b]).item() == pytest.approx(1.0 - h(0.9), abs=1e-6)  # H(mean) = 1 for the mean 0.5
    assert disagreement([a, a]).item() == pytest.approx(0.0, abs=1e-6)


class TwoExperts(ThresholdModel):
    """Two experts that threshold the slice at 0.3 (CT) and 0.7 (MRI); the gate mixes them evenly."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        x = image[:, 0]
        routing = routing or self.config.routing
        thresholds = [0.3, 0.7] if routing != "hard" or modality is None else [[0.3, 0.7][int(modality)]]
        liver = torch.stack([(x - t) * 20 for t in thresholds]).mean(0)
        logits = torch.stack([torch.zeros_like(x), liver, torch.full_like(x, -1e4)], dim=1)
        return (logits, []) if return_gates else logits

    def gate_names(self):
        return ["block0"]


def two_experts():
    model = TwoExperts(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT", "MRI"], {"phantom": LABELS})
    model.bundle_extra = EXTRA
    return model


def test_maps_and_scores_rise_on_a_corrupted_scan(tmp_path):
    clean = l_shape(shape=(4, 40, 30))
    noisy = clean + np.random.default_rng(0).normal(0, 0.25, clean.shape).astype(np.float32)
    scores = {}
    for name, image in (("clean", clean), ("noisy", noisy)):
        path = write_image(tmp_path / name / "case_0000.nii.gz", image, spacing=(0.8, 1.1, 3.0))
        report = predict_paths(Predictor(two_experts()), [path], tmp_path / f"out_{name}", dataset="phantom",
                               progress=False, statistics=True, uncertainty=True)  # fmt: skip
        assert report.failed == []
        out = tmp_path / f"out_{name}"
        entropy = sitk.ReadImage(str(out / "case_entropy.nii.gz"))
        assert entropy.GetSpacing() == pytest.approx((0.8, 1.1, 3.0)) and entropy.GetSize() == (30, 40, 4)
        maps = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"case_{k}.nii.gz")))
                for k in ("entropy", "disagreement")}  # fmt: skip
        assert all(0 <= m.min() and m.max() <= 1 + 1e-6 for m in maps.values())
        scores[name] = json.loads((out / "case_statistics.json").read_text())["structures"]["liver"]
        scores[name]["maps"] = maps
    for kind in ("entropy", "disagreement"):
        assert scores["noisy"][f"{kind}_mean"] > 2 * scores["clean"][f"{kind}_mean"] + 0.01, kind
    # where the clean scan is far from both thresholds (0 or 1), the experts agree (but at the blurred edges)
    assert scores["clean"]["maps"]["disagreement"][clean == 0].mean() < 0.01


def test_an_ensembles_maps_come_from_its_members(tmp_path):
    from m4oe.infer.ensemble import EnsemblePredictor

    path = write_image(tmp_path / "in" / "case_0000.nii.gz", l_shape(shape=(3, 32, 32)) * 0.5)  # 0.5: unsure
    low = ThresholdModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT"], {"phantom": LABELS})
    low.bundle_extra = EXTRA
    high = two_experts()
    ensemble = EnsemblePredictor([Predictor(low), Predictor(high, routing="hard")])  # thresholds 0.5 and 0.3
    report = predict_paths(ensemble, [path], tmp_path / "out", dataset="phantom", progress=False, uncertainty=True,
                           probabilities=True)  # fmt: skip
    assert report.failed == []
    spread = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_disagreement.nii.gz")))
    entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_entropy.nii.gz")))
    assert spread.max() > 0.05 and entropy.max() > 0.5
    mean = np.load(tmp_path / "out" / "case_probabilities.npz")["probabilities"].astype(np.float32)
    expected = normalised_entropy(torch.from_numpy(mean), dim=0).numpy()
    assert np.allclose(entropy, expected, atol=2e-3)  # the entropy of the members' mean


def test_a_real_mixture_of_experts_model_gives_both_maps_and_keeps_its_labels(tmp_path):
    from m4oe import create_model

    torch.manual_seed(0)
    model = create_model("tiny", modalities=["CT", "MRI"], label_sets={"phantom": LABELS}, **MICRO)
    with torch.no_grad():
        model.head.proj.weight.mul_(8)
    model.bundle_extra = EXTRA
    path = write_image(tmp_path / "in" / "case_0000.nii.gz", l_shape(shape=(3, 40, 30)))
    predict_paths(Predictor(model), [path], tmp_path / "plain", dataset="phantom", progress=False)
    predict_paths(Predictor(model), [path], tmp_path / "maps", dataset="phantom", progress=False, uncertainty=True)
    labels = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / "case.nii.gz"))) for f in ("plain", "maps")]
    assert np.array_equal(*labels)  # the expert views do not change the prediction
    assert model.config.routing == "soft"  # and the model is left as it was
    spread = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "maps" / "case_disagreement.nii.gz")))
    assert spread.max() > 0  # two random experts disagree somewhere


def test_a_hard_trained_model_gives_the_entropy_alone(tmp_path):
    from m4oe import create_model

    torch.manual_seed(0)
    model = create_model("tiny", modalities=["CT", "MRI"], label_sets={"phantom": LABELS}, **MICRO)
    model.set_routing("hard")  # as the reference recipe trains it
    model.bundle_extra = EXTRA
    path = write_image(tmp_path / "in" / "case_0000.nii.gz", l_shape(shape=(3, 40, 30)))
    predict_paths(Predictor(model), [path], tmp_path / "maps", dataset="phantom", progress=False, uncertainty=True)
    assert (tmp_path / "maps" / "case_entropy.nii.gz").is_file()
    assert not (tmp_path / "maps" / "case_disagreement.nii.gz").exists()
