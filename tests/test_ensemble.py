"""Ensembles: ``predict -m A -m B`` against the mean of each model's own saved probabilities computed
here, ``m4oe ensemble`` of saved probabilities against predicting with both at once, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from m4oe import create_model, save_bundle
from m4oe.cli import app
from m4oe.data.postprocess import keep_largest_components

from .conftest import MICRO
from .data_helpers import write_image
from .test_predict import EXTRA, LABELS, l_shape

MIRRORED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def bundle(path, seed: int, labels=LABELS, extra=EXTRA, keep_largest=()):
    """A random model whose classes are not near-ties (logits spread as training spreads them)."""
    torch.manual_seed(seed)
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": labels}, **MICRO)
    with torch.no_grad():
        model.head.proj.weight.mul_(8)
    extra = {**extra, "postprocessing": {"keep_largest": {"phantom": list(keep_largest)}}}
    save_bundle(model, path, extra=extra)
    return path


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture
def scan(tmp_path):
    image = l_shape(shape=(4, 40, 36)) + np.random.default_rng(0).normal(0, 0.3, (4, 40, 36)).astype(np.float32)
    return write_image(tmp_path / "in" / "case_0000.nii.gz", image, spacing=(0.9, 1.2, 3.0), direction=MIRRORED)


def test_two_models_at_once_give_the_mean_of_their_own_probabilities(tmp_path, scan):
    a, b = bundle(tmp_path / "a", 0, keep_largest=["liver"]), bundle(tmp_path / "b", 1, keep_largest=["liver"])
    common = ["-i", scan, "--dataset", "phantom", "--probabilities"]
    for name, model in (("pa", a), ("pb", b)):
        assert run("predict", "-m", model, "-o", tmp_path / name, *common).exit_code == 0
    both = run("predict", "-m", a, "-m", b, "-o", tmp_path / "both", *common)
    assert both.exit_code == 0, both.output
    members = [np.load(tmp_path / name / "case_probabilities.npz") for name in ("pa", "pb")]
    mean = (members[0]["probabilities"].astype(np.float32) + members[1]["probabilities"].astype(np.float32)) / 2
    index = keep_largest_components(mean.argmax(0).astype(np.uint8), [1])  # both chose liver's largest part
    expected = np.asarray(members[0]["label_values"])[index]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "both" / "case.nii.gz")))
    singles = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n / "case.nii.gz"))) for n in ("pa", "pb")]
    assert not np.array_equal(singles[0], singles[1])  # the members disagree somewhere: a real ensemble
    assert np.array_equal(labels, expected)
    saved = np.load(tmp_path / "both" / "case_probabilities.npz")
    assert np.allclose(saved["probabilities"].astype(np.float32), mean, atol=1e-3)


def test_ensembling_saved_probabilities_later_gives_the_same_label_maps(tmp_path, scan):
    a, b = bundle(tmp_path / "a", 0, keep_largest=["liver"]), bundle(tmp_path / "b", 2)
    common = ["-i", scan, "--dataset", "phantom", "--probabilities"]
    for name, model in (("pa", a), ("pb", b)):
        assert run("predict", "-m", model, "-o", tmp_path / name, *common).exit_code == 0
    assert run("predict", "-m", a, "-m", b, "-o", tmp_path / "both", *common).exit_code == 0
    later = run("ensemble", tmp_path / "pa", tmp_path / "pb", "-o", tmp_path / "later", "--probabilities")
    assert later.exit_code == 0, later.output
    now, then = (sitk.ReadImage(str(tmp_path / f / "case.nii.gz")) for f in ("both", "later"))
    assert np.array_equal(sitk.GetArrayFromImage(now), sitk.GetArrayFromImage(then))
    assert now.GetDirection() == then.GetDirection() and now.GetSpacing() == then.GetSpacing()
    assert now.GetOrigin() == then.GetOrigin()
    kept = np.load(tmp_path / "later" / "case_probabilities.npz")["largest_only"].tolist()
    assert kept == []  # only one member chose the liver's largest component: the ensemble does not


def test_models_of_other_label_sets_are_refused_in_one_line(tmp_path, scan):
    a = bundle(tmp_path / "a", 0)
    other = {"datasets": {"phantom": {**EXTRA["datasets"]["phantom"],
                                      "label_values": {"background": 0, "liver": 6, "kidney": 1}}}}  # fmt: skip
    b = bundle(tmp_path / "b", 1, labels=["background", "liver", "kidney"], extra=other)
    result = run("predict", "-m", a, "-m", b, "-i", scan, "-o", tmp_path / "out", "--dataset", "phantom")
    assert result.exit_code == 1 and "cannot be ensembled" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_ensemble_refuses_folders_that_do_not_match(tmp_path, scan):
    a = bundle(tmp_path / "a", 0)
    assert run("predict", "-m", a, "-o", tmp_path / "pa", "-i", scan, "--dataset", "phantom", "--probabilities",
               ).exit_code == 0  # fmt: skip
    small = write_image(tmp_path / "in2" / "case_0000.nii.gz", l_shape(shape=(4, 30, 36)))
    assert run("predict", "-m", a, "-o", tmp_path / "pb", "-i", small, "--dataset", "phantom", "--probabilities",
               ).exit_code == 0  # fmt: skip
    result = run("ensemble", tmp_path / "pa", tmp_path / "pb", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "not the same scan" in result.output
    empty = run("ensemble", tmp_path / "pa", tmp_path / "in", "-o", tmp_path / "out")
    assert empty.exit_code == 1 and "no CASE_probabilities.npz" in empty.output
    assert not (tmp_path / "out").exists()
