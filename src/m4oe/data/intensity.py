"""Intensities in physical units, and the record of what a dataset's scans look like.

A dataset may store its scans in other units than the scanner's: BTCV's files hold the Hounsfield
window -125..275 scaled to 0..255. Its ``stored_window`` maps them back (:func:`to_physical`), so
that statistics, normalisation and the bundle are in physical units and a CT straight from a scanner
is taken as it is.

:func:`intensity_record` summarises the training scans of a dataset for the bundle: quantiles of
their intensities (physical units) and the histogram of their normalised intensities, with the
lowest overlap any training scan has with that histogram. ``predict`` compares an input with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STORED_RANGE = (0.0, 255.0)  # a stored window is scaled to 8 bits
QUANTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
HISTOGRAM_EDGES = np.linspace(-6.0, 6.0, 49)  # normalised units; values beyond fall in the end bins
SAMPLES_PER_CASE = 20_000


def to_physical(array: np.ndarray, window: tuple[float, float] | list[float] | None) -> np.ndarray:
    """Stored values of a ``window`` (0..255 for ``window[0]..window[1]``) in physical units;
    the array unchanged without a window."""
    if window is None:
        return array
    lo, hi = window
    scale = (hi - lo) / (STORED_RANGE[1] - STORED_RANGE[0])
    return (np.asarray(array, dtype=np.float32) - STORED_RANGE[0]) * np.float32(scale) + np.float32(lo)


def looks_stored(array: np.ndarray) -> bool:
    """Whether a scan's values are all whole numbers in 0..255, as a stored 8-bit window's are
    (never a CT in Hounsfield units, where air lies near -1000)."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 200_000)]
    lo, hi = float(array.min()), float(array.max())
    return STORED_RANGE[0] <= lo and hi <= STORED_RANGE[1] and bool(np.all(sample == np.round(sample)))


def sample_volume(array: np.ndarray, rng: np.random.Generator, n: int = SAMPLES_PER_CASE) -> np.ndarray:
    """Up to ``n`` intensities drawn uniformly from the whole volume."""
    flat = np.asarray(array).ravel()
    if flat.size > n:
        flat = flat[rng.choice(flat.size, n, replace=False)]
    return flat.astype(np.float64)


def histogram(normalised: np.ndarray) -> np.ndarray:
    """Fractions of the normalised intensities in :data:`HISTOGRAM_EDGES`' bins."""
    values = np.clip(np.asarray(normalised, dtype=np.float32).ravel(), HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    counts, _ = np.histogram(values, HISTOGRAM_EDGES)
    return counts / max(counts.sum(), 1)


def overlap(p: np.ndarray, q: np.ndarray) -> float:
    """The shared mass of two histograms of fractions: 1 when equal, 0 when apart."""
    return float(np.minimum(np.asarray(p), np.asarray(q)).sum())


def intensity_record(samples: list[np.ndarray], histograms: list[np.ndarray]) -> dict[str, Any]:
    """What the training scans of a dataset look like (see the module's docstring)."""
    values = np.concatenate(samples)
    pooled = np.mean(histograms, axis=0)
    return {
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.percentile(values, QUANTILES), strict=True)},
        "histogram": [round(float(f), 6) for f in pooled],
        "overlap_floor": round(min(overlap(h, pooled) for h in histograms), 4),
    }


def intensity_records(sources, checks: list[dict], written: list[dict]) -> dict[str, dict[str, Any]]:
    """Each dataset's :func:`intensity_record` from prepare's per-case results (in the order of its
    sources' cases): ``volume_samples`` of the check and ``histogram`` of the written slices."""
    records, k = {}, 0
    for source in sources:
        n = len(source.cases)
        samples = [r["volume_samples"] for r in checks[k : k + n]]
        records[source.name] = intensity_record(samples, [w["histogram"] for w in written[k : k + n]])
        k += n
    return records
