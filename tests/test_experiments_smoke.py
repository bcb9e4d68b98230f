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

pytestmark = pytest.mark.slow  # the fast tier (pytest -m 'not slow') leaves this file out

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


def _args(tmp_path, **given):
    values = {"data": tmp_path, "slices": None, "minutes": None, "points": None, "pretrain_slices": None, "seed": 0,
              "out": tmp_path / "run", "cache": None, "set": []}  # fmt: skip
    return argparse.Namespace(**{**values, **given})


def test_cpu_reference_reads_its_recipe_and_takes_set_words(tmp_path):
    module = _cpu_reference()
    args = _args(tmp_path, slices=28000, points=5, pretrain_slices=5600)
    exp = module.experiment(args)
    assert {d.name: d.fov for d in exp.datasets} == {"BTCV": 1.0, "CHAOS": 1.0, "ACDC": 0.8}
    assert {d.name: d.weight for d in exp.datasets} == {"BTCV": 1.0, "CHAOS": 1.0, "ACDC": 1.0}
    assert exp.model == {"preset": "m4oe-convnext-s", "img_size": 128, "full_res_convs": 1}
    training = exp.training
    assert (training.batch_size, training.lr, training.dice, training.foreground_sampling) == (
        4,
        3e-3,
        "batch_present",
        "class",
    )
    assert training.samples_per_epoch == 5600 and training.epochs == 5 and training.minutes is None
    assert (training.pretrain_samples_per_epoch, training.pretrain_epochs) == (5600, 1)
    words = ["datasets.CHAOS.weight=0.7", "datasets.ACDC.weight=1.3", "datasets.BTCV.fov=0.9",
             "model.depths=[0,1,2,2,2]", "train.augment=false", "train.foreground_fraction=0.5"]  # fmt: skip
    changed = module.experiment(argparse.Namespace(**{**vars(args), "set": words}))
    assert {d.name: d.weight for d in changed.datasets} == {"BTCV": 1.0, "CHAOS": 0.7, "ACDC": 1.3}
    assert {d.name: d.fov for d in changed.datasets} == {"BTCV": 0.9, "CHAOS": 1.0, "ACDC": 0.8}
    assert list(changed.model["depths"]) == [0, 1, 2, 2, 2] and changed.model["full_res_convs"] == 1
    assert changed.training.augment is False and changed.training.foreground_fraction == 0.5
    assert "--set datasets.CHAOS.weight=0.7" in module.command(argparse.Namespace(**{**vars(args), "set": words}))
    for bad, message in ((["datasets.LIDC.weight=2"], "no dataset named 'LIDC'"), (["train.augment"], "SECTION.KEY"),
                         (["datasets.ACDC.weight=0"], "weight must be positive"),
                         (["train.augmnt=false"], r"unknown keys \['augmnt'\]"),
                         (["model.full_res_conv=1"], r"unknown keys \['full_res_conv'\]")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            module.experiment(argparse.Namespace(**{**vars(args), "set": bad}))


def test_cpu_reference_is_the_recipes_hour_unless_slices_are_given(tmp_path):
    module = _cpu_reference()
    shipped = module.experiment(_args(tmp_path)).training  # the recipe as m4oe pretrain / train read it
    assert (shipped.minutes, shipped.epochs, shipped.pretrain_samples_per_epoch, shipped.pretrain_epochs) == (
        60, 5, 5600, 1)  # fmt: skip
    assert shipped.routing == "hard"  # modality experts by construction (docs/results.md, section 1)
    assert module.experiment(_args(tmp_path, minutes=30.0)).training.minutes == 30.0
    fixed = module.experiment(_args(tmp_path, slices=56000, points=7)).training
    assert (fixed.minutes, fixed.samples_per_epoch, fixed.epochs) == (None, 8000, 7)
    with pytest.raises(SystemExit, match=r"--slices 19: give at least one batch per validation point \(5 x 4\)"):
        module.experiment(_args(tmp_path, slices=19))
    with pytest.raises(SystemExit, match="train.minutes must be a positive number"):
        module.experiment(_args(tmp_path, minutes=-1.0))


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


def test_cpu_reference_refuses_minutes_that_are_not_positive(tmp_path):
    script = ROOT / "experiments" / "cpu_reference.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "run"), "--minutes", "0"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "train.minutes must be a positive number" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_cpu_reference_keeps_every_repeated_set_word(tmp_path):
    # `--set A --set B` as m4oe train takes it: both words count (a second --set once dropped the first)
    script = ROOT / "experiments" / "cpu_reference.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "run"), "--data", str(tmp_path),
                           "--set", "train.augmnt=false", "--set", "train.lr=0.01"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "unknown keys ['augmnt']" in done.stderr
    assert not (tmp_path / "run").exists()
