"""Prediction: exact geometry out (any orientation, DICOM in), label numbers, bad inputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from m4oe import create_model, load_bundle, save_bundle
from m4oe.cli import app
from m4oe.config import ModelConfig
from m4oe.data.io import Geometry, read_volume
from m4oe.files import mark_output_dir
from m4oe.infer import files, predict
from m4oe.infer.files import collect_inputs, output_name, predict_paths
from m4oe.infer.predict import CPU_BATCH, PredictError, Predictor, inference_dtype
from m4oe.model.swin_unet import M4oEUNet

from .conftest import MICRO, SHARED_DATA
from .data_helpers import write_image

LABELS = ["background", "liver", "spleen"]
EXTRA = {"datasets": {"phantom": {"modality": "CT", "normalization": {"scheme": "none"},
                                  "label_values": {"background": 0, "liver": 6, "spleen": 1}}}}  # fmt: skip


class ThresholdModel(M4oEUNet):
    """Stand-in for a trained model: 'liver' wherever the (fitted) slice is brighter than 0.5."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        x = image[:, 0]
        logits = torch.stack([torch.zeros_like(x), (x - 0.5) * 20, torch.full_like(x, -1e4)], dim=1)
        return (logits, []) if return_gates else logits


def threshold_model() -> ThresholdModel:
    model = ThresholdModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT"], {"phantom": LABELS})
    model.bundle_extra = EXTRA
    return model


def l_shape(shape=(7, 40, 30)) -> np.ndarray:
    image = np.zeros(shape, np.float32)
    image[1:6, 5:35, 4:10] = 1.0  # vertical bar on the left
    image[1:6, 28:35, 4:25] = 1.0  # foot to the right, at the bottom
    return image


