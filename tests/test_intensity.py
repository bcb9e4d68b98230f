"""Intensities in physical units (``stored_window``), the bundle's record of the training scans, and
what ``predict`` says of an input unlike them; which way up an input goes (``--orientation``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m4oe.config import ConfigError, ModelConfig, experiment_to_dict, parse_experiment
from m4oe.data.datasets import DataError
from m4oe.data.intensity import histogram, intensity_record, looks_stored, overlap, to_physical
from m4oe.data.io import read_volume
from m4oe.data.prepare import prepare
from m4oe.infer.files import predict_paths
from m4oe.infer.orientation import foreground_confidence, probe_indices
from m4oe.infer.predict import PredictError, Predictor
from m4oe.model.swin_unet import M4oEUNet

from .conftest import MICRO
from .data_helpers import make_dataset, phantom, write_image


def test_to_physical_by_hand():
    stored = np.array([0, 51, 127.5, 255], np.float32)
    assert to_physical(stored, (-125, 275)).tolist() == pytest.approx([-125, -45, 75, 275])
    assert to_physical(stored, None) is stored
    assert looks_stored(np.array([[0, 3], [255, 7]], np.int16))
    assert not looks_stored(np.array([-1000, 40], np.int16)) and not looks_stored(np.array([0.5, 3.0]))
    assert not looks_stored(np.array([0, 256]))


def test_histogram_and_overlap_by_hand():
    h = histogram(np.array([-10.0, 0.1, 0.2, 100.0]))  # the ends land in the end bins
    assert h.sum() == pytest.approx(1) and h[0] == 0.25 and h[-1] == 0.25 and h[24] == 0.5
    assert overlap(h, h) == pytest.approx(1)
    assert overlap([0.5, 0.5, 0], [0, 0.5, 0.5]) == pytest.approx(0.5)
    record = intensity_record([np.arange(101.0)], [h, h])
    assert record["quantiles"]["50"] == 50 and record["quantiles"]["0.1"] == pytest.approx(0.1)
    assert record["overlap_floor"] == 1


@pytest.mark.parametrize("bad", [[275, -125], [1], "x", [0, "a"]])
def test_stored_window_config_is_checked(tmp_path, bad):
    with pytest.raises(ConfigError, match="stored_window"):
        parse_experiment({"datasets": [{"path": str(tmp_path), "stored_window": bad}]})


def test_stored_window_round_trips_and_comes_from_dataset_json(tmp_path):
    exp = parse_experiment({"datasets": [{"path": str(tmp_path), "stored_window": [-125, 275]}]})
    assert exp.datasets[0].stored_window == (-125.0, 275.0)
    assert parse_experiment(experiment_to_dict(exp)).datasets == exp.datasets
    data = make_dataset(tmp_path / "ct", n=2)
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "stored_window": [-100, 300]}))
    from m4oe.data.prepare import discover

    problems: list[str] = []
    sources = discover(parse_experiment({"datasets": [{"path": str(data)}], "split": {"folds": 2}}), problems)
    assert problems == [] and sources[0].stored_window == (-100.0, 300.0)
    (data / "dataset.json").write_text(json.dumps({**meta, "stored_window": [300, -100]}))
    with pytest.raises(DataError, match="stored_window"):
        prepare(parse_experiment({"datasets": [{"path": str(data)}], "split": {"folds": 2}}), tmp_path / "c",
                img_size=32, workers=1, progress=False)  # fmt: skip


def _prepared(tmp_path, data, name, **extra):
    exp = parse_experiment({"datasets": [{"path": str(data), "name": "A", "modality": "CT", **extra}],
                            "split": {"folds": 2}})  # fmt: skip
    out = tmp_path / name
    prepare(exp, out, img_size=32, workers=1, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    return meta["datasets"][0], np.load(out / "images.npy").astype(np.float32)


def test_prepare_in_physical_units(tmp_path):
    """The same files read as a stored window: statistics in physical units (the stored ones mapped
    by hand), the same normalised slices, a new fingerprint and the record in physical units."""
    data = make_dataset(tmp_path / "ct", n=2)  # values about 60..240: inside 0..255
    plain, images_plain = _prepared(tmp_path, data, "plain")
    hu, images_hu = _prepared(tmp_path, data, "hu", stored_window=[-125, 275])
    a, b = 400 / 255, -125
    n0, n1 = plain["normalization"], hu["normalization"]
    assert n1["mean"] == pytest.approx(a * n0["mean"] + b) and n1["std"] == pytest.approx(a * n0["std"])
    assert n1["clip"] == pytest.approx([a * c + b for c in n0["clip"]]) and n1["stored_window"] == [-125, 275]
    assert "stored_window" not in n0 and hu["fingerprint"] != plain["fingerprint"]
    assert np.abs(images_hu - images_plain).max() < 0.01  # float16 rounding only
    everything = np.concatenate([phantom(i)[0].ravel() for i in range(2)]).astype(np.float64)
    q = n1["intensity"]["quantiles"]
    assert q["50"] == pytest.approx(np.percentile(a * everything + b, 50), abs=1e-3)
    assert n0["intensity"]["quantiles"]["50"] == pytest.approx(np.percentile(everything, 50))
    assert sum(n1["intensity"]["histogram"]) == pytest.approx(1, abs=1e-4)
    assert 0.5 < n1["intensity"]["overlap_floor"] <= 1


# --- predict ----------------------------------------------------------------------------------


class BrightModel(M4oEUNet):
    """Stand-in for a trained model: 'organ' where the normalised slice is above 0.5; with ``top``,
    only in the slice's top half (a model bound to where anatomy lies)."""

    top = False

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        x = image[:, 0]
        organ = (x > 0.5).to(x.dtype)
        if self.top:
            organ = organ * (torch.arange(x.shape[-2]) < x.shape[-2] // 2).to(x.dtype)[:, None]
        logits = torch.stack([1 - organ, organ], dim=1) * 10
        return (logits, []) if return_gates else logits


def _ct_scan(seed: int = 0) -> np.ndarray:
    """A CT in HU: air around a soft-tissue body with a brighter organ in the bottom half."""
    rng = np.random.default_rng(seed)
    image = np.full((8, 32, 32), -1000.0) + rng.normal(0, 5, (8, 32, 32))
    image[:, 4:28, 4:28] = 40 + rng.normal(0, 10, (8, 24, 24))
    image[:, 18:26, 8:20] = 160
    return image.astype(np.float32)


def _model(stats: dict, flip=(), top=False) -> BrightModel:
    model = BrightModel(ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1)}), ["CT"], {"A": ["background", "organ"]})
    model.top = top
    info = {"modality": "CT", "normalization": stats, "label_values": {"background": 0, "organ": 1},
            "flip": list(flip)}  # fmt: skip
    model.bundle_extra = {"datasets": {"A": info}}
    return model


