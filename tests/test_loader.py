"""Batch sampling (balance, foreground oversampling, reproducibility), batch reading and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m4oe.config import parse_experiment
from m4oe.data.augment import AugmentConfig, augment_batch
from m4oe.data.loader import BalancedBatchSampler, SliceBatches, SliceCache, make_loader
from m4oe.data.normalize import ct_statistics, normalize
from m4oe.data.prepare import prepare

from .data_helpers import make_dataset


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    big = make_dataset(root / "big", n=8, modality="CT")
    small = make_dataset(root / "small", n=2, modality="MRI")
    config = parse_experiment(
        {
            "datasets": [
                {"path": str(big), "name": "big"},
                {"path": str(small), "name": "small", "split": {"val": ["case_001"]}},
            ],
            "split": {"folds": 4},
        }
    )
    prepare(config, root / "cache", img_size=32, workers=1, progress=False)
    return SliceCache(root / "cache")


def test_sampler_balances_datasets_and_oversamples_foreground(cache):
    mask = cache.slice_mask("train")
    sampler = BalancedBatchSampler(cache, batch_size=16, mask=mask, samples_per_epoch=8000, seed=3)
    picks = sampler.epoch_batches(0).ravel()
    assert mask[picks].all(), "only training slices are drawn"
    share = np.bincount(cache.index["dataset"][picks], minlength=2) / picks.size
    assert abs(share[0] - 0.5) < 0.03  # balanced, although 'big' has 4x the slices of 'small'
    fg = (cache.index["foreground"][picks] > 0).mean()
    natural = (cache.index["foreground"][mask] > 0).mean()
    assert fg > natural + 0.1


def test_sampler_weights_and_reproducibility(cache):
    sampler = BalancedBatchSampler(cache, batch_size=10, dataset_weights=[3.0, 1.0], samples_per_epoch=4000, seed=1)
    picks = sampler.epoch_batches(0)
    assert abs((cache.index["dataset"][picks] == 0).mean() - 0.75) < 0.03
    assert np.array_equal(picks, sampler.epoch_batches(0))
    assert not np.array_equal(picks, sampler.epoch_batches(1))
    with pytest.raises(ValueError, match="1 dataset weights for a cache of 2 datasets"):
        BalancedBatchSampler(cache, batch_size=10, dataset_weights=[3.0])
    sampler.set_epoch(0, start_batch=7)
    assert np.array_equal(np.stack(list(sampler)), picks[7:])


def test_slice_classes_against_a_loop(cache):
    picks = np.array([5, 0, len(cache) - 1, 17, 5])
    _, labels = cache.read(picks)
    expected = np.zeros((picks.size, len(cache.class_names)), dtype=bool)
    for i, label in enumerate(labels):
        expected[i, np.unique(label)] = True
    assert np.array_equal(cache.slice_classes(picks, chunk=2), expected)


def test_class_sampling_draws_each_foreground_class_equally(cache):
    mask = cache.slice_mask("train")
    kwargs = {"batch_size": 16, "mask": mask, "samples_per_epoch": 16000, "foreground_fraction": 1.0, "seed": 2}
    picks = {mode: BalancedBatchSampler(cache, foreground_sampling=mode, **kwargs).epoch_batches(0).ravel()
             for mode in ("any", "class")}  # fmt: skip
    for d in range(2):
        pool = np.flatnonzero(mask & (cache.index["dataset"] == d) & (cache.index["foreground"] > 0))
        present = cache.slice_classes(pool)[:, 1:]
        present = present[:, present.any(0)]
        row = {int(s): i for i, s in enumerate(pool)}
        share = {}
        for mode, drawn in picks.items():
            drawn = drawn[cache.index["dataset"][drawn] == d]
            assert np.isin(drawn, pool).all(), "forced samples come from foreground slices"
            share[mode] = present[[row[int(s)] for s in drawn]].mean(0)  # share of draws holding each class
        # P(a draw holds class k) = sum over classes j of 1/K x (share of j's slices that hold k)
        K = present.shape[1]
        expected = sum(present[present[:, j]].mean(0) for j in range(K)) / K
        assert np.abs(share["class"] - expected).max() < 0.03
        assert np.abs(share["any"] - present.mean(0)).max() < 0.03
        rare = np.argmin(present.mean(0))
        assert present[:, rare].mean() < 0.9, "the phantom has a class missing from some foreground slices"
        assert share["class"][rare] > share["any"][rare] + 0.03
    with pytest.raises(ValueError, match="foreground_sampling must be one of"):
        BalancedBatchSampler(cache, 4, foreground_sampling="organ")


def test_val_split_from_explicit_list_and_folds(cache):
    val_cases = {c["case_id"] for c in cache.cases("val") if c["dataset"] == "small"}
    assert val_cases == {"case_001"}
    big_val = [c for c in cache.cases("val") if c["dataset"] == "big"]
    assert len(big_val) == 2  # 8 cases in 4 folds
    assert cache.slice_mask("val").sum() + cache.slice_mask("train").sum() == len(cache)


def test_batches_hold_the_cached_slices(cache):
    batches = SliceBatches(cache)
    idx = np.array([5, 0, 17, 5])
    batch = batches[idx]
    images = np.load(cache.path / "images.npy", mmap_mode="r")
    labels = np.load(cache.path / "labels.npy", mmap_mode="r")
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert np.allclose(batch["image"][:, 0].numpy(), images[idx].astype(np.float32))
    assert np.array_equal(batch["label"].numpy(), labels[idx])
    assert batch["dataset"].tolist() == cache.index["dataset"][idx].tolist()
    assert batch["modality"].tolist() == cache.index["modality"][idx].tolist()


def test_loader_with_workers_yields_the_sampler_batches(cache):
    sampler = BalancedBatchSampler(cache, batch_size=8, samples_per_epoch=64, seed=0)
    batches = list(make_loader(cache, sampler, workers=2))
    expected = sampler.epoch_batches(0)
    assert len(batches) == 8
    assert all(np.array_equal(b["index"].numpy(), e) for b, e in zip(batches, expected, strict=True))


def _no_intensity(**spatial) -> AugmentConfig:
    return AugmentConfig(brightness=(1.0, 1.0), shift_std=0.0, gamma_prob=0.0, noise_prob=0.0, **spatial)


def test_augment_identity_when_disabled():
    image = torch.randn(4, 1, 16, 16)
    label = torch.randint(0, 3, (4, 16, 16))
    out, out_label = augment_batch(image, label, _no_intensity(spatial_prob=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, image) and torch.equal(out_label, label)


def test_augment_flip_is_exact():
    image = torch.randn(3, 1, 16, 16)
    label = torch.randint(0, 3, (3, 16, 16))
    config = _no_intensity(spatial_prob=0.0, flip_x_prob=1.0)
    out, out_label = augment_batch(image, label, config, torch.Generator().manual_seed(0))
    assert torch.allclose(out, image.flip(-1), atol=1e-5)
    assert torch.equal(out_label, label.flip(-1))


def test_augment_moves_image_and_label_together():
    label = torch.zeros(6, 64, 64, dtype=torch.long)
    label[:, 20:44, 16:40] = 1
    label[:, 40:56, 44:60] = 2
    image = label[:, None].float() * 10
    config = _no_intensity(spatial_prob=1.0, rotate_deg=30, elastic_prob=1.0)
    out, out_label = augment_batch(image, label, config, torch.Generator().manual_seed(1))
    assert not torch.equal(out_label, label)
    assert set(out_label.unique().tolist()) <= {0, 1, 2}
    agree = (out[:, 0].round() / 10).round().long() == out_label
    assert agree.float().mean() > 0.97  # only interpolated edges may differ


def test_gamma_matches_reference():
    image = torch.rand(2, 1, 8, 8) * 4 - 1
    config = AugmentConfig(spatial_prob=0.0, brightness=(1.0, 1.0), shift_std=0.0, gamma=(2.0, 2.0), gamma_prob=1.0,
                           noise_prob=0.0)  # fmt: skip
    out, _ = augment_batch(image, torch.zeros(2, 8, 8, dtype=torch.long), config, torch.Generator().manual_seed(0))
    lo = image.amin(dim=(1, 2, 3), keepdim=True)
    span = image.amax(dim=(1, 2, 3), keepdim=True) - lo
    assert torch.allclose(out, ((image - lo) / span) ** 2 * span + lo, atol=1e-5)


def test_normalisation_schemes_against_reference():
    rng = np.random.default_rng(0)
    samples = [rng.normal(50, 10, 5000), rng.normal(70, 5, 5000)]
    stats = ct_statistics(samples)
    values = np.concatenate(samples)
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert stats["clip"] == pytest.approx([lo, hi])
    assert stats["mean"] == pytest.approx(np.clip(values, lo, hi).mean())
    volume = rng.normal(60, 20, (4, 8, 8))
    assert np.allclose(normalize(volume, stats), (np.clip(volume, lo, hi) - stats["mean"]) / stats["std"], atol=1e-5)
    mri = normalize(volume * 7 + 300, {"scheme": "mri"})
    assert abs(mri.mean()) < 1e-4 and abs(mri.std() - 1) < 1e-4
    assert np.allclose(mri, normalize(volume, {"scheme": "mri"}), atol=1e-4)  # invariant to affine scaling