@pytest.mark.parametrize(
    "direction",
    [
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # RAS, as ACDC
        (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # axes swapped and z flipped
    ],
)
def test_prediction_keeps_geometry_and_anatomy(tmp_path, direction):
    image = l_shape()
    path = write_image(tmp_path / "in" / "case_0000.nii.gz", image, spacing=(0.8, 1.3, 3.0), direction=direction,
                       origin=(10.0, -20.0, 5.0))  # fmt: skip
    report = predict_paths(Predictor(threshold_model()), [path], tmp_path / "out", dataset="phantom", progress=False)
    assert report.failed == []
    out = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
    source = sitk.ReadImage(str(path))
    assert out.GetSize() == source.GetSize()
    assert Geometry.of(out).mismatch(Geometry.of(source), tol=1e-6) is None
    labels = sitk.GetArrayFromImage(out)
    assert set(np.unique(labels)) <= {0, 6}  # the dataset's own label number for liver
    agreement = ((labels == 6) == (image > 0.5)).mean()
    assert agreement > 0.985, agreement  # only resampled edges may differ; a flip would break it


@pytest.mark.slow
@pytest.mark.shared_data
def test_dicom_series_input(tmp_path):
    series = SHARED_DATA / "samples" / "totalsegmentator" / "ct_dicom_20slices"
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    model.bundle_extra = EXTRA
    inputs = collect_inputs(series)
    assert inputs == [series]
    report = predict_paths(Predictor(model), inputs, tmp_path, dataset="phantom", progress=False)
    assert report.failed == [] and report.written == [tmp_path / "ct_dicom_20slices.nii.gz"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reference = reader.Execute()
    out = sitk.ReadImage(str(report.written[0]))
    assert out.GetSize() == reference.GetSize() == (512, 512, 20)
    assert Geometry.of(out).mismatch(Geometry.of(reference), tol=1e-6) is None
    assert set(report.experts[str(series)]) == {"CT"}


def test_one_corrupt_file_does_not_stop_the_others(tmp_path):
    for name in ("a_0000.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz"):
        write_image(tmp_path / "in" / name, l_shape())
    bad = tmp_path / "in" / "b_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:-100])
    report = predict_paths(Predictor(threshold_model()), collect_inputs(tmp_path / "in"), tmp_path / "out",
                           dataset="phantom", progress=False)  # fmt: skip
    assert [p.name for p in report.written] == ["a.nii.gz", "c.nii.gz"]
    assert len(report.failed) == 1 and report.failed[0][0] == bad
    assert "b_0000.nii.gz: unreadable or truncated" in report.failed[0][1]
    assert not (tmp_path / "out" / "b.nii.gz").exists()


def test_unknown_dataset_modality_or_missing_statistics():
    predictor = Predictor(threshold_model())
    with pytest.raises(PredictError, match=r"unknown dataset 'BTCV'; this model knows \['phantom'\]"):
        predictor.resolve("BTCV", None)
    with pytest.raises(PredictError, match=r"unknown modality 'PET'"):
        predictor.resolve(None, "PET")
    bare = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    with pytest.raises(PredictError, match="no normalisation statistics"):
        Predictor(bare).resolve("phantom", None)


def test_union_vocabulary_without_dataset():
    request = Predictor(threshold_model()).resolve(None, "CT")
    assert request.values == [0, 1, 2] and request.dataset is None


def test_cli_predict_reports_bad_file_and_bad_request(tmp_path):
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    save_bundle(model, tmp_path / "bundle", extra=EXTRA)
    write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape(shape=(3, 20, 20)))
    (tmp_path / "in" / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    runner = CliRunner()
    args = ["predict", "-m", str(tmp_path / "bundle"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--dataset", "phantom"])
    assert result.exit_code == 1
    assert "broken_0000.nii.gz" in result.output and "1 label maps written" in result.output
    assert (tmp_path / "out" / "a.nii.gz").is_file()
    wrong = runner.invoke(app, [*args, "--dataset", "BTCV"])
    assert wrong.exit_code == 1 and "unknown dataset 'BTCV'" in wrong.output


def test_output_names():
    from pathlib import Path

    assert output_name(Path("x/case_0000.nii.gz")) == "case.nii.gz"
    assert output_name(Path("x/scan.mha")) == "scan.nii.gz"


def test_one_precision_vocabulary_with_one_meaning_of_auto(monkeypatch):
    from m4oe.config import TrainConfig
    from m4oe.train.runtime import autocast_factory

    monkeypatch.setattr(predict, "cpu_has_bf16", lambda: True)  # even where a CPU has native bf16
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for precision, on_cpu, on_cuda in (("auto", False, True), ("fp32", False, False), ("bf16", True, True)):
        assert inference_dtype(precision, cpu) == (torch.bfloat16 if on_cpu else torch.float32)
        assert inference_dtype(precision, cuda) == (torch.bfloat16 if on_cuda else torch.float32)
        trains_bf16 = isinstance(autocast_factory(cpu, TrainConfig(amp=precision).amp)(), torch.autocast)
        assert trains_bf16 == on_cpu
    assert TrainConfig(amp="off").amp == "fp32"  # the training word of earlier configs
    with pytest.raises(PredictError, match=r"precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"):
        Predictor(threshold_model(), "cpu", precision="fp16")


def test_bf16_prediction_agrees_with_fp32(tmp_path):
    """bf16 weights and activations: the same classes except near-ties, probabilities close."""
    torch.manual_seed(0)
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    with torch.no_grad():  # a random model's classes are near-ties: spread the logits as training does
        model.head.proj.weight.mul_(5)
    model.bundle_extra = EXTRA
    save_bundle(model, tmp_path / "bundle", extra=EXTRA)
    path = write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape(shape=(4, 48, 40)))
    outputs = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(load_bundle(tmp_path / "bundle"), "cpu", precision=precision)
        expected = torch.float32 if precision == "fp32" else torch.bfloat16
        assert {p.dtype for p in predictor.model.parameters()} == {expected}
        report = predict_paths(predictor, [path], tmp_path / precision, dataset="phantom", probabilities=True,
                               progress=False)  # fmt: skip
        assert report.failed == []
        outputs[precision] = np.load(tmp_path / precision / "a_probabilities.npz")["probabilities"].astype(np.float32)
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    diff = np.abs(fp32 - bf16)
    assert diff.mean() < 0.005 and np.quantile(diff, 0.99) < 0.03
    top2 = np.sort(fp32, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 0.05  # voxels whose class is not a near-tie
    assert clear.mean() > 0.5
    assert (fp32.argmax(0) == bf16.argmax(0))[clear].all()


def test_cli_predict_rejects_unknown_precision(tmp_path):
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    save_bundle(model, tmp_path / "bundle", extra=EXTRA)
    write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape(shape=(3, 20, 20)))
    args = ["predict", "-m", str(tmp_path / "bundle"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--dataset", "phantom", "--precision", "fp16"])
    assert result.exit_code == 1 and "precision must be one of" in result.output
    assert not (tmp_path / "out").exists()


def test_batch_size_default_and_independence(tmp_path):
    """The CPU default batch, a bad batch size, and the same labels whatever the batch."""
    assert Predictor(threshold_model(), "cpu").batch_size == CPU_BATCH
    with pytest.raises(PredictError, match="batch size must be at least 1, got 0"):
        Predictor(threshold_model(), "cpu", batch_size=0)
    torch.manual_seed(0)
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    with torch.no_grad():
        model.head.proj.weight.mul_(5)
    model.bundle_extra = EXTRA
    volume = np.random.default_rng(0).normal(0.5, 0.3, (11, 40, 30)).astype(np.float32)
    path = write_image(tmp_path / "in" / "a_0000.nii.gz", volume)
    labels = {}
    for batch in (1, 4, 16):
        predict_paths(Predictor(model, "cpu", batch, precision="fp32"), [path], tmp_path / str(batch),
                      dataset="phantom", progress=False)  # fmt: skip
        labels[batch] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / str(batch) / "a.nii.gz")))
    assert len(np.unique(labels[1])) > 1  # a map with more than one class, so the comparison means something
    for batch in (4, 16):  # equal up to float rounding at a near-tie, which other CPUs' kernels may round differently
        assert (labels[batch] == labels[1]).mean() >= 0.999


def test_nan_image_is_reported_by_the_check_beside_the_read(tmp_path):
    """nibabel's check runs on its own thread next to SimpleITK's read; its finding still stops the file."""
    good = write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape())
    image = l_shape()
    image[2, 10, 10] = np.nan
    bad = write_image(tmp_path / "in" / "b_0000.nii.gz", image)
    report = predict_paths(Predictor(threshold_model()), [good, bad], tmp_path / "out", dataset="phantom",
                           progress=False)  # fmt: skip
    assert [p.name for p in report.written] == ["a.nii.gz"]
    assert [(p, "b_0000.nii.gz: 1 NaN/Inf voxels" in why) for p, why in report.failed] == [(bad, True)]
    assert not (tmp_path / "out" / "b.nii.gz").exists()


def test_folder_pipeline_reads_ahead_writes_behind_and_reports_in_order(tmp_path, monkeypatch):
    """Volumes are read on a background thread at most one ahead; a write failure is that file's alone."""
    names = ["a", "b", "c", "d", "e"]
    inputs = [write_image(tmp_path / "in" / f"{n}_0000.nii.gz", l_shape()) for n in names]
    mark_output_dir(tmp_path / "out", "predictions")  # an earlier predictions folder, replaced with --overwrite
    (tmp_path / "out" / "c.nii.gz").mkdir(parents=True)  # c's result cannot be written: a folder is in the way
    events, lock = [], threading.Lock()
    real_read, real_predict = files.read_volume, Predictor.predict_volume

    def read(path):
        with lock:
            events.append(("read", path.name[0], threading.current_thread().name))
        return real_read(path)

    def predict_volume(self, volume, *args, **kwargs):
        with lock:
            events.append(("predict", None, threading.current_thread().name))
        return real_predict(self, volume, *args, **kwargs)

    monkeypatch.setattr(files, "read_volume", read)
    monkeypatch.setattr(Predictor, "predict_volume", predict_volume)
    report = predict_paths(Predictor(threshold_model()), inputs, tmp_path / "out", dataset="phantom", progress=False,
                           overwrite=True)  # fmt: skip
    assert [p.name for p in report.written] == ["a.nii.gz", "b.nii.gz", "d.nii.gz", "e.nii.gz"]
    assert [(p.name, "c.nii.gz" in why) for p, why in report.failed] == [("c_0000.nii.gz", True)]
    reads = [e for e in events if e[0] == "read"]
    assert [e[1] for e in reads] == names and all(e[2].startswith("m4oe-read") for e in reads)
    assert all(e[2] == threading.main_thread().name for e in events if e[0] == "predict")
    for k in range(len(names)):  # volume k + 2 is not read before volume k has been predicted
        predicted = [i for i, e in enumerate(events) if e[0] == "predict"][k]
        if k + 2 < len(names):
            assert events.index(("read", names[k + 2], reads[k + 2][2])) > predicted
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "e.nii.gz")))
    assert ((labels == 6) == (l_shape() > 0.5)).mean() > 0.985  # the last result is the last volume's


