"""The experiment script of docs/results.md, in its smoke mode (tiny model, a few steps, CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from m4oe.train.loop import History

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


def test_cpu_reference_reads_its_recipe_and_takes_set_words(tmp_path):
    module = _cpu_reference()
    args = argparse.Namespace(data=tmp_path, slices=28000, points=5, pretrain_slices=5600, seed=0,
                              out=tmp_path / "run", cache=None, set=[])  # fmt: skip
    exp = module.experiment(args)
    assert {d.name: d.fov for d in exp.datasets} == {"BTCV": 1.0, "CHAOS": 1.0, "ACDC": 0.8}
    assert {d.name: d.weight for d in exp.datasets} == {"BTCV": 1.0, "CHAOS": 1.0, "ACDC": 1.0}
    assert exp.model == {"preset": "m4oe-convnext-s", "img_size": 128, "full_res_convs": 1}
    training = exp.training
    assert (training.batch_size, training.lr, training.dice, training.foreground_sampling) == (4, 3e-3,
                                                                                              "batch_present", "class")
    assert training.samples_per_epoch == 5600 and training.epochs == 5 and training.pretrain_epochs == 1
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


def test_cpu_reference_phase1_runs_exactly_its_slices_in_one_epoch(tmp_path):
    module = _cpu_reference()
    args = argparse.Namespace(data=tmp_path, slices=56000, points=7, pretrain_slices=5600, seed=0, set=[])
    exp = module.experiment(args)
    assert exp.training.samples_per_epoch == 8000 and exp.training.epochs == 7
    first = module.phase1(exp, 5600).training
    assert (first.samples_per_epoch, first.pretrain_epochs, first.epochs) == (5600, 1, 7)


def test_cpu_reference_fits_phase2_slices_to_the_minutes_left():
    module = _cpu_reference()
    speed = {"pretrain_slices_per_s": 50.0, "pretrain_other_s": 12.0, "slices_per_s": 20.0, "validation_s": 30.0}
    # 60 min less 5 %: 3420 s; less 60 s spent, 12 + 5600 / 50 = 124 s of phase 1, 5 x 30 s of validation
    # leaves 3086 s, 61,720 slices at 20/s; whole batches of 4 at each of 5 points: 61,720 // 20 * 20
    assert module.MARGIN == 0.05
    assert module.fit_slices(60, 60.0, speed, 5600, 5, 4) == 61720
    assert module.fit_slices(30, 60.0, speed, 5600, 5, 4) == (1710 - 60 - 124 - 150) * 20
    with pytest.raises(SystemExit, match="--minutes 3: too short on this machine"):
        module.fit_slices(3, 60.0, speed, 5600, 5, 4)


def test_cpu_reference_calibration_separates_steps_from_the_rest(tmp_path, monkeypatch):
    module = _cpu_reference()
    clock = iter([100.0, 110.0, 145.0])  # phase 1 takes 10 s in all, phase 2 35 s
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))
    runs = {}

    def fake_run(*seconds, returns=lambda history: history):
        def run(exp, out, cache, init=None, progress=True):
            runs[out.name] = exp.training
            out.mkdir(parents=True)
            rows = [{"epoch": epoch, "epoch_seconds": s} for epoch, s in enumerate(seconds, 1)]
            return returns(History(rows))

        return run

    monkeypatch.setattr(module, "run_pretrain", fake_run(4.0))
    # run_train returns a history per model ("all": the one M4oE model); phase 2 is timed on its second epoch
    monkeypatch.setattr(module, "run_train", fake_run(9.0, 7.0, returns=lambda history: {"all": history}))
    args = argparse.Namespace(data=tmp_path, slices=28000, points=5, pretrain_slices=5600, seed=0, set=[],
                              out=tmp_path / "run")  # fmt: skip
    speed = module.calibrate(args, tmp_path / "cache")
    slices = 4 * module.CALIBRATION_STEPS
    assert speed["pretrain_slices_per_s"] == pytest.approx(slices / 4.0)
    assert speed["pretrain_other_s"] == pytest.approx(6.0)
    assert speed["slices_per_s"] == pytest.approx(slices / 7.0)
    assert speed["validation_s"] == pytest.approx(19.0)
    assert (runs["pretrain"].samples_per_epoch, runs["pretrain"].pretrain_epochs) == (slices, 1)
    assert (runs["train"].samples_per_epoch, runs["train"].epochs, runs["train"].val_every) == (slices, 2, 2)
    assert not (tmp_path / "run" / "calibration").exists()


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
    assert done.returncode != 0 and "--minutes 0: give a positive number" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_cpu_reference_budget_is_an_hour_unless_slices_are_given():
    module = _cpu_reference()

    def resolved(**given):
        args = argparse.Namespace(**{"slices": None, "minutes": None, "points": 5, "set": [], **given})
        module.resolve_budget(args)
        return args.slices, args.minutes

    assert resolved() == (None, 60.0)
    assert resolved(minutes=30.0) == (None, 30.0)
    assert resolved(slices=28000) == (28000, None)
    with pytest.raises(SystemExit, match="--slices and --minutes: give one of them"):
        resolved(slices=28000, minutes=60.0)
    with pytest.raises(SystemExit, match=r"--slices 19: give at least one batch per validation point \(5 x 4\)"):
        resolved(slices=19)
    with pytest.raises(SystemExit, match="--minutes -1: give a positive number"):
        resolved(minutes=-1.0)
