"""What ``predict`` checks of an input's intensities before it segments: the units, and whether they
look like the scans the requested dataset was trained on (the bundle's record of them, see
:mod:`m4oe.data.intensity`). A model given intensities it never saw answers anyway; these checks
say so in one line, and ``--strict`` refuses the input instead."""

from __future__ import annotations

import numpy as np

from ..data.intensity import histogram, looks_stored, overlap, to_physical
from ..data.normalize import normalize

OUTSIDE_LIMIT = 0.05  # a share of voxels outside the training scans' intensities worth a warning
OVERLAP_SHARE = 0.6  # warn below this share of the least overlap any training scan had
AIR_HU = -150.0  # a CT in Hounsfield units holds air or lung below this


def physical_input(array: np.ndarray, normalization: dict, dataset: str) -> tuple[np.ndarray, list[str]]:
    """The input in the units the model was trained in: a scan stored like the dataset's own files
    (whole numbers in 0..255 of a ``stored_window``) is read in that window, with a note saying so."""
    window = normalization.get("stored_window")
    if window is None or not looks_stored(array):
        return array, []
    lo, hi = window
    note = (f"its values are whole numbers in 0..255, as {dataset}'s files store the window {lo:g}..{hi:g}: read in "
            "that window (a scan straight from a scanner is taken in its own units)")  # fmt: skip
    return to_physical(array, window), [note]


def intensity_warnings(array: np.ndarray, normalization: dict, dataset: str) -> list[str]:
    """One line for each way the input's intensities differ from the training scans of ``dataset``
    (none when the bundle holds no record of them: bundles from before m4oe 0.x recorded none)."""
    record = normalization.get("intensity")
    if not record:
        return []
    sample = np.asarray(array)[:: max(1, array.shape[0] // 32)].astype(np.float32)
    problems = []
    if normalization.get("scheme") == "ct":
        problems += _units(sample, normalization, record, dataset)
    share = overlap(histogram(normalize(sample, normalization)), record["histogram"])
    floor = record["overlap_floor"]
    if not problems and share < OVERLAP_SHARE * floor:
        problems.append(
            f"INPUT: its intensities look unlike the scans {dataset} was trained on (histogram overlap "
            f"{share:.0%}, every training scan at least {floor:.0%}): is it the right --dataset?"
        )
    return problems


def _units(sample: np.ndarray, normalization: dict, record: dict, dataset: str) -> list[str]:
    """A CT in other units than the model's: values outside what training saw, or no air in a model
    of Hounsfield units."""
    q = record["quantiles"]
    window = normalization.get("stored_window")
    in_hu = window is not None or q["0.1"] < -500  # the training scans hold air (or a window below water)
    # a scan read in its stored window cannot go below the window's low end: darkness is relative to it
    dark = max(AIR_HU, window[0] + 0.25 * (window[1] - window[0])) if window is not None else AIR_HU
    darkest = float(np.percentile(sample, 1))
    if in_hu and darkest > dark:
        return [f"INPUT: nothing in it is as dark as air in Hounsfield units (1st percentile "
                f"{darkest:.0f}), but {dataset} is a CT model in HU: is it an MRI, or a CT in other "
                "units?"]  # fmt: skip
    if window is not None:
        return []  # the training scans were clipped to the window: any value outside it is read as its edge
    lo, hi = q["0.1"], q["99.9"]
    margin = 0.05 * (hi - lo)
    outside = float(np.mean((sample < lo - margin) | (sample > hi + margin)))
    if outside > OUTSIDE_LIMIT:
        return [f"INPUT: {outside:.0%} of its voxels lie outside the intensities {dataset} was trained on "
                f"({lo:g}..{hi:g}): is it the right --dataset, in the same units?"]  # fmt: skip
    return []
