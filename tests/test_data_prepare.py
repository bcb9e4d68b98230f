"""`prepare` on a small subset of each real dataset in ../shared/data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.config import parse_experiment
from m4oe.data.io import Geometry, read_volume
from m4oe.data.normalize import normalize
from m4oe.data.prepare import prepare
from m4oe.data.resample import SlicePlan, fit_slices, unfit_logits

from .conftest import SHARED_DATA

SIZE = 64


def small_config(**extra):
    return parse_experiment(
        {
            "datasets": [
                {"path": str(SHARED_DATA / "Dataset001_BTCV"), "name": "BTCV", "modality": "CT", "max_cases": 2},
                {"path": str(SHARED_DATA / "Dataset002_CHAOS_T2"), "name": "CHAOS", "modality": "MRI", "max_cases": 2},
                {
                    "path": str(SHARED_DATA / "Dataset003_ACDC"),
                    "name": "ACDC",
                    "modality": "cineMRI",
                    "max_cases": 4,
                    "split": {"folds": 2, "group_pattern": r"patient\d+"},
                },
            ],
            **extra,
        }
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "cache"
    result = prepare(small_config(), out, img_size=SIZE, workers=1, progress=False)
    return out, result, json.loads((out / "meta.json").read_text())


@pytest.mark.slow
@pytest.mark.shared_data
def test_slice_counts_match_the_volumes(cache):
    out, result, meta = cache
    expected = 0
    for case in meta["cases"]:
        size = sitk.ReadImage(case["image"]).GetSize()
        assert case["num_slices"] == size[2]  # all three datasets are stored axially
        expected += size[2]
    assert result.num_slices == expected == np.load(out / "images.npy", mmap_mode="r").shape[0]
    assert [d["num_cases"] for d in meta["datasets"]] == [2, 2, 4]
    assert np.load(out / "labels.npy", mmap_mode="r").shape == (expected, SIZE, SIZE)


@pytest.mark.shared_data
def test_vocabulary_merges_shared_organs(cache):
    _, _, meta = cache
    names = meta["class_names"]
    assert names[0] == "background" and len(names) == len(set(names)) == 14 + 3
    assert meta["label_sets"]["CHAOS"] == ["background", "liver", "right_kidney", "left_kidney", "spleen"]
    assert meta["label_sets"]["ACDC"] == ["background", "right_ventricle", "myocardium", "left_ventricle"]
    assert len(meta["label_sets"]["BTCV"]) == 14
    assert meta["modalities"] == ["CT", "MRI", "cineMRI"]


@pytest.mark.shared_data
def test_labels_are_mapped_into_the_union_vocabulary(cache):
    out, _, meta = cache
    labels = np.load(out / "labels.npy", mmap_mode="r")
    index = np.load(out / "index.npz")
    names = meta["class_names"]
    for d, dataset in enumerate(meta["datasets"]):
        present = set(np.unique(labels[index["dataset"] == d]).tolist())
        allowed = {names.index(n) for n in meta["label_sets"][dataset["name"]]}
        assert present <= allowed and len(present) > 1
    # CHAOS liver (value 1 in its files) and BTCV liver (value 6) are the same class in the cache
    chaos = meta["cases"][2]
    raw = read_volume(chaos["label"]).array
    z = int(np.argmax((raw == 1).sum(axis=(1, 2))))
    cached = labels[chaos["slice_start"] + z]
    expected = fit_slices(
        torch.from_numpy((raw[z : z + 1] == 1).astype(np.uint8)), SlicePlan.from_dict(chaos["plan"]), True
    )
    assert np.array_equal(cached == names.index("liver"), expected[0].numpy() == 1)


@pytest.mark.shared_data
def test_ct_statistics_and_normalised_slices(cache):
    out, _, meta = cache
    stats = meta["datasets"][0]["normalization"]
    assert stats["scheme"] == "ct" and stats["num_samples"] == 20_000
    # the sampled statistics agree with those of every foreground voxel, each case weighted equally
    # (10,000 samples per case, as nnU-Net draws them)
    every = []
    for case in meta["cases"][:2]:
        image, label = read_volume(case["image"]).array, read_volume(case["label"]).array
        every.append(image[label > 0].astype(np.float64))
    values = np.concatenate(every)
    weights = np.concatenate([np.full(v.size, 1.0 / v.size) for v in every])
    lo, hi = np.percentile(values, [0.5, 99.5], weights=weights, method="inverted_cdf")
    clipped = np.clip(values, lo, hi)
    mean = np.average(clipped, weights=weights)
    std = np.sqrt(np.average((clipped - mean) ** 2, weights=weights))
    assert abs(stats["mean"] - mean) < 0.02 * std
    assert abs(stats["std"] - std) < 0.02 * std
    assert np.allclose(stats["clip"], [lo, hi], atol=3)
    # a cached slice is the normalised, fitted slice of the volume (float16 storage)
    case = meta["cases"][0]
    volume = read_volume(case["image"]).array
    z = case["num_slices"] // 2
    expected = fit_slices(normalize(volume[z : z + 1], stats), SlicePlan.from_dict(case["plan"]))[0].numpy()
    cached = np.load(out / "images.npy", mmap_mode="r")[case["slice_start"] + z].astype(np.float32)
    assert np.allclose(cached, expected, atol=1e-2)


@pytest.mark.shared_data
def test_mri_is_normalised_per_case(cache):
    out, _, meta = cache
    images = np.load(out / "images.npy", mmap_mode="r")
    for case in meta["cases"][2:4]:
        volume = read_volume(case["image"]).array.astype(np.float64)
        lo, hi = np.percentile(volume, [0.5, 99.5])
        clipped = np.clip(volume, lo, hi)
        expected = (clipped - clipped.mean()) / clipped.std()
        plan = SlicePlan.from_dict(case["plan"])
        assert plan.resized == (SIZE, SIZE)  # 256 x 256 at 1.25 mm: no padding
        stored = images[case["slice_start"] : case["slice_start"] + case["num_slices"]].astype(np.float64)
        fitted = fit_slices(expected.astype(np.float32), plan).numpy()
        assert np.allclose(stored, fitted, atol=2e-2)


@pytest.mark.shared_data
def test_geometry_and_orientation_kept(cache):
    _, _, meta = cache
    for case in meta["cases"]:
        image = sitk.ReadImage(case["image"])
        assert Geometry.from_dict(case["geometry"]).mismatch(Geometry.of(image)) is None
        assert case["orientation"] == sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            image.GetDirection()
        )
    assert meta["cases"][4]["orientation"] == "RAS"  # ACDC is stored RAS, BTCV LPS
    assert meta["cases"][0]["orientation"] == "LPS"


@pytest.mark.shared_data
def test_acdc_split_keeps_patients_together(cache):
    _, _, meta = cache
    acdc = [c for c in meta["cases"] if c["dataset"] == "ACDC"]
    by_patient = {}
    for case in acdc:
        by_patient.setdefault(case["case_id"].split("_frame")[0], set()).add(case["fold"])
    assert all(len(folds) == 1 for folds in by_patient.values())
    assert {f for folds in by_patient.values() for f in folds} == {0, 1}


@pytest.mark.shared_data
def test_rerun_is_a_no_op_and_changes_rebuild(cache, tmp_path):
    out, _, _ = cache
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(small_config(), out, img_size=SIZE, workers=1, progress=False)
    assert again.up_to_date
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
@pytest.mark.shared_data
def test_uint8_storage_and_parallel_workers_agree(cache, tmp_path):
    out, _, meta = cache
    from m4oe.data.loader import SliceCache

    compact = prepare(small_config(), tmp_path / "u8", img_size=SIZE, storage="uint8", workers=2, progress=False)
    assert compact.size_bytes < 0.7 * cache[1].size_bytes
    assert (tmp_path / "u8" / "images.npy").stat().st_size < 0.51 * (out / "images.npy").stat().st_size
    full, small = SliceCache(out), SliceCache(tmp_path / "u8")
    idx = np.arange(0, len(full), 7)
    a, la = full.read(idx)
    b, lb = small.read(idx)
    assert np.array_equal(la, lb)
    step = small.index["scale"][idx][:, None, None]
    assert np.all(np.abs(a - b) <= step / 2 + 1e-2)


@pytest.mark.shared_data
def test_interrupted_run_leaves_no_cache(tmp_path, monkeypatch):
    from m4oe.data import prepare as prepare_module

    calls = {"n": 0}
    real = prepare_module._write_case

    def failing(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prepare_module, "_write_case", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_config(), tmp_path / "cache", img_size=SIZE, workers=1, progress=False)
    assert not (tmp_path / "cache").exists()
    assert list(tmp_path.iterdir()) == []


def test_unfit_inverts_fit_on_label_maps():
    plan = SlicePlan.fit((256, 232), (1.0, 1.0), 128)
    assert plan.resized == (128, 116) and plan.pad == (0, 6)
    label = torch.zeros(1, 256, 232, dtype=torch.long)
    label[0, 60:180, 40:200] = 1
    fitted = fit_slices(label, plan, is_label=True)
    one_hot = torch.nn.functional.one_hot(fitted.long(), 2).permute(0, 3, 1, 2).float()
    back = unfit_logits(one_hot, plan).argmax(1)
    assert back.shape == (1, 256, 232)
    assert (back == label).float().mean() > 0.995
