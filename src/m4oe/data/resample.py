"""In-plane fitting of axial slices to the model's square input, and its exact inverse.

Each slice is resampled so that its longer physical side spans ``size`` pixels (aspect ratio kept,
anisotropic pixels made square), then centred and padded to ``size x size``. Predictions are cropped
and resampled back to the original grid (logits, bilinear, before argmax).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SlicePlan:
    """How a ``[Y, X]`` slice maps into a ``size x size`` model input."""

    shape: tuple[int, int]  # original (Y, X)
    resized: tuple[int, int]  # after resampling, before padding
    pad: tuple[int, int]  # (top, left) offset of the resampled slice in the padded input
    size: int

    @classmethod
    def fit(cls, shape_yx: tuple[int, int], spacing_yx: tuple[float, float], size: int) -> SlicePlan:
        extent = (shape_yx[0] * spacing_yx[0], shape_yx[1] * spacing_yx[1])
        pixel = max(extent) / size
        resized = tuple(int(min(size, max(1, round(e / pixel)))) for e in extent)
        pad = ((size - resized[0]) // 2, (size - resized[1]) // 2)
        return cls(tuple(int(s) for s in shape_yx), resized, pad, size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SlicePlan:
        return cls(tuple(values["shape"]), tuple(values["resized"]), tuple(values["pad"]), int(values["size"]))


def fit_slices(volume: torch.Tensor | np.ndarray, plan: SlicePlan, is_label: bool = False) -> torch.Tensor:
    """``[Z, Y, X]`` -> ``[Z, size, size]``; images bilinear (antialiased), labels nearest; padded
    with the volume's minimum (images) or 0 (labels)."""
    x = torch.as_tensor(volume)
    x = x.unsqueeze(1).float()
    if tuple(x.shape[-2:]) != plan.resized:
        if is_label:
            x = F.interpolate(x, size=plan.resized, mode="nearest-exact")
        else:
            x = F.interpolate(x, size=plan.resized, mode="bilinear", align_corners=False, antialias=True)
    fill = 0.0 if is_label or x.numel() == 0 else float(x.min())
    top, left = plan.pad
    bottom = plan.size - plan.resized[0] - top
    right = plan.size - plan.resized[1] - left
    return F.pad(x, (left, right, top, bottom), value=fill).squeeze(1)


def unfit_logits(logits: torch.Tensor, plan: SlicePlan) -> torch.Tensor:
    """``[Z, K, size, size]`` -> ``[Z, K, Y, X]``: crop the padding, resample bilinearly to the original grid."""
    top, left = plan.pad
    crop = logits[:, :, top : top + plan.resized[0], left : left + plan.resized[1]]
    if tuple(crop.shape[-2:]) == plan.shape:
        return crop
    return F.interpolate(crop.float(), size=plan.shape, mode="bilinear", align_corners=False)
