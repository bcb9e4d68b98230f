"""The experiment script of docs/results.md, in its smoke mode (tiny model, a few steps, CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.shared_data
def test_table_c_smoke_runs_and_writes_its_table(tmp_path):
    script = str(ROOT / "experiments" / "run_tables.py")
    command = [sys.executable, script, "--table", "C", "--smoke", "--data", str(SHARED_DATA),
               "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "runs" / "table_C.md").read_text()
    parts = re.split(r"^\*\*(\w+)\*\*.*$", text, flags=re.M)  # "**BTCV** (validation DSC %)" opens a table
    tables = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert sorted(tables) == ["ACDC", "BTCV", "CHAOS"]
    rows = {name: [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
            for name, block in tables.items()}  # fmt: skip
    # before the addition (CT + MRI only), after each addition, and all three trained from scratch
    assert [len(rows[d]) for d in ("BTCV", "CHAOS", "ACDC")] == [4, 4, 3]
    assert any("--freeze-old" in r for r in rows["ACDC"]) and any("--full" in r for r in rows["ACDC"])
    header = next(line for line in tables["ACDC"].splitlines() if line.startswith("| model"))
    assert header.split(" | ")[1:4] == ["right_ventricle", "myocardium", "left_ventricle"]
    for line in rows["BTCV"]:
        cells = line.strip("| ").split(" | ")
        assert len(cells) == 1 + 13 + 3, line  # model, 13 organs, mean, time, slices/s
        assert all(0 <= float(c) <= 100 for c in cells[1:14])


def _cpu_reference():
    spec = importlib.util.spec_from_file_location("cpu_reference", ROOT / "experiments" / "cpu_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_reference_sets_each_datasets_field_of_view_and_weight(tmp_path):
    module = _cpu_reference()
    args = argparse.Namespace(data=tmp_path, fov=["ACDC=0.8", "BTCV=1"], img_size=128, slices=28000, points=5,
                              pretrain_slices=5600, batch_size=4, lr=3e-3, seed=0, out=tmp_path / "run",
                              cache=None, model=[], weight=[], train=[])  # fmt: skip
    exp = module.experiment(args)
    assert {d.name: d.fov for d in exp.datasets} == {"BTCV": 1.0, "CHAOS": 1.0, "ACDC": 0.8}
    assert {d.name: d.weight for d in exp.datasets} == {"BTCV": 1.0, "CHAOS": 1.0, "ACDC": 1.0}
    weighted = argparse.Namespace(**{**vars(args), "weight": ["CHAOS=0.7", "ACDC=1.3"]})
    assert {d.name: d.weight for d in module.experiment(weighted).datasets} == {"BTCV": 1.0, "CHAOS": 0.7, "ACDC": 1.3}
    assert "--weight CHAOS=0.7 ACDC=1.3" in module.command(weighted)
    for bad in (["LIDC=2"], ["ACDC=heavy"]):
        with pytest.raises(SystemExit, match="--weight"):
            module.experiment(argparse.Namespace(**{**vars(args), "weight": bad}))
    with pytest.raises(SystemExit, match="weight must be positive"):
        module.experiment(argparse.Namespace(**{**vars(args), "weight": ["ACDC=0"]}))
    assert "--model" not in module.command(args) and exp.model["full_res_convs"] == 1
    assert exp.training.samples_per_epoch == 5600 and exp.training.pretrain_epochs == 1
    assert "--fov ACDC=0.8 BTCV=1 --img-size 128" in module.command(args)
    for bad in (["LIDC=0.5"], ["ACDC"]):
        with pytest.raises(SystemExit, match="--fov"):
            module.experiment(argparse.Namespace(**{**vars(args), "fov": bad}))
    wider = argparse.Namespace(**{**vars(args), "model": ["full_res_convs=1", "depths=[0,1,2,2,2]"]})
    model = module.experiment(wider).model
    assert model["full_res_convs"] == 1 and list(model["depths"]) == [0, 1, 2, 2, 2]
    assert "--model full_res_convs=1 depths=[0,1,2,2,2]" in module.command(wider)
    with pytest.raises(SystemExit, match="--model 'full_res_convs'"):
        module.experiment(argparse.Namespace(**{**vars(args), "model": ["full_res_convs"]}))
    assert exp.training.augment is True
    plain = argparse.Namespace(**{**vars(args), "train": ["augment=false", "foreground_fraction=0.5"]})
    training = module.experiment(plain).training
    assert training.augment is False and training.foreground_fraction == 0.5 and training.batch_size == 4
    assert "--train augment=false foreground_fraction=0.5" in module.command(plain)
    with pytest.raises(SystemExit, match="--train 'augment'"):
        module.experiment(argparse.Namespace(**{**vars(args), "train": ["augment"]}))
    for option, word in (("train", "augmnt=false"), ("model", "full_res_conv=1")):
        with pytest.raises(SystemExit, match=f"--{option} '{word}': unknown field '{word.split('=')[0]}'"):
            module.experiment(argparse.Namespace(**{**vars(args), option: [word]}))


def test_cpu_reference_summary_reports_plain_and_postprocessed_dice():
    module = _cpu_reference()
    organs = {o: 0.5 for o in module.SYNAPSE} | {"esophagus": 0.2}
    validation = {
        "dice": {"BTCV": organs, "CHAOS": {"liver": 0.8, "spleen": 0.6}},
        "dice_postprocessed": {"BTCV": organs | {"liver": 0.9}, "CHAOS": {"liver": 0.8, "spleen": 0.7}},
        "postprocessing": {"BTCV": ["liver"], "CHAOS": ["spleen"]},
    }
    result = module.summary(validation)
    assert result["BTCV"]["synapse8"] == pytest.approx(0.5)
    assert result["BTCV"]["synapse8_postprocessed"] == pytest.approx(0.55)
    assert result["BTCV"]["mean"] == pytest.approx((8 * 0.5 + 0.2) / 9)
    assert result["CHAOS"]["postprocessed"] == pytest.approx(0.75) and result["CHAOS"]["largest_only"] == ["spleen"]
    run = {"command": "c", "minutes": 1.0, "pretrain_minutes": 0.1, "train_minutes": 0.9, "slices": 10}
    text = module.markdown({**run, "img_size": 128, "slices_per_s": 1.0, "validation": result, "curve": []})
    assert "| CHAOS | 0.750 | spleen |" in text and "(8 Synapse organs 0.550) | liver |" in text