class SideModel(M4oEUNet):
    """Stand-in for a model trained without flips: names organs by the side of the slice they lie on
    (canonical x: the patient's right is on the low side), as position-bound models do."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        x = image[:, 0]
        right_side = (torch.arange(x.shape[-1]) < x.shape[-1] // 2).to(x.dtype).expand_as(x)
        organ = (x > 0.5).to(x.dtype)
        logits = torch.stack([1 - organ, organ * right_side * 2, organ * (1 - right_side) * 2], dim=1) * 10
        return (logits, []) if return_gates else logits


def test_flip_tta_swaps_left_and_right_classes(tmp_path):
    from m4oe.infer.engine import mirror_permutation

    names = ["background", "right_kidney", "left_kidney"]
    assert mirror_permutation(names) == [0, 2, 1]
    assert mirror_permutation(["background", "liver", "myocardium"]) == [0, 1, 2]
    model = SideModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT"], {"phantom": names})
    model.bundle_extra = {"datasets": {"phantom": {"modality": "CT", "normalization": {"scheme": "none"},
                                                   "label_values": {"background": 0, "right_kidney": 2,
                                                                    "left_kidney": 3}}}}  # fmt: skip
    image = np.zeros((3, 32, 32), np.float32)
    image[:, 10:20, 3:10] = 1.0  # an organ on the low-x side of the canonical slice
    image[:, 10:20, 22:29] = 1.0  # and its partner on the high-x side
    path = write_image(tmp_path / "in" / "case_0000.nii.gz", image, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    plain = Predictor(model).predict_volume(read_volume(path), "phantom").labels
    mirrored = Predictor(model, tta=True).predict_volume(read_volume(path), "phantom").labels
    assert set(np.unique(plain)) == {0, 2, 3} and (plain == mirrored).all()


def test_non_orthogonal_direction_is_kept_exactly_in_metaimage(tmp_path):
    sheared = (1.0, 0.0, 0.0, 0.2, 1.0, 0.0, 0.0, 0.0, 1.0)  # not a rotation: NIfTI cannot store it
    path = write_image(tmp_path / "in" / "case_0000.mha", l_shape(), direction=sheared)
    report = predict_paths(Predictor(threshold_model()), [path], tmp_path / "out", dataset="phantom", progress=False)
    assert [p.name for p in report.written] == ["case.mha"]
    out = sitk.ReadImage(str(report.written[0]))
    assert np.allclose(out.GetDirection(), sheared, atol=1e-9)
    upright = write_image(tmp_path / "in2" / "other_0000.mha", l_shape())
    assert predict_paths(Predictor(threshold_model()), [upright], tmp_path / "out", dataset="phantom",
                         progress=False).written[0].name == "other.nii.gz"  # fmt: skip


def test_a_ct_given_to_an_mri_model_is_warned_about(tmp_path):
    model = threshold_model()
    mri_scheme = {"scheme": "mri", "percentiles": [0.5, 99.5]}
    model.bundle_extra = {"datasets": {"phantom": {**EXTRA["datasets"]["phantom"], "normalization": mri_scheme}}}
    ct = np.full((6, 40, 30), -1000.0, np.float32)  # air around a body of soft tissue
    ct[:, 10:30, 8:22] = 40.0
    mri = np.abs(ct) / 10
    predictor = Predictor(model)
    ct_path = write_image(tmp_path / "ct_0000.nii.gz", ct)
    mri_path = write_image(tmp_path / "mri_0000.nii.gz", mri)
    report = predict_paths(predictor, [ct_path, mri_path], tmp_path / "out", dataset="phantom", progress=False)
    assert [p for p, _ in report.warnings] == [ct_path]
    assert "looks like a CT" in report.warnings[0][1] and len(report.written) == 2


def test_rotate_slices_matches_rot90_and_undoes_itself():
    from m4oe.infer.engine import rotate_slices

    x = torch.randn(2, 3, 12, 12)
    for degrees, k in ((90, 1), (-90, -1), (180, 2)):  # positive: counter-clockwise as displayed (row 0 on top)
        assert torch.allclose(rotate_slices(x, degrees), torch.rot90(x, k, dims=(-2, -1)), atol=1e-5)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 1, 6, 6), size=(48, 48), mode="bicubic")
    back = rotate_slices(rotate_slices(smooth, 10), -10)
    inner = (slice(None), slice(None), slice(12, 36), slice(12, 36))  # away from the corners rotated out
    assert (back - smooth)[inner].abs().max() < 0.05 * smooth.abs().max()
    assert rotate_slices(x.bfloat16(), 90).dtype == torch.bfloat16


class PlaceModel(M4oEUNet):
    """Stand-in for a position-bound model: 'liver' in a fixed, asymmetric part of its input."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        liver = torch.full(image.shape[-2:], -20.0)
        liver[:20, :40] = liver[50:, :10] = 20.0
        liver = liver.expand(image.shape[0], *liver.shape).to(image.dtype)
        logits = torch.stack([torch.zeros_like(liver), liver, torch.full_like(liver, -1e4)], dim=1)
        return (logits, []) if return_gates else logits


