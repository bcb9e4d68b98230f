"""Losses, Dice, the MAE mask and reorientation against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m4oe.data.io import read_volume
from m4oe.train.losses import segmentation_loss, soft_dice_per_sample
from m4oe.train.validate import volume_dice

from .data_helpers import write_image


def test_soft_dice_per_sample_by_hand():
    # two samples of 1 x 2 pixels, classes background / a / b
    probs = torch.tensor([[[[0.6, 0.0]], [[0.4, 1.0]], [[0.0, 0.0]]],   # sample 0: its dataset has no b
                          [[[0.2, 0.1]], [[0.8, 0.0]], [[0.0, 0.9]]]])  # fmt: skip
    target = torch.tensor([[[0, 1]], [[0, 2]]])
    classes = torch.tensor([[True, True, False], [True, True, True]])
    dice = soft_dice_per_sample(probs, target, classes)
    # sample 0, class a (present): I = 1.0, P = 1.4, T = 1 -> 2 / 2.4; b is not its class
    # sample 1: a is absent but predicted (argmax of pixel 0): I = 0, P = 0.8 -> 0;  b: I = .9, P = .9, T = 1
    expected = [2 / 2.4, (0.0 + 1.8 / 1.9) / 2]
    assert dice.tolist() == pytest.approx(expected, abs=1e-4)


def test_sample_with_nothing_to_score_counts_as_one():
    probs = torch.tensor([[[[1.0]], [[0.0]]]])
    assert soft_dice_per_sample(probs, torch.tensor([[[0]]]), torch.tensor([[True, True]])).item() == 1.0


def test_segmentation_loss_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # one sample, 2 classes, 1 x 2 pixels
    target = torch.tensor([[[0, 1]]])
    p0 = math.exp(2) / (math.exp(2) + 1)  # pixel 0, class 0
    p1 = math.exp(1) / (math.exp(1) + 1)  # pixel 1, class 1
    ce = -(math.log(p0) + math.log(p1)) / 2
    dice = 2 * p1 / ((1 - p0) + p1 + 1)  # class 1: I = p1, P = (1 - p0) + p1, T = 1
    loss, parts = segmentation_loss(logits, target, torch.tensor([[True, True]]))
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(ce + 1 - dice, rel=1e-4)


def test_volume_dice_by_hand():
    pred = np.array([[1, 1, 0], [2, 0, 0]])
    ref = np.array([[1, 0, 0], [1, 0, 0]])
    dice = volume_dice(pred, ref, [1, 2, 3])
    assert dice[1] == pytest.approx(2 * 1 / (2 + 2))
    assert dice[2] == 0.0  # predicted, absent from the reference
    assert math.isnan(dice[3])  # empty in both


def test_mae_mask_hides_exactly_the_ratio_per_sample():
    from m4oe import create_model
    from m4oe.model.mae import MAEPretrainer

    model = create_model("tiny", modalities=["CT"], label_sets={"d": ["background", "a"]})
    mae = MAEPretrainer(model, mask_ratio=0.75)
    assert (mae.unit, mae.grid) == (32, 4)  # 128 px, patch 4, three merges
    mask = mae.random_mask(5, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 4, 4) and mask.sum((1, 2)).tolist() == [12] * 5
    assert not torch.equal(mask[0], mask[1])  # drawn per sample


def test_reorientation_puts_the_patients_left_at_high_x(tmp_path):
    # ITK's world is LPS (+x: the patient's left). Stored with direction -x (RAS-like, as ACDC), the
    # voxel index x grows towards the patient's right, so column 0 is the patient's left-most.
    image = np.zeros((2, 4, 6), np.float32)
    image[:, :, 0] = 1.0  # first x column: with direction -x it is the patient's left-most column
    path = write_image(tmp_path / "ras.nii.gz", image, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    volume = read_volume(path)
    # canonical LPS: x grows towards the patient's left, so the marked column is now the last one
    assert volume.array[:, :, -1].min() == 1.0 and volume.array[:, :, :-1].max() == 0.0
    # likewise -y: row 0 is the most posterior row, the last one once y grows towards posterior
    image2 = np.zeros((2, 4, 6), np.float32)
    image2[:, 0, :] = 1.0
    volume2 = read_volume(write_image(tmp_path / "ras2.nii.gz", image2, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)))
    assert volume2.array[:, -1, :].min() == 1.0 and volume2.array[:, :-1, :].max() == 0.0