def _ct_stats(scans: list[np.ndarray], window=None) -> dict:
    """The ``ct`` scheme's statistics and intensity record of training scans, as prepare writes them."""
    from m4oe.data.normalize import ct_statistics, normalize

    values = [to_physical(s, window).ravel().astype(np.float64) for s in scans]
    stats = ct_statistics([v[v > -500] for v in values])
    if window is not None:
        stats["stored_window"] = list(window)
    stats["intensity"] = intensity_record(values, [histogram(normalize(to_physical(s, window), stats)) for s in scans])
    return stats


def _stored(scan: np.ndarray, window=(-125, 275)) -> np.ndarray:
    lo, hi = window
    return np.round((np.clip(scan, lo, hi) - lo) * 255 / (hi - lo)).astype(np.int16)


def _warnings(model, scan, tmp_path, **options):
    path = write_image(tmp_path / "in" / "scan_0000.nii.gz", scan)
    return Predictor(model, **options).predict_volume(read_volume(path), "A")


def test_an_hu_model_warns_on_8bit_ct_and_on_mri(tmp_path):
    model = _model(_ct_stats([_ct_scan(0), _ct_scan(1)]))  # trained in HU, no window
    assert _warnings(model, _ct_scan(2), tmp_path).warnings == []
    eight_bit = _warnings(model, _stored(_ct_scan(2)), tmp_path).warnings
    assert len(eight_bit) == 1 and "as dark as air" in eight_bit[0] and "A is a CT model in HU" in eight_bit[0]
    mri = np.clip(_ct_scan(2) + 1000, 0, None) * 0.8  # no air: MRI-like intensities
    assert any("as dark as air" in w for w in _warnings(model, mri, tmp_path).warnings)


def test_an_8bit_model_warns_on_hu_ct(tmp_path):
    model = _model(_ct_stats([_stored(_ct_scan(0)), _stored(_ct_scan(1))]))  # trained on stored values, undeclared
    assert _warnings(model, _stored(_ct_scan(2)), tmp_path).warnings == []
    hu = _warnings(model, _ct_scan(2), tmp_path).warnings
    top = float(_stored(_ct_scan(0)).max())  # the organ's 160 HU as stored: the training scans' brightest
    assert len(hu) == 1 and f"lie outside the intensities A was trained on (0..{top:g})" in hu[0]
    share = float(hu[0].split("INPUT: ")[1].split("%")[0])
    margin = 0.05 * top
    assert share == pytest.approx(100 * np.mean((_ct_scan(2) < -margin) | (_ct_scan(2) > top + margin)), abs=1)


def test_a_windowed_model_reads_its_stored_files_in_the_window(tmp_path):
    model = _model(_ct_stats([_stored(_ct_scan(0)), _stored(_ct_scan(1))], window=(-125, 275)))
    hu = _warnings(model, _ct_scan(2), tmp_path)
    stored = _warnings(model, _stored(_ct_scan(2)), tmp_path)
    assert hu.warnings == [] and len(stored.warnings) == 1 and "read in that window" in stored.warnings[0]
    assert (hu.labels == stored.labels).mean() > 0.99 and hu.labels.any()  # up to the 8 bits' rounding
    mri = np.clip(_ct_scan(2) + 1000, 0, None) * 0.8
    assert any("as dark as air" in w for w in _warnings(model, mri, tmp_path).warnings)


