"""2.5D input (``slice_context``): each slice with its neighbours, alike in training, validation and prediction."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from m4oe import create_model, load_bundle, save_bundle
from m4oe.config import ConfigError, ModelConfig, load_experiment, parse_experiment, preset_config
from m4oe.data.io import read_volume
from m4oe.data.loader import SliceBatches, SliceCache, stack_slice_context
from m4oe.data.prepare import prepare
from m4oe.infer.files import predict_paths
from m4oe.infer.predict import Predictor
from m4oe.model.mae import load_pretrained
from m4oe.model.swin_unet import M4oEUNet
from m4oe.train.finetune import run_train
from m4oe.train.pretrain import run_pretrain
from m4oe.train.validate import validate

from .conftest import MICRO
from .data_helpers import make_dataset, write_image


def reference_stack(volume: np.ndarray, context: int) -> np.ndarray:
    """Slice ``z`` with slices ``z - k ... z + k`` as channels, zero outside the volume: a plain loop."""
    out = np.zeros((volume.shape[0], 2 * context + 1, *volume.shape[1:]), volume.dtype)
    for z in range(volume.shape[0]):
        for channel, offset in enumerate(range(-context, context + 1)):
            if 0 <= z + offset < volume.shape[0]:
                out[z, channel] = volume[z + offset]
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    config = parse_experiment(
        {
            "datasets": [
                {"path": str(make_dataset(root / "ct", n=3, modality="CT")), "name": "ct"},
                {"path": str(make_dataset(root / "mr", n=2, modality="MRI")), "name": "mr"},
            ],
            "split": {"folds": 3},
        }
    )
    prepare(config, root / "cache", img_size=32, workers=1, progress=False)
    return SliceCache(root / "cache")


@pytest.mark.parametrize("context", [0, 1, 2])
def test_a_volume_stacks_as_a_loop_does_in_any_range_of_slices(context):
    volume = torch.randn(7, 5, 4)
    whole = stack_slice_context(volume, context)
    assert np.array_equal(whole.numpy(), reference_stack(volume.numpy(), context))
    for start, stop in [(0, 3), (2, 5), (5, 7), (6, 100)]:  # the batches prediction takes
        assert torch.equal(stack_slice_context(volume, context, start, stop), whole[start:stop])


@pytest.mark.parametrize("context", [1, 2])
def test_cache_reads_each_slice_between_neighbours_of_its_own_case(cache, context):
    volumes = {}
    for case in cache.cases():
        start, n = case["slice_start"], case["num_slices"]
        stacked = reference_stack(cache.read(np.arange(start, start + n))[0], context)
        volumes.update({start + z: stacked[z] for z in range(n)})
    indices = np.random.default_rng(0).permutation(len(cache))  # every slice, case ends included, any order
    images, labels = cache.read_context(indices, context)
    assert images.shape == (len(cache), 2 * context + 1, 32, 32)
    assert np.array_equal(images, np.stack([volumes[i] for i in indices]))
    assert np.array_equal(labels, cache.read(indices)[1])
    batch = SliceBatches(cache, context)[indices[:5]]
    assert torch.equal(batch["image"], torch.from_numpy(images[:5]))


def test_config_takes_the_input_channels_from_slice_context(tmp_path):
    assert preset_config("m4oe-convnext-s", slice_context=1).in_chans == 3
    assert ModelConfig(slice_context=2).in_chans == 5 and ModelConfig().in_chans == 1
    with pytest.raises(ConfigError, match="in_chans 3 does not match slice_context 0"):
        ModelConfig(in_chans=3)
    with pytest.raises(ConfigError, match="slice_context must be >= 0"):
        ModelConfig(slice_context=-1)
    model = create_model("m4oe-convnext-s", modalities=["CT"], label_sets={"a": ["background", "x"]},
                         img_size=32, slice_context=1)  # fmt: skip
    assert model(torch.randn(2, 3, 32, 32), 0).shape == (2, 2, 32, 32)
    save_bundle(model, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert (loaded.config.slice_context, loaded.config.in_chans) == (1, 3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x, 0), model.eval()(x, 0))


def test_validation_gives_the_model_what_training_reads(cache):
    model = create_model("m4oe-convnext-s", modalities=cache.modalities, label_sets=cache.label_sets,
                         img_size=32, slice_context=1)  # fmt: skip
    seen = []
    forward = model.forward

    def recording(image, *args, **kwargs):
        seen.append(image.clone())
        return forward(image, *args, **kwargs)

    model.forward = recording
    validate(model, cache, torch.device("cpu"), batch_size=4)
    cases = cache.cases("val")
    expected = [
        cache.read_context(np.arange(c["slice_start"], c["slice_start"] + c["num_slices"]), 1)[0] for c in cases
    ]
    assert np.array_equal(torch.cat(seen).numpy(), np.concatenate(expected))


class PreviousSliceModel(M4oEUNet):
    """Stand-in for a trained 2.5D model: 'liver' wherever the slice before this one is brighter than 0.5."""

    def forward(self, image, modality=None, dataset=None, return_gates=False, routing=None):
        assert image.shape[1] == 3
        x = image[:, 0]
        logits = torch.stack([torch.zeros_like(x), (x - 0.5) * 20, torch.full_like(x, -1e4)], dim=1)
        return (logits, []) if return_gates else logits


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_prediction_sees_the_neighbours_across_batches(tmp_path, batch):
    model = PreviousSliceModel(
        ModelConfig(**{**MICRO, "depths": (1, 1, 1, 1), "slice_context": 1}), ["CT"],
        {"phantom": ["background", "liver", "spleen"]},
    )  # fmt: skip
    values = {"background": 0, "liver": 6, "spleen": 1}
    model.bundle_extra = {"datasets": {"phantom": {"modality": "CT", "normalization": {"scheme": "none"},
                                                   "label_values": values}}}  # fmt: skip
    image = np.zeros((5, 40, 30), np.float32)
    image[0, 5:20, 4:12] = 1.0
    image[2, 22:35, 10:25] = 1.0
    image[3, 8:30, 15:28] = 1.0
    path = write_image(tmp_path / "in" / "a_0000.nii.gz", image)
    predict_paths(Predictor(model, "cpu", batch), [path], tmp_path / "out", dataset="phantom", progress=False)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "a.nii.gz")))
    expected = np.zeros_like(image, dtype=bool)
    expected[1:] = image[:-1] > 0.5  # slice z shows what slice z - 1 holds; nothing before the first
    assert ((labels == 6) == expected).mean() > 0.985  # only resampled edges may differ
    assert (labels[0] == 0).all() and (labels == 6).sum() > 0.9 * expected.sum()


@pytest.mark.slow
def test_two_phase_training_and_prediction_on_stacked_slices(tmp_path):
    config = {
        "model": {"preset": "m4oe-convnext-s", "img_size": 32, "slice_context": 1},
        "split": {"folds": 2},
        "train": {"batch_size": 4, "samples_per_epoch": 16, "epochs": 1, "pretrain_epochs": 1, "val_every": 1,
                  "workers": 0},
        "datasets": [{"path": str(make_dataset(tmp_path / "ct", n=2)), "name": "ct"},
                     {"path": str(make_dataset(tmp_path / "mr", n=2, modality="MRI")), "name": "mr"}],
    }  # fmt: skip
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    run_pretrain(load_experiment(path), tmp_path / "pre", tmp_path / "cache", progress=False)
    run_train(load_experiment(path), tmp_path / "train", tmp_path / "cache", init=tmp_path / "pre", progress=False)
    model = load_bundle(tmp_path / "train" / "last")
    assert (model.config.slice_context, model.config.in_chans) == (1, 3)
    assert model.patch_embed.proj.weight.shape[1] == 3
    image = tmp_path / "ct" / "imagesTr" / "case_000_0000.nii.gz"
    result = Predictor(model, "cpu").predict_volume(read_volume(image), "ct")
    assert result.labels.shape == read_volume(image).array.shape


def test_phase_two_refuses_an_encoder_pre_trained_on_other_inputs():
    labels = {"a": ["background", "x"]}
    flat = create_model("m4oe-convnext-s", modalities=["CT"], label_sets=labels, img_size=32)
    stacked = create_model("m4oe-convnext-s", modalities=["CT"], label_sets=labels, img_size=32, slice_context=1)
    with pytest.raises(ValueError, match="saw slices with 0 neighbours on each side and this one takes 1"):
        load_pretrained(stacked, flat)
    assert load_pretrained(flat, create_model("m4oe-convnext-s", modalities=["CT"], label_sets=labels, img_size=32))


@pytest.mark.parametrize("preset, size", [("tiny", MICRO), ("m4oe-convnext-s", {"img_size": 32})])
def test_a_new_model_computes_what_its_2d_twin_computes_whatever_the_neighbours(preset, size):
    labels = {"a": ["background", "x", "y"]}
    stacked = create_model(preset, modalities=["CT", "MRI"], label_sets=labels, slice_context=1, **size).eval()
    flat = create_model(preset, modalities=["CT", "MRI"], label_sets=labels, **size).eval()
    weights = dict(stacked.state_dict())
    stem = weights["patch_embed.proj.weight"]
    assert stem[:, 1].abs().sum() > 0 and stem[:, 0].abs().sum() == 0 and stem[:, 2].abs().sum() == 0
    weights["patch_embed.proj.weight"] = stem[:, 1:2]  # the 2D twin: the same network on the centre slice
    flat.load_state_dict(weights)
    S = size["img_size"]
    slices = torch.randn(2, 3, S, S)  # a slice between its two neighbours, twice
    modality = torch.tensor([0, 1])
    with torch.no_grad():
        expected = flat(slices[:, 1:2], modality)
        for neighbours in (torch.zeros(2, 2, S, S), 5 * torch.randn(2, 2, S, S)):
            image = torch.cat([neighbours[:, :1], slices[:, 1:2], neighbours[:, 1:]], dim=1)
            torch.testing.assert_close(stacked(image, modality), expected)
