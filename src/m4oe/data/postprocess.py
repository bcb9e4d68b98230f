"""Label-map post-processing: keep each class's largest 3D connected component.

Training chooses, per dataset and class, whether this raises the validation Dice (as nnU-Net
chooses its post-processing on cross-validation); the choice travels in the bundle and ``predict``
applies it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: diagonal neighbours join


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean ``[Z, Y, X]`` mask (ties: the first found)."""
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=_CONNECTIVITY)
    if count <= 1:
        return mask.astype(bool, copy=False)
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def keep_largest_components(labels: np.ndarray, classes: Iterable[int] | None = None) -> np.ndarray:
    """Set to background every voxel of ``classes`` (default: every non-zero class) outside that
    class's largest connected component. Other classes are left as they are."""
    chosen = np.unique(labels) if classes is None else np.asarray(list(classes), dtype=np.int64)
    out = labels.copy()
    for k in chosen:
        if k == 0:
            continue
        mask = labels == k
        if mask.any():
            out[mask & ~largest_component(mask)] = 0
    return out