@pytest.mark.slow
def test_rotation_tta_maps_every_view_back_before_averaging(tmp_path):
    # a pointwise model is rotation- and mirror-equivariant: with exact (90 degree) views every view
    # agrees once mapped back, so TTA changes no probability; one mapped back the wrong way would
    path = write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape(shape=(3, 64, 64)))
    plain = Predictor(threshold_model()).predict_volume(read_volume(path), "phantom", probabilities=True)
    assert (plain.labels == 6).sum() > 100
    for tta in (False, True):
        predictor = Predictor(threshold_model(), tta=tta, rotations=(90,))
        rotated = predictor.predict_volume(read_volume(path), "phantom", probabilities=True)
        assert (rotated.labels == plain.labels).all()
        difference = rotated.probabilities.astype(np.float32) - plain.probabilities.astype(np.float32)
        assert np.abs(difference).max() < 0.01, tta
    # a position-bound model: each view's answer, mapped back with rot90 / flip (reference), averaged
    model = PlaceModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT"], {"phantom": LABELS})
    model.bundle_extra = EXTRA
    place = model(torch.zeros(1, 1, 64, 64)).softmax(1)[0, 1]  # [64, 64], 0 or 1
    views = {False: [place, torch.rot90(place, -1), torch.rot90(place, 1)]}  # plain, +90 and -90 mapped back
    views[True] = views[False] + [torch.rot90(v.flip(-1), k) for v, k in ((place, 0), (place, -1), (place, 1))]
    for tta, maps in views.items():
        predictor = Predictor(model, tta=tta, rotations=(90,))
        liver = predictor.predict_volume(read_volume(path), "phantom", probabilities=True).probabilities[1]
        expected = torch.stack(maps).mean(0).numpy()  # the file's 64 x 64 grid is the model's grid
        assert len(np.unique(expected.round(3))) >= 3
        assert np.allclose(liver.astype(np.float32), expected[None], atol=0.01), tta


@pytest.mark.slow
def test_cli_predict_rejects_bad_rotation_angles(tmp_path):
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    save_bundle(model, tmp_path / "bundle", extra=EXTRA)
    write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape(shape=(3, 20, 20)))
    args = ["predict", "-m", str(tmp_path / "bundle"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")]
    for value, message in (("ten", "give angles in degrees separated by commas"), ("10,0", "must be in (0, 180]")):
        result = CliRunner().invoke(app, [*args, "--dataset", "phantom", "--tta-rotate", value])
        assert result.exit_code == 1 and f"--tta-rotate '{value}'" in result.output and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    ok = CliRunner().invoke(app, [*args, "--dataset", "phantom", "--tta-rotate", "10,20"])
    assert ok.exit_code == 0 and (tmp_path / "out" / "a.nii.gz").is_file()
