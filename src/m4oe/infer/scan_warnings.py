"""What ``predict`` warns about while it segments: a CT normalised as MRI, a header whose voxel sizes
tools read differently, and structures cut by the model's field of view."""

from __future__ import annotations

import numpy as np

from ..data.io import Volume, negative_voxel_sizes
from ..data.resample import SlicePlan


def modality_warnings(volume: Volume, normalization: dict, modalities: list[str]) -> list[str]:
    """A CT (Hounsfield units: much of the volume near -1000, air) given to a model whose
    normalisation for this request is MRI-style gives labels that mean nothing: say so."""
    if normalization.get("scheme") != "mri":
        return []
    sample = volume.array[:: max(1, volume.array.shape[0] // 8)]
    if float(np.percentile(sample, 5)) < -500:
        return [
            f"this looks like a CT (5th intensity percentile below -500, as air in Hounsfield units) but is "
            f"normalised as MRI; this model's experts are {modalities}: check --dataset / --modality"
        ]
    return []


def header_warnings(volume: Volume) -> list[str]:
    """A NIfTI whose header gives a negative voxel size is oriented one way by ITK and another by
    nibabel-based tools: say so (its label map copies its header, so each tool shows both alike)."""
    sizes = negative_voxel_sizes(volume.source) if volume.source is not None else None
    if sizes is None:
        return []
    return [
        f"its header gives a negative voxel size (pixdim[1:4] = {sizes}), which ITK reads as a mirrored axis and "
        "nibabel as a positive size: tools disagree on its orientation. The label map copies its header, so each "
        "tool overlays it on the scan as it shows the scan; fix the scan's header to remove the ambiguity"
    ]


def _fov_edges(labels: np.ndarray, plan: SlicePlan) -> list[np.ndarray]:
    """The four edges of a cut-down field of view in ``labels`` (the plan's orientation); none without a cut."""
    if plan.crop is None:
        return []
    top, bottom, left, right = plan.crop
    return [labels[:, top], labels[:, bottom - 1], labels[:, top:bottom, left], labels[:, top:bottom, right - 1]]


def fov_edge_classes(labels: np.ndarray, plan: SlicePlan) -> set[int]:
    """The class indices of ``labels`` on the edge of a cut-down field of view."""
    return {int(v) for e in _fov_edges(labels, plan) for v in np.unique(e)}


def edge_warnings(labels: np.ndarray, plan: SlicePlan, fov: float) -> list[str]:
    """A structure that reaches the edge of a cut-down field of view may go on beyond it: say so."""
    edges = _fov_edges(labels, plan)
    touching = sum(int(np.count_nonzero(e)) for e in edges)
    if not touching:
        return []
    return [
        f"{touching} labelled pixels touch the edge of the model's field of view (the central {fov:g} of each "
        "side, as in training): a structure there may extend beyond it and be cut"
    ]
