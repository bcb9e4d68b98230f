from __future__ import annotations

import json

from typer.testing import CliRunner

from m4oe.cli import app
from m4oe.model import create_model, parameter_counts

runner = CliRunner()


def test_info_json_matches_the_model():
    result = runner.invoke(app, ["info", "--preset", "tiny", "--modalities", "CT,MRI", "--num-classes", "5", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    model = create_model("tiny", modalities=["CT", "MRI"], label_sets={"data": ["background", "a", "b", "c", "d"]})
    assert info["params"] == parameter_counts(model)
    assert info["params"]["head"] == 24 * 5
    # hard routing runs one expert instead of two: fewer FLOPs
    assert 0 < info["gflops_per_slice_hard_routing"] < info["gflops_per_slice"]


def test_info_table_and_bad_preset():
    result = runner.invoke(app, ["info", "--preset", "swin-unet"])
    assert result.exit_code == 0 and "GFLOPs" in result.output
    bad = runner.invoke(app, ["info", "--preset", "nope"])
    assert bad.exit_code == 2 and "unknown preset" in bad.output
