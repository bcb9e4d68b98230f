"""The benchmark harness in its quick mode (figures are printed, never asserted as timings)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from m4oe.bench import loop_reference
from m4oe.cli import app
from m4oe.model import create_model, forward_flops
from m4oe.model.moe import MoEMLP
from m4oe.model.swin import WindowAttention

pytestmark = pytest.mark.slow  # the fast tier (pytest -m 'not slow') leaves this file out


def test_bench_quick_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    command = ["bench", "--quick", "--device", "cpu", "--precision", "fp32", "--attention", "sdpa,explicit"]
    result = CliRunner().invoke(app, [*command, "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert [r["attention"] for r in payload["models"]] == ["sdpa", "explicit"]
    for row in payload["models"]:
        assert row["preset"] == "tiny" and row["routing"] == "soft"
        for key in ("train_slices_per_s", "infer_slices_per_s", "train_tflops", "infer_tflops"):
            assert row[key] > 0, key
    assert WindowAttention.kernel == "sdpa"  # the benchmark puts the kernel it found back
    row = payload["models"][0]
    tiny = create_model("tiny", modalities=["CT", "MRI", "cineMRI"],
                        label_sets={"data": ["background"] + [f"class_{k}" for k in range(1, 14)]})  # fmt: skip
    assert row["gflops_forward"] == round(forward_flops(tiny) / 1e9, 3)
    layer = payload["moe_layer"]
    assert layer["fused_ms"] > 0 and layer["loop_ms"] > 0
    assert abs(layer["speedup"] - layer["loop_ms"] / layer["fused_ms"]) < 0.02 * layer["speedup"] + 0.01
    assert "M4oE layer" in result.output


def test_loop_reference_of_the_benchmark_matches_the_fused_layer():
    layer = MoEMLP(8, 16, 3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(5, 8, dtype=torch.float64)
    fused, gates = layer(x, None, "soft")
    assert torch.allclose(loop_reference(layer, x, gates), fused, atol=1e-12)


def test_training_loop_benchmark_quick(tmp_path):
    """benchmarks/train_loop.py runs the real fit() for two epochs and reports the second."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "train_loop.py"
    command = [sys.executable, str(script), "--preset", "tiny", "--batch", "4", "--steps", "3", "--workers", "0",
               "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["img_size"] == 128 and result["steps_per_epoch"] == 3
    assert result["slices_per_s"] > 0 and result["epoch1_slices_per_s"] > 0
    assert all(loss == loss and loss > 0 for loss in result["loss"])  # finite (not NaN), positive
    assert f"{result['slices_per_s']} slices/s" in done.stdout


def test_bench_hard_kernel_ab_records_the_kernel_used(tmp_path):
    from m4oe.model.moe import MoEMLP

    out = tmp_path / "bench.json"
    command = ["bench", "--quick", "--device", "cpu", "--precision", "fp32", "--routing", "soft,hard",
               "--hard-kernel", "grouped,onehot", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["models"]
    assert [(r["routing"], r["hard_kernel"], r["hard_kernel_used"]) for r in rows] == [
        ("soft", "auto", "grouped"),  # soft routing never uses it; the device default is reported
        ("hard", "grouped", "grouped"),
        ("hard", "onehot", "onehot"),
    ]
    assert MoEMLP.grouped_devices == frozenset({"cpu"})  # put back after the run
    assert all(r["train_slices_per_s"] > 0 for r in rows)
    bad = CliRunner().invoke(app, ["bench", "--quick", "--device", "cpu", "--routing", "hard", "--hard-kernel", "x"])
    assert bad.exit_code == 1 and "hard kernel must be one of grouped, onehot, auto, got x" in bad.output


def test_predict_volume_benchmark_quick():
    """benchmarks/predict_volume.py segments a synthetic scan in memory, per routing, without image-IO imports."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "predict_volume.py"
    argv = [str(script), "--preset", "tiny", "--slices", "5", "--size", "48", "--device", "cpu", "--repeats", "1"]
    run = (
        f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('SimpleITK', 'nibabel')))"
    )
    command = [sys.executable, "-c", run]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *lines, last = done.stdout.strip().splitlines()
    assert last == "[]"  # runs where SimpleITK and nibabel are not installed (the GPU machine)
    result = json.loads(lines[-1])
    assert result["shape"] == [48, 48, 5]
    assert [(r["routing"], r["device"], r["batch"]) for r in result["rows"]] == [("soft", "cpu", 8), ("hard", "cpu", 8)]
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["model_seconds"] > 0
        assert abs(row["slices_per_s"] - 5 / row["seconds"]) <= 0.1 + 0.01 * row["slices_per_s"]


def test_learning_benchmark_writes_curves_for_each_variant(tmp_path):
    """benchmarks/learning.py: variants side by side, a per-modality baseline at equal total slices."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from .data_helpers import make_dataset

    config = tmp_path / "base.yaml"
    datasets = [
        {"path": str(make_dataset(tmp_path / "ct", n=3)), "name": "A", "modality": "CT"},
        {"path": str(make_dataset(tmp_path / "mr", n=3, modality="MRI")), "name": "B", "modality": "MRI"},
    ]
    config.write_text(yaml.safe_dump({"split": {"folds": 3}, "datasets": datasets}))
    micro = "model.img_size=32 model.depths=[0,1,1] model.embed_dim=8"
    script = Path(__file__).parents[1] / "benchmarks" / "learning.py"
    command = [sys.executable, str(script), "--config", str(config), "--cache", str(tmp_path / "cache"),
               "--slices", "16", "--points", "2", "--set", "train.batch_size=4", "train.workers=0",
               "--variant", f"m4oe model.preset=m4oe-convnext-s {micro}",
               "--variant", f"per_modality model.preset=convnext-unet-s {micro} train.baseline=per_modality slices=8",
               "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "learning.json").read_text())
    assert [r["variant"] for r in results] == ["m4oe", "per_modality"]
    assert [r["slices"] for r in results] == [16, 16]  # two models of 8 slices each: equal total
    for result in results:
        assert [p["epoch"] for p in result["curve"]] == [1, 2] and {"A", "B"} <= set(result["curve"][-1])
    for result in results:
        seconds = [p["seconds"] for p in result["curve"]]
        assert 0 < seconds[0] <= seconds[1]
    text = (tmp_path / "out" / "learning.md").read_text()
    assert text.startswith("| variant | seed | slices seen | training s | A | B |")
    assert "| variant | seeds | A (spread) | B (spread) | training s |" in text


def _learning_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "learning.py"
    spec = importlib.util.spec_from_file_location("learning_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_curve_seconds_and_seed_summary_by_hand(tmp_path):
    learning = _learning_module()
    header = "epoch,step,loss,epoch_seconds,val_dice,val_dice_A\n"
    (tmp_path / "CT").mkdir()
    (tmp_path / "MRI").mkdir()
    (tmp_path / "CT" / "metrics.csv").write_text(header + "1,5,1.0,10.0,,\n2,10,0.9,12.0,0.5,0.5\n")
    (tmp_path / "MRI" / "metrics.csv").write_text(header + "1,5,1.0,3.0,,\n2,10,0.9,4.0,0.2,\n")
    # one point (epoch 2) after 10 + 12 s of the CT model and 3 + 4 s of the MRI model
    assert learning.curve(tmp_path) == [{"epoch": 2, "seconds": 29.0, "A": 0.5}]
    results = [{"variant": "v", "curve": [{"epoch": 1, "seconds": 10.0, "A": 0.4}]},
               {"variant": "v", "curve": [{"epoch": 1, "seconds": 14.0, "A": 0.7}]}]  # fmt: skip
    lines = learning.summary(results, ["A"])
    assert lines[-1] == "| v | 2 | 0.550 (0.300) | 12 |"
