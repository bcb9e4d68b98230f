"""In-plane fitting of axial slices to the model's square input, and its exact inverse.

Each slice is first cut to its field of view (the central ``fov`` fraction of each side; all of it by
default), then resampled so that the longer physical side of that view spans ``size`` pixels (aspect
ratio kept, anisotropic pixels made square), then centred and padded to ``size x size``. Predictions
are cropped and resampled back to the original grid (logits, bilinear, before argmax); outside the
field of view they are background.
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
    crop: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) of the part seen; None: all

    @classmethod
    def fit(cls, shape_yx: tuple[int, int], spacing_yx: tuple[float, float], size: int, fov: float = 1.0) -> SlicePlan:
        shape = (int(shape_yx[0]), int(shape_yx[1]))
        crop = view_box(shape, fov)
        seen = (crop[1] - crop[0], crop[3] - crop[2])
        extent = (seen[0] * spacing_yx[0], seen[1] * spacing_yx[1])
        pixel = max(extent) / size
        resized = tuple(int(min(size, max(1, round(e / pixel)))) for e in extent)
        pad = ((size - resized[0]) // 2, (size - resized[1]) // 2)
        return cls(shape, resized, pad, size, None if seen == shape else crop)

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.crop is None:  # plans written before the field of view existed read back the same
            del values["crop"]
        return values

    @classmethod
    def from_dict(cls, values: dict) -> SlicePlan:
        crop = tuple(values["crop"]) if values.get("crop") is not None else None
        return cls(tuple(values["shape"]), tuple(values["resized"]), tuple(values["pad"]), int(values["size"]), crop)


def view_box(shape_yx: tuple[int, int], fov: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: the central ``fov`` fraction of each side of a ``[Y, X]`` slice."""
    if not 0 < fov <= 1:
        raise ValueError(f"fov must be in (0, 1], got {fov}")
    box = []
    for side in shape_yx:
        kept = min(side, max(1, round(side * fov)))
        start = (side - kept) // 2
        box += [start, start + kept]
    return tuple(box)


def outside_view(label: np.ndarray, fov: float) -> int:
    """Labelled (non-zero) voxels of a ``[Z, Y, X]`` volume outside its central ``fov`` view."""
    top, bottom, left, right = view_box(label.shape[-2:], fov)
    return int(np.count_nonzero(label)) - int(np.count_nonzero(label[..., top:bottom, left:right]))


def fov_needed(label: np.ndarray) -> float:
    """The smallest central fraction of each side of a ``[Z, Y, X]`` volume that holds all its labels."""
    seen = np.nonzero(np.asarray(label).any(axis=0))
    if seen[0].size == 0:
        return 0.0
    need = 0.0
    for coords, side in zip(seen, label.shape[-2:], strict=True):
        reach = max(side / 2 - coords.min(), coords.max() + 1 - side / 2)
        need = max(need, 2 * reach / side)
    return float(need)


def fit_slices(volume: torch.Tensor | np.ndarray, plan: SlicePlan, is_label: bool = False) -> torch.Tensor:
    """``[Z, Y, X]`` -> ``[Z, size, size]``; images bilinear (antialiased), labels nearest; padded
    with the volume's minimum (images) or 0 (labels)."""
    x = torch.as_tensor(volume)
    if plan.crop is not None:
        top, bottom, left, right = plan.crop
        x = x[:, top:bottom, left:right]
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


def unfit_logits(logits: torch.Tensor, plan: SlicePlan, probabilities: bool = False) -> torch.Tensor:
    """``[Z, K, size, size]`` -> ``[Z, K, Y, X]``: crop the padding, resample bilinearly to the original
    grid. Outside the plan's field of view every pixel is class 0 (background): logits 0 there and
    -1e4 for the other classes, or probabilities 1 and 0 when ``probabilities``."""
    top, left = plan.pad
    scores = logits[:, :, top : top + plan.resized[0], left : left + plan.resized[1]]
    crop = plan.crop or (0, plan.shape[0], 0, plan.shape[1])
    seen = (crop[1] - crop[0], crop[3] - crop[2])
    if tuple(scores.shape[-2:]) != seen:
        scores = F.interpolate(scores.float(), size=seen, mode="bilinear", align_corners=False)
    if plan.crop is None:
        return scores
    background, other = (1.0, 0.0) if probabilities else (0.0, -1e4)
    out = scores.new_full((*scores.shape[:2], *plan.shape), other)
    out[:, 0] = background
    out[:, :, crop[0] : crop[1], crop[2] : crop[3]] = scores
    return out
