"""Bad input: every problem found, each naming the file and what is wrong, and nothing written."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from m4oe.config import ConfigError, load_experiment
from m4oe.data.datasets import DataError
from m4oe.data.prepare import prepare

from .data_helpers import make_dataset, phantom, write_config, write_image


def run_prepare(tmp_path, root, **dataset):
    config = write_config(tmp_path / "exp.yaml", [{"path": str(root), "modality": "CT", **dataset}])
    out = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        prepare(load_experiment(config), out, img_size=32, workers=1, progress=False)
    assert not out.exists(), "nothing may be written when the check fails"
    assert not list(tmp_path.glob(".cache*")), "no temporary folder may be left behind"
    return str(info.value)


def test_clean_dataset_passes(tmp_path):
    root = make_dataset(tmp_path / "ds")
    config = write_config(tmp_path / "exp.yaml", [{"path": str(root), "modality": "CT"}])
    result = prepare(load_experiment(config), tmp_path / "cache", img_size=32, workers=1, progress=False)
    assert result.num_slices == 3 * 6


def test_shape_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_image(root / "labelsTr" / "case_001.nii.gz", np.zeros((6, 24, 21), np.uint8))
    msg = run_prepare(tmp_path, root)
    assert "case_001.nii.gz: shape (21, 24, 6) does not match image" in msg


def test_spacing_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_image(root / "labelsTr" / "case_002.nii.gz", phantom(2)[1], spacing=(1.0, 1.0, 3.0))
    msg = run_prepare(tmp_path, root)
    assert "case_002.nii.gz: geometry differs" in msg and "spacing" in msg


def test_orientation_mismatch(tmp_path):
    root = make_dataset(tmp_path / "ds")
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    write_image(root / "labelsTr" / "case_000.nii.gz", phantom(0)[1], direction=flipped)
    msg = run_prepare(tmp_path, root)
    assert "case_000.nii.gz: geometry differs" in msg and "direction" in msg


def test_unknown_label_value(tmp_path):
    root = make_dataset(tmp_path / "ds")
    label = phantom(1)[1]
    label[0, 0, 0] = 7
    write_image(root / "labelsTr" / "case_001.nii.gz", label)
    msg = run_prepare(tmp_path, root)
    assert "case_001.nii.gz: label values [7] are not in dataset.json" in msg


def test_missing_label_and_orphan_label(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    write_image(root / "labelsTr" / "case_009.nii.gz", phantom(9)[1])
    msg = run_prepare(tmp_path, root)
    assert "case_001.nii.gz: label file missing for image case_001_0000.nii.gz" in msg
    assert "case_009.nii.gz: label without an image" in msg


def test_nan_and_inf_voxels(tmp_path):
    root = make_dataset(tmp_path / "ds")
    image = phantom(0)[0].astype(np.float32)
    image[0, 0, :3] = [np.nan, np.inf, -np.inf]
    # SimpleITK's NIfTI writer and reader both alter non-finite values: write the file with nibabel
    nib.save(
        nib.Nifti1Image(image.transpose(2, 1, 0), np.diag([1.0, 1.0, 2.0, 1.0])),
        root / "imagesTr" / "case_000_0000.nii.gz",
    )
    msg = run_prepare(tmp_path, root)
    assert "case_000_0000.nii.gz: 3 NaN/Inf voxels" in msg


def test_non_3d_image(tmp_path):
    root = make_dataset(tmp_path / "ds")
    write_image(root / "imagesTr" / "case_002_0000.nii.gz", np.zeros((24, 20), np.int16))
    msg = run_prepare(tmp_path, root)
    assert "case_002_0000.nii.gz: expected a 3D image, got 2D" in msg


def test_truncated_file(tmp_path):
    root = make_dataset(tmp_path / "ds")
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:-200])  # ITK would read this silently, with garbage voxels
    msg = run_prepare(tmp_path, root)
    assert "case_001_0000.nii.gz: unreadable or truncated image" in msg


def test_garbage_file(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "labelsTr" / "case_000.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 10))
    msg = run_prepare(tmp_path, root)
    assert "case_000.nii.gz: unreadable or truncated image" in msg


def test_duplicate_case_ids_in_msd_list(tmp_path):
    root = make_dataset(tmp_path / "ds")
    meta = json.loads((root / "dataset.json").read_text())
    entry = {"image": "./imagesTr/case_000_0000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}
    meta["training"] = [entry, entry]
    (root / "dataset.json").write_text(json.dumps(meta))
    msg = run_prepare(tmp_path, root)
    assert "case_000_0000.nii.gz: duplicate case id 'case_000'" in msg


def test_all_problems_are_listed_at_once(tmp_path):
    root = make_dataset(tmp_path / "ds", n=4)
    write_image(root / "labelsTr" / "case_001.nii.gz", np.zeros((6, 24, 21), np.uint8))
    label = phantom(2)[1]
    label[0, 0, 0] = 9
    write_image(root / "labelsTr" / "case_002.nii.gz", label)
    (root / "labelsTr" / "case_003.nii.gz").unlink()
    msg = run_prepare(tmp_path, root)
    assert "(3)" in msg.splitlines()[0] or "(3):" in msg
    for name in ("case_001.nii.gz", "case_002.nii.gz", "case_003.nii.gz"):
        assert name in msg


def test_missing_dataset_json_and_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = run_prepare(tmp_path, tmp_path / "empty")
    assert "empty/dataset.json: missing" in msg
    msg = run_prepare(tmp_path, tmp_path / "nowhere")
    assert "nowhere: dataset folder not found" in msg


def test_label_map_must_name_known_labels(tmp_path):
    root = make_dataset(tmp_path / "ds")
    msg = run_prepare(tmp_path, root, label_map={"kidney": "organ"})
    assert "label_map names labels ['kidney']" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("datasets: []", "at least one dataset"),
        ("datasets: [{modality: CT}]", "'path' is required"),
        ("datasets: [{path: x, colour: red}]", "unknown keys ['colour']"),
        ("datasets: [{path: x, normalization: zscore}]", "normalization must be one of"),
        ("datasets: [{path: x, weight: -1}]", "weight must be positive"),
        ("datasets: [{path: x}]\nsplit: {folds: 3, fold: 3}", "split.fold must be in [0, 3)"),
        ("datasets: [{path: x}]\nmodel: {img_size: 100}", "img_size 100 does not fit"),
        ("datasets: [{path: x}]\nmodel: {depth: 3}", "model: unknown keys ['depth']"),
        ("datasets: {path: x}", "datasets must be list"),
        ("datasets: [{path: x}]\ntrain: {epoch: 3}", "train: unknown keys ['epoch']"),
        ("datasets: [{path: x}]\ntrain: {amp: fp16}", "train.amp must be one of ('auto', 'fp32', 'bf16')"),
        ("datasets: [{path: x}]\ntrain: {amp: on}", "train.amp must be one of ('auto', 'fp32', 'bf16'), got 'on'"),
        ("datasets: [{path: x}]\ntrain: {dice: present}", "train.dice must be one of ('sample', 'batch', 'batch_pres"),
        ("datasets: [{path: x}]\ntrain: {foreground_sampling: organ}", "sampling must be one of ('any', 'class')"),
        ("datasets: [{path: x}]\n  bad: [", "not valid YAML"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, text, expected):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_bare_yaml_off_is_the_word_off(tmp_path):
    # YAML 1.1 reads `amp: off` as false; the user wrote the word the docs give
    path = tmp_path / "exp.yaml"
    path.write_text("datasets: [{path: x}]\ntrain: {amp: off, compile: off}\n")
    training = load_experiment(path).training
    assert (training.amp, training.compile) == ("fp32", "off")  # amp's "off" is fp32, the one precision word
    path.write_text("datasets: [{path: x}]\ntrain: {compile: on}\n")
    assert load_experiment(path).training.compile == "on"
