"""Which way up an input goes into the model.

A dataset's ``flip`` mends its own files, whose header contradicts their anatomy (BTCV's put the
spine where the header says anterior). A scan from a scanner has a correct header and needs no flip.
``auto`` asks the model: it segments a few slices both ways and keeps the way it is surer of its
foreground in, the dataset's flip when they tie. ``dataset`` always flips as the dataset's files
needed; ``header`` trusts the header.
"""

from __future__ import annotations

import numpy as np
import torch

ORIENTATIONS = ("auto", "dataset", "header")
PROBE_SLICES = 16


def probe_indices(num_slices: int) -> np.ndarray:
    """Up to :data:`PROBE_SLICES` slices spread over the middle 60 % of a volume (its ends may hold
    little anatomy)."""
    lo, hi = int(num_slices * 0.2), max(int(num_slices * 0.8) - 1, int(num_slices * 0.2))
    return np.unique(np.linspace(lo, hi, min(PROBE_SLICES, num_slices)).round().astype(int))


def foreground_confidence(probabilities: torch.Tensor) -> float:
    """Mean top-class probability over the pixels called foreground (background below 0.5), from
    ``probabilities [b, C, H, W]`` with background first; 0 when nothing is foreground."""
    foreground = probabilities[:, 0] < 0.5
    if not foreground.any():
        return 0.0
    return float(probabilities.max(dim=1).values[foreground].mean())


def flip_note(dataset: str, flip: list[str], kept: float, other: float) -> str:
    """The line that says the dataset's flip was left out for this input."""
    return (f"segmented as its header orients it, without {dataset}'s flip {flip} (which mends that dataset's own "
            f"files): the model is surer that way (foreground confidence {other:.3f} vs {kept:.3f}); "
            "--orientation dataset applies the flip")  # fmt: skip
