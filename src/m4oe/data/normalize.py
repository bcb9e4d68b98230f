"""Intensity normalisation per dataset, stored as plain statistics (they travel in the model bundle).

* ``ct``: clip to the 0.5 / 99.5 percentiles of foreground intensities of the training cases, then
  z-score with the mean / std of those clipped intensities (nnU-Net's CT scheme). The statistics are
  global, so they work for raw Hounsfield units and for pre-windowed 8-bit data alike.
* ``mri``: per case, clip to the volume's own 0.5 / 99.5 percentiles, then z-score with the clipped
  volume's mean / std (intensities of MRI carry no absolute meaning).
* ``none``: cast to float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PERCENTILES = (0.5, 99.5)
SAMPLES_PER_CASE = 10_000


def sample_foreground(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, n: int = SAMPLES_PER_CASE):
    """Up to ``n`` intensities drawn uniformly from the labelled (non-zero) voxels of a case."""
    values = image[label > 0]
    if values.size > n:
        values = values[rng.choice(values.size, n, replace=False)]
    return values.astype(np.float64)


def ct_statistics(samples: list[np.ndarray]) -> dict[str, Any]:
    """The ``ct`` scheme's statistics from foreground samples of all training cases."""
    nonempty = [s for s in samples if s.size]
    values = np.concatenate(nonempty) if nonempty else np.empty(0)
    if values.size == 0:
        raise ValueError("no foreground voxels to compute CT normalisation statistics from")
    lo, hi = np.percentile(values, PERCENTILES)
    clipped = np.clip(values, lo, hi)
    return {
        "scheme": "ct",
        "clip": [float(lo), float(hi)],
        "mean": float(clipped.mean()),
        "std": float(max(clipped.std(), 1e-8)),
        "percentiles": list(PERCENTILES),
        "num_samples": int(values.size),
    }


def scheme_statistics(scheme: str) -> dict[str, Any]:
    """Statistics of a per-case scheme (nothing to learn from the training set)."""
    if scheme == "mri":
        return {"scheme": "mri", "percentiles": list(PERCENTILES)}
    if scheme == "none":
        return {"scheme": "none"}
    raise ValueError(f"unknown normalisation scheme {scheme!r}")


def normalize(volume: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Apply a scheme's statistics to a volume; returns float32."""
    volume = np.asarray(volume, dtype=np.float32)
    scheme = stats.get("scheme")
    if scheme == "ct":
        lo, hi = stats["clip"]
        return ((np.clip(volume, lo, hi) - stats["mean"]) / stats["std"]).astype(np.float32)
    if scheme == "mri":
        lo, hi = np.percentile(volume, stats.get("percentiles", PERCENTILES))
        clipped = np.clip(volume, lo, hi)
        return ((clipped - clipped.mean()) / max(float(clipped.std()), 1e-8)).astype(np.float32)
    if scheme == "none":
        return volume
    raise ValueError(f"unknown normalisation scheme {scheme!r}")
