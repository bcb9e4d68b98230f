"""Datasets whose shared organs lie in mirrored order in the canonical slice: the mark of a header that
contradicts the anatomy in one of them (BTCV against CHAOS). ``prepare`` warns about such pairs."""

from __future__ import annotations

import numpy as np

from ..config import FLIP_AXES


def organ_positions(labels: np.ndarray, slice_dataset: np.ndarray, datasets: int, classes: int) -> np.ndarray:
    """Mean position of every class in every dataset's slices, as a fraction of the slice side:
    ``[datasets, classes, 2]`` (y, x), NaN where a dataset has no pixel of the class. Every second
    pixel of every slice is enough for a mean."""
    size = labels.shape[-1]
    grid = np.arange(0, size, 2, dtype=np.float64) / size
    sums = np.zeros((datasets, 3, classes))  # count, sum of y, sum of x
    for start in range(0, labels.shape[0], 256):
        chunk = np.asarray(labels[start : start + 256, ::2, ::2])
        owner = slice_dataset[start : start + 256]
        for d in np.unique(owner):
            part = chunk[owner == d].reshape(-1, grid.size, grid.size)
            flat = part.reshape(-1).astype(np.int64)
            ys = np.broadcast_to(grid[None, :, None], part.shape).reshape(-1)
            xs = np.broadcast_to(grid[None, None, :], part.shape).reshape(-1)
            sums[d, 0] += np.bincount(flat, minlength=classes)[:classes]
            sums[d, 1] += np.bincount(flat, weights=ys, minlength=classes)[:classes]
            sums[d, 2] += np.bincount(flat, weights=xs, minlength=classes)[:classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[:, :1] > 0, sums[:, 1:] / sums[:, :1], np.nan).transpose(0, 2, 1)


def mirrored_datasets(labels: np.ndarray, slice_dataset: np.ndarray, names: list[str], vocabulary: list[str],
                      min_shared: int = 3) -> list[str]:  # fmt: skip
    """Warnings for pairs of datasets whose shared organs lie in mirrored order along an axis of the
    canonical slice (their positions anti-correlated), the mark of a header that contradicts the
    anatomy in one of them. Needs at least ``min_shared`` organs labelled in both."""
    positions = organ_positions(labels, slice_dataset, len(names), len(vocabulary))
    warnings = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            shared = [k for k in range(1, len(vocabulary)) if not np.isnan(positions[[a, b], k]).any()]
            if len(shared) < min_shared:
                continue
            for name, axis in (("y", 0), ("x", 1)):  # the order of organ_positions' last axis
                pa, pb = positions[a, shared, axis], positions[b, shared, axis]
                if pa.std() < 0.02 or pb.std() < 0.02:
                    continue
                corr = float(np.corrcoef(pa, pb)[0, 1])
                if corr < -0.5:
                    organs = ", ".join(vocabulary[k] for k in shared)
                    warnings.append(
                        f"{names[a]} and {names[b]} share {organs}, but their order along {name} "
                        f"({FLIP_AXES[name]}) is mirrored (correlation {corr:.2f}): if one dataset's headers "
                        f"contradict its anatomy, give it 'flip: [{name}]' in the config"
                    )
    return warnings