def test_strict_refuses_and_writes_nothing(tmp_path):
    model = _model(_ct_stats([_ct_scan(0), _ct_scan(1)]))
    with pytest.raises(PredictError, match="refused: --strict"):
        _warnings(model, _stored(_ct_scan(2)), tmp_path, strict=True)
    path = write_image(tmp_path / "in2" / "scan_0000.nii.gz", _stored(_ct_scan(2)))
    report = predict_paths(Predictor(model, strict=True), [path], tmp_path / "out", dataset="A", progress=False)
    assert len(report.failed) == 1 and not (tmp_path / "out" / "scan.nii.gz").exists()


def test_probe_and_confidence_by_hand():
    assert probe_indices(10).tolist() == [2, 3, 4, 5, 6, 7]
    assert len(probe_indices(200)) == 16 and probe_indices(1).tolist() == [0]
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]).T.reshape(1, 2, 1, 3)
    assert foreground_confidence(p) == pytest.approx(0.7)
    assert foreground_confidence(torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)) == 0


@pytest.mark.parametrize("organ_top", [False, True])
def test_orientation_auto_keeps_the_flip_only_where_the_model_is_surer(tmp_path, organ_top):
    scan = _ct_scan(2)
    if organ_top:  # a header that already shows the anatomy the model's way up
        scan = scan[:, ::-1].copy()
    model = _model(_ct_stats([_ct_scan(0)]), flip=["y"], top=True)
    auto = _warnings(model, scan, tmp_path)
    organ = scan > 100
    if organ_top:
        assert any("without A's flip" in w for w in auto.warnings)
    else:
        assert not any("flip" in w for w in auto.warnings)
    assert ((auto.labels == 1) == organ).mean() > 0.98
    flipped = _warnings(model, scan, tmp_path, orientation="dataset").labels
    header = _warnings(model, scan, tmp_path, orientation="header").labels
    assert (flipped.any() != organ_top) and (header.any() == organ_top)
    with pytest.raises(PredictError, match="--orientation"):
        Predictor(model, orientation="sideways")


def test_ood_check_maps_totalsegmentator_names_and_scores_dice():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "ood.py"
    spec = importlib.util.spec_from_file_location("ood", path)
    ood = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ood)
    assert ood.m4oe_name("kidney_right") == "right_kidney"
    assert ood.m4oe_name("adrenal_gland_left") == "left_adrenal_gland" and ood.m4oe_name("aorta") == "aorta"
    a = np.array([1, 1, 0, 0], bool)
    assert ood.dice(a, np.array([1, 0, 1, 0], bool)) == 0.5 and np.isnan(ood.dice(~a & a, ~a & a))


# --- robustness augmentation --------------------------------------------------------------------


def test_monotonic_remap_against_numpy_interp():
    from m4oe.data.augment import remap_monotonic

    g = torch.Generator().manual_seed(3)
    image = torch.linspace(-2, 5, 2 * 16 * 16).reshape(2, 1, 16, 16)
    out = remap_monotonic(image, torch.tensor([True, False]), 4, torch.Generator().manual_seed(3))
    steps = -torch.log(torch.rand(2, 5, generator=g).clamp_min(1e-6))
    ys = np.concatenate([[0.0], (steps.cumsum(1) / steps.sum(1, keepdim=True))[0].numpy()])
    x = image[0].numpy().ravel()
    lo, hi = x.min(), x.max()
    expected = np.interp((x - lo) / (hi - lo), np.linspace(0, 1, 6), ys) * (hi - lo) + lo
    assert np.allclose(out[0].numpy().ravel(), expected, atol=1e-5)
    assert torch.equal(out[1], image[1])  # not chosen: untouched
    assert (np.diff(out[0].numpy().ravel()) >= -1e-6).all()  # increasing, ends in place
    assert out[0].min() == pytest.approx(lo) and out[0].max() == pytest.approx(hi)


def test_robust_augment_is_off_by_default_and_draws_nothing():
    from m4oe.data.augment import AugmentConfig, augment_batch

    image, label = torch.randn(4, 1, 32, 32), torch.zeros(4, 32, 32, dtype=torch.long)
    plain = augment_batch(image, label, AugmentConfig(), torch.Generator().manual_seed(0))
    zero = augment_batch(image, label, AugmentConfig(robust_prob=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(plain[0], zero[0])
    config = AugmentConfig(spatial_prob=0, brightness=(1, 1), shift_std=0, gamma_prob=0, noise_prob=0,
                           robust_prob=1.0, lowres=(0.25, 0.25))  # fmt: skip
    smooth = augment_batch(image, label, config, torch.Generator().manual_seed(0))[0]
    # a grid a quarter the side: neighbouring pixels far closer than in white noise
    assert (smooth.diff(dim=-1).abs().mean() < 0.5 * image.diff(dim=-1).abs().mean()).item()
    with pytest.raises(ConfigError, match="robust_augment"):
        parse_experiment({"datasets": [{"path": "x"}], "train": {"robust_augment": 1.5}})
