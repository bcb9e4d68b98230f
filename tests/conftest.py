from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from m4oe import create_model

SHARED_DATA = Path(os.environ.get("M4OE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HAVE_SHARED_DATA = all((SHARED_DATA / name).is_dir() for name in ("Dataset001_BTCV", "Dataset002_CHAOS_T2"))


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_data: reads the real datasets in ../shared/data")
    # CI sets this, so that it cannot pass by skipping the tests on real data
    if os.environ.get("M4OE_REQUIRE_SHARED_DATA") == "1" and not HAVE_SHARED_DATA:
        raise pytest.UsageError(f"M4OE_REQUIRE_SHARED_DATA=1 but the real data is not in {SHARED_DATA}")


def pytest_collection_modifyitems(config, items):
    for item in items:  # the fast tier (pytest -m "not slow") runs on a plain clone: no real data
        if "shared_data" in item.keywords:
            item.add_marker(pytest.mark.slow)
    if HAVE_SHARED_DATA:
        return
    skip = pytest.mark.skip(reason=f"real data not found in {SHARED_DATA} (set M4OE_SHARED_DATA to its folder)")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


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
