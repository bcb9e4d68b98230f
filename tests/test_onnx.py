"""ONNX: exports (soft and hard routing, both backbones) checked with onnxruntime against PyTorch on
random and phantom slices; ``predict --engine onnx`` against ``predict``; the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from m4oe import create_model, load_bundle, save_bundle
from m4oe.cli import app
from m4oe.infer.predict import PredictError, Predictor

from .data_helpers import write_image
from .test_predict import EXTRA, LABELS, l_shape

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.slow  # each export takes seconds

SMALL = {
    "m4oe-convnext-s": {"img_size": 32, "embed_dim": 8, "depths": (1, 1, 1), "kernel_size": 3},
    "tiny": {"img_size": 64, "embed_dim": 16, "num_heads": (1, 2, 2, 4), "window_size": 2},
}


def bundle(path, preset="m4oe-convnext-s", seed=0):
    torch.manual_seed(seed)
    model = create_model(preset, modalities=["CT", "MRI"], label_sets={"phantom": LABELS}, **SMALL[preset])
    with torch.no_grad():  # logits spread as training spreads them, so label maps are not ties
        model.head.proj.weight.mul_(8)
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 0.5)  # a gate that mixes the two experts unevenly
    extra = {"datasets": {"phantom": {**EXTRA["datasets"]["phantom"], "modality": "CT"}}}
    save_bundle(model, path, extra=extra)
    return path


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("preset", ["m4oe-convnext-s", "tiny"])
@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_an_export_answers_as_pytorch_does(tmp_path, preset, routing):
    from m4oe.infer.onnx import _Request, export_onnx, max_difference

    model = load_bundle(bundle(tmp_path / "b", preset))
    size = model.config.img_size
    done = export_onnx(model, tmp_path / "m.onnx", "phantom", "CT", routing)  # checked on random slices
    assert done["meta"]["routing"] == routing and done["meta"]["modality"] == "CT"
    assert done["max_abs_diff"] < 1e-4
    image = torch.from_numpy(l_shape(shape=(3, size, size)))[:, None]  # and on phantom slices, 3 in a batch
    request = _Request(model, 0, 0).eval()
    assert max_difference(request, tmp_path / "m.onnx", image) < 1e-4


def test_predict_through_onnxruntime_gives_predicts_label_maps(tmp_path):
    model = bundle(tmp_path / "b")
    scan = write_image(tmp_path / "in" / "case_0000.nii.gz", l_shape(shape=(4, 40, 36)), spacing=(0.9, 1.2, 3.0))
    common = ["-m", model, "-i", scan, "--dataset", "phantom", "--probabilities"]
    assert run("predict", *common, "-o", tmp_path / "torch").exit_code == 0
    exported = run("export", "-m", model, "-o", tmp_path / "m.onnx", "--dataset", "phantom")
    assert exported.exit_code == 0 and "largest |logit difference|" in exported.output, exported.output
    result = run("predict", *common, "-o", tmp_path / "onnx", "--engine", "onnx", "--onnx", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f / "case.nii.gz"))) for f in ("torch", "onnx"))
    assert np.array_equal(a, b)
    pa, pb = (np.load(tmp_path / f / "case_probabilities.npz")["probabilities"] for f in ("torch", "onnx"))
    assert np.abs(pa.astype(np.float32) - pb.astype(np.float32)).max() < 2e-3  # float16 storage


def test_an_export_for_another_model_or_request_is_refused(tmp_path):
    first, second = bundle(tmp_path / "a", seed=0), bundle(tmp_path / "b", seed=1)
    assert run("export", "-m", first, "-o", tmp_path / "a.onnx", "--dataset", "phantom").exit_code == 0
    scan = write_image(tmp_path / "in" / "case_0000.nii.gz", l_shape(shape=(2, 32, 32)))
    other = run("predict", "-m", second, "-i", scan, "-o", tmp_path / "out", "--dataset", "phantom",
                "--engine", "onnx", "--onnx", tmp_path / "a.onnx")  # fmt: skip
    assert other.exit_code == 1 and "exported from another model" in other.output
    hard = run("predict", "-m", first, "-i", scan, "-o", tmp_path / "out", "--dataset", "phantom", "--routing", "hard",
               "--engine", "onnx", "--onnx", tmp_path / "a.onnx")  # fmt: skip
    assert hard.exit_code == 1 and "exported for modality None, but this request has 'CT'" in hard.output
    assert not (tmp_path / "out").exists()  # refused before any file was read or written
    with pytest.raises(PredictError, match="runs in fp32"):
        Predictor(load_bundle(first), engine="onnx", precision="bf16")
    with pytest.raises(PredictError, match="use one of torch, onnx"):
        Predictor(load_bundle(first), engine="tensorrt")
    assert run("export", "-m", first, "-o", tmp_path / "x.txt").exit_code == 1
