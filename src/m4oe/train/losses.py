"""Segmentation loss over each sample's own label set: cross-entropy + soft Dice.

The model's head already gives classes outside a sample's label set the lowest logit (probability
zero), so cross-entropy is taken over the sample's own classes. Soft Dice is computed per sample over
its own foreground classes and averaged per sample, so that the loss of a batch is the mean of its
samples' losses: splitting a batch over data-parallel processes gives the same gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config.choices import DICE_MODES
from ..model.head import class_argmax

SMOOTH = 1e-5


def soft_dice_per_sample(probs: Tensor, target: Tensor, classes: Tensor) -> Tensor:
    """Soft Dice of each sample, averaged over its foreground classes that are present: ``[B]``.

    A class counts for a sample when it is one of the sample's own classes and it appears in the
    reference or in the (argmax) prediction, so false-positive organs are penalised while organs
    absent from a slice and not predicted do not pull the score to zero. A sample with no such class
    scores 1 (no Dice loss).

    Args:
        probs: ``[B, K, H, W]`` softmax probabilities.
        target: ``[B, H, W]`` class indices.
        classes: ``[B, K]`` bool, the classes each sample's dataset has (background included).
    """
    one_hot = _one_hot(target, probs.shape[1]).to(probs.dtype)
    dims = (2, 3)
    intersection = (probs * one_hot).sum(dims)
    denominator = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + SMOOTH) / (denominator + SMOOTH)  # [B, K]
    counted = classes & _present_or_predicted(probs, one_hot)
    counted[:, 0] = False
    weights = counted.to(dice.dtype)
    n = weights.sum(1)
    return torch.where(n > 0, (dice * weights).sum(1) / n.clamp_min(1), torch.ones_like(n))


def soft_dice_batch(
    probs: Tensor, target: Tensor, classes: Tensor, dataset: Tensor | None = None, present_only: bool = False
) -> Tensor:
    """nnU-Net's batch Dice, taken within each dataset of a mixed batch: per dataset and class,
    intersection and sizes summed over that dataset's samples, then the mean over the
    (dataset, foreground class) pairs the batch holds.

    Small organs, often absent from a slice, are scored on the batch rather than slice by slice,
    which gives a smoother gradient. Pooling a class over datasets instead would let the dataset
    whose organ is larger or already well segmented set its Dice: on BTCV CT + CHAOS MRI batches
    the CT kidneys then got almost no Dice gradient and were never learned. A scalar ``[]``; it
    depends on the batch, so data-parallel processes each take the Dice of their own share.

    Args:
        probs: ``[B, K, H, W]`` softmax probabilities.
        target: ``[B, H, W]`` class indices.
        classes: ``[B, K]`` bool, the classes each sample's dataset has (background included).
        dataset: ``[B]`` dataset index of each sample; None puts the whole batch in one group.
        present_only: count a (dataset, class) pair only when the class is in that group's reference
            or (argmax) prediction. nnU-Net counts every class, and an absent class then scores
            ``smooth / (sum of its probabilities + smooth)``: the loss rewards pushing a class's
            probability towards 1e-5 on the whole batch, which for an organ absent from most batches
            (the gallbladder on BTCV batches of one or two slices) outweighs learning it, and in long
            runs the organ was never predicted again (probability 0.000 even on training slices).
    """
    one_hot = _one_hot(target, probs.shape[1]).to(probs.dtype)
    has = classes.to(probs.dtype)  # a sample counts only for its own classes
    if present_only:
        has = has * _present_or_predicted(probs, one_hot).to(probs.dtype)
    intersection = (probs * one_hot).sum((2, 3)) * has  # [B, K]
    denominator = (probs + one_hot).sum((2, 3)) * has
    if dataset is None:
        dataset = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    # groups[i, j]: samples i and j come from the same dataset (no read-back of how many datasets)
    groups = (dataset[:, None] == dataset[None, :]).to(probs.dtype)
    first = groups.tril(-1).sum(1) == 0  # row i speaks for its group when no earlier sample shares it
    dice = (2 * (groups @ intersection) + SMOOTH) / (groups @ denominator + SMOOTH)  # [B, K] per group
    counted = first[:, None] & (groups @ has > 0)
    counted[:, 0] = False
    return (dice * counted).sum() / counted.sum().clamp_min(1)


def _present_or_predicted(probs: Tensor, one_hot: Tensor) -> Tensor:
    """``[B, K]`` bool: each sample's classes that are in its reference or its (argmax) prediction."""
    predicted = _one_hot(class_argmax(probs.detach()), probs.shape[1]).amax(dim=(2, 3))
    return (one_hot.sum((2, 3)) > 0) | predicted


def _one_hot(index: Tensor, classes: int) -> Tensor:
    """``[B, H, W]`` class indices -> ``[B, K, H, W]`` bool. Unlike ``F.one_hot`` it reads no value
    back to check the range (a device sync per call) and makes no int64 copy."""
    return index.unsqueeze(1) == torch.arange(classes, device=index.device).view(1, -1, 1, 1)


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    classes: Tensor,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    dice: str = "sample",
    dataset: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ce_weight * CE + dice_weight * (1 - soft Dice)``; CE a mean over samples, Dice per sample
    (:func:`soft_dice_per_sample`, averaged) or over each dataset's part of the batch
    (:func:`soft_dice_batch`, grouped by ``dataset``, the ``[B]`` dataset index of each sample), over
    all its classes (``batch``) or those present or predicted in the group (``batch_present``).

    Returns the loss and detached parts (``ce``, ``dice``) for logging (no device sync here).
    """
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
    logits = logits.float()
    ce = F.cross_entropy(logits, target, reduction="none").mean(dim=(1, 2))
    probs = logits.softmax(1)
    score = (
        soft_dice_per_sample(probs, target, classes).mean()
        if dice == "sample"
        else soft_dice_batch(probs, target, classes, dataset, present_only=dice == "batch_present")
    )
    loss = ce_weight * ce.mean() + dice_weight * (1 - score)
    return loss, {"ce": ce.mean().detach(), "dice": score.detach()}


def deep_supervision_loss(
    logits: Tensor, aux: list[Tensor], target: Tensor, classes: Tensor, **kwargs
) -> tuple[Tensor, dict[str, Tensor]]:
    """nnU-Net's deep supervision: the loss at full resolution plus the losses of coarser outputs
    (against the label map subsampled to their size), weighted 1, 1/2, 1/4, ... and normalised to
    sum to 1. The logged parts are those of the full-resolution output."""
    loss, logs = segmentation_loss(logits, target, classes, **kwargs)
    weights = [0.5 ** (i + 1) for i in range(len(aux))]
    total = loss
    for weight, coarse in zip(weights, aux, strict=True):
        step = target.shape[-1] // coarse.shape[-1]
        total = total + weight * segmentation_loss(coarse, target[:, ::step, ::step], classes, **kwargs)[0]
    return total / (1 + sum(weights)), logs
