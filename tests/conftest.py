from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from m4oe import create_model

SHARED_DATA = Path(os.environ.get("M4OE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

LABEL_SETS = {
    "ct": ["background", "spleen", "right_kidney", "left_kidney", "liver"],
    "mri": ["background", "liver", "right_kidney", "left_kidney", "spleen"],
    "heart": ["background", "right_ventricle", "myocardium", "left_ventricle"],
}
MODALITIES = ["CT", "MRI", "cineMRI"]

# A very small model config: 64 px slices, window 2 (grid 16, 8, 4, 2), narrow stages.
MICRO = dict(img_size=64, embed_dim=16, num_heads=(1, 2, 2, 4), window_size=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def micro_model():
    return create_model("tiny", modalities=MODALITIES, label_sets=LABEL_SETS, **MICRO)


def batch(n: int, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, size, size, generator=g)
    modality = torch.arange(n) % len(MODALITIES)
    dataset = torch.arange(n) % len(LABEL_SETS)
    return image, modality, dataset
