"""The demo end to end (quick variant), and the overlay / expert-map pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from m4oe.cli import app
from m4oe.viz.overlay import render_overlay

pytestmark = pytest.mark.slow  # the fast tier (pytest -m 'not slow') leaves this file out


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "m4oe-convnext-s" in result.output and "Dice" in result.output and "liver" in result.output
    summary = json.loads((out / "evaluation" / "summary.json").read_text().replace("NaN", "null"))
    assert summary["metric_per_case"][0]["reference_file"].endswith("chaos_21.nii.gz")
    for picture in ("overlay.png", "experts/experts.png", "train/curve.png"):
        assert (out / picture).stat().st_size > 5000, picture
    assert (out / "predictions" / "tsct_001.nii.gz").is_file()
    table = (out / "experts" / "experts.md").read_text()
    assert table.startswith("| block | MRI | CT |")


def test_overlay_draws_planes_through_the_organ(tmp_path):
    image = np.random.default_rng(0).normal(size=(10, 30, 20)).astype(np.float32)
    label = np.zeros(image.shape, np.int64)
    label[6:9, 20:25, 3:8] = 2
    path = render_overlay(image, (3.0, 1.0, 1.0), {"reference": label, "prediction": label}, tmp_path / "o.png",
                          label_names={2: "spleen"})  # fmt: skip
    import matplotlib.image as mpimg

    picture = mpimg.imread(path)
    assert picture.shape[0] > 500 and picture.shape[1] > 600
    # the organ's colour shows up (not just grey): some pixels have distinct RGB channels
    rgb = picture[..., :3]
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 0.2).sum() > 100
