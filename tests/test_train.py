"""Two-phase training (CPU, tiny model): losses and Dice on a tiny real subset; the loop's mechanics
(resume, NaN stop, device read-backs, dataset weights, per-modality runs, DDP) on synthetic phantoms,
so that a plain clone runs them."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from m4oe import create_model, load_bundle
from m4oe.config import load_experiment
from m4oe.model.mae import load_pretrained
from m4oe.train.finetune import run_train
from m4oe.train.loop import TrainingDiverged, record_organ_dice
from m4oe.train.pretrain import run_pretrain

from .conftest import MICRO, SHARED_DATA

pytestmark = pytest.mark.slow  # the fast tier (pytest -m 'not slow') leaves this file out

TRAIN = dict(batch_size=8, samples_per_epoch=160, lr=0.002, val_every=5, workers=0, warmup_epochs=0.2, seed=0)


def write_config(tmp: Path, **train) -> Path:
    """The real subset (BTCV and CHAOS, four cases each), or, in a folder (or below one) holding
    ``synthetic/``, phantom datasets of the same names."""
    synthetic = next((f / "synthetic" for f in (tmp, tmp.parent) if (f / "synthetic").is_dir()), None)
    if synthetic is not None:
        datasets = [{"path": str(synthetic / name), "name": name, "modality": modality}
                    for name, modality in (("BTCV", "CT"), ("CHAOS", "MRI"))]  # fmt: skip
    else:
        datasets = [
            {"path": str(SHARED_DATA / "Dataset001_BTCV"), "name": "BTCV", "modality": "CT", "max_cases": 4},
            {"path": str(SHARED_DATA / "Dataset002_CHAOS_T2"), "name": "CHAOS", "modality": "MRI", "max_cases": 4},
        ]
    config = {
        "model": {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()}},
        "split": {"folds": 2},
        "train": {**TRAIN, **train},
        "datasets": datasets,
    }
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def mechanics(tmp_path_factory):
    """A folder with two phantom datasets (CT and MRI, four cases each) and the cache path: for the
    tests of the loop's mechanics, which need no real anatomy."""
    from .data_helpers import make_dataset

    root = tmp_path_factory.mktemp("mechanics")
    make_dataset(root / "synthetic" / "BTCV", n=4)
    make_dataset(root / "synthetic" / "CHAOS", n=4, modality="MRI")
    return root, root / "cache"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def cache_dir(workdir):
    return workdir / "cache"


def experiment(workdir: Path, **train):
    return load_experiment(write_config(workdir, **train))


@pytest.fixture(scope="module")
def pretrained(workdir, cache_dir):
    out = workdir / "pre"
    history = run_pretrain(experiment(workdir, pretrain_epochs=4), out, cache_dir, progress=False)
    return out, history


@pytest.mark.shared_data
def test_pretrain_loss_falls_on_real_slices(pretrained):
    out, history = pretrained
    losses = [row["loss"] for row in history.rows]
    assert len(losses) == 4
    assert losses[-1] < losses[0] * 0.9
    bundle = load_bundle(out / "last")
    assert bundle.bundle_extra["phase"] == "pretrain"
    assert set(bundle.bundle_extra["datasets"]) == {"BTCV", "CHAOS"}


@pytest.fixture(scope="module")
def scratch(workdir, cache_dir):
    """A 15-epoch run from scratch on the real subset: its folder and history (shared by the tests below,
    each of which checks one thing about it)."""
    out = workdir / "scratch"
    histories = run_train(experiment(workdir, epochs=15), out, cache_dir, progress=False)
    return out, histories["all"].rows


@pytest.mark.shared_data
def test_train_loss_falls_and_validation_dice_rises(scratch):
    _, rows = scratch
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.75
    dice = [r["val_dice"] for r in rows if "val_dice" in r]
    assert len(dice) == 3
    assert dice[-1] > 0.05  # an untrained model scores ~0 on every organ
    assert rows[-1]["val_dice_CHAOS"] > 0.1


@pytest.mark.shared_data
def test_the_run_folder_holds_metrics_curve_and_gate_weights(scratch):
    out, _ = scratch
    validation = json.loads((out / "validation.json").read_text())
    assert set(validation["gates"]) == {"CT", "MRI"}
    assert (out / "metrics.csv").read_text().startswith("epoch,step,loss")
    assert (out / "curve.png").stat().st_size > 1000


@pytest.mark.shared_data
def test_the_bundle_carries_each_datasets_label_values_and_normalisation(scratch):
    out, _ = scratch
    best = load_bundle(out / "best")
    assert best.bundle_extra["datasets"]["CHAOS"]["label_values"]["liver"] == 1
    assert best.bundle_extra["datasets"]["BTCV"]["normalization"]["scheme"] == "ct"


@pytest.mark.shared_data
def test_the_postprocessing_choice_is_a_loop_over_the_per_case_dice(scratch):
    out, rows = scratch
    validation = json.loads((out / "validation.json").read_text())
    # the choice of the last validation travels with the bundle predict uses
    choice = load_bundle(out / "last").bundle_extra["postprocessing"]["keep_largest"]
    assert choice == validation["postprocessing"] and set(choice) == {"BTCV", "CHAOS"}
    for name, labels in choice.items():  # plain and largest-component Dice of validation.json's cases
        cases = [c for c in validation["cases"] if c["dataset"] == name]
        expected = []
        for label in validation["dice"][name]:
            plain = [c["dice"][label] for c in cases if not math.isnan(c["dice"][label])]
            largest = [c["dice_largest"][label] for c in cases if not math.isnan(c["dice_largest"][label])]
            if plain and sum(largest) / len(largest) > sum(plain) / len(plain):
                expected.append(label)
        assert labels == expected
    assert rows[-1]["val_post_CHAOS"] >= rows[-1]["val_dice_CHAOS"]


@pytest.mark.shared_data
def test_organ_dice_csv_holds_every_validation(scratch):
    out, rows = scratch
    validation = json.loads((out / "validation.json").read_text())
    with open(out / "organ_dice.csv", newline="") as f:
        organ_rows = list(csv.DictReader(f))  # every validation's Dice per organ, not only the last
    assert sorted({int(r["epoch"]) for r in organ_rows}) == [r["epoch"] for r in rows if "val_dice" in r]
    last = {(r["dataset"], r["organ"]): float(r["dice"]) for r in organ_rows if int(r["epoch"]) == rows[-1]["epoch"]}
    expected = {(name, organ): dice for name, organs in validation["dice"].items() for organ, dice in organs.items()}
    assert last.keys() == expected.keys()
    for key, dice in expected.items():
        assert last[key] == pytest.approx(dice, abs=1e-5) or (math.isnan(last[key]) and math.isnan(dice))


@pytest.mark.shared_data
def test_the_runs_own_config_reruns_it(scratch, workdir):
    out, _ = scratch
    rerun = load_experiment(out / "config.yaml")
    original = experiment(workdir, epochs=15)
    assert (rerun.datasets, rerun.split, rerun.training) == (original.datasets, original.split, original.training)
    assert (rerun.preset, rerun.model_overrides) == (original.preset, original.model_overrides)
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["phase"] == "train"


def test_experiment_written_out_reads_back_the_same(tmp_path):
    from m4oe.config import experiment_to_dict, parse_experiment

    values = {
        "model": {"preset": "tiny", "img_size": 256, "window_size": 8},
        "split": {"folds": 3, "fold": 1, "group_pattern": "patient\\d+"},
        "train": {"epochs": 2, "routing": "hard"},
        "datasets": [
            {"path": "a", "modality": "CT", "label_map": {"kidney_left": "kidney", "kidney_right": "kidney"},
             "cases": ["c1", "c2"], "weight": 2.0},
            {"path": "b", "modality": "MRI", "labels": "none", "max_cases": 3},
            {"path": "c", "name": "C", "normalization": "mri", "split": {"val": ["x_1", "x_2"]}},
        ],
    }  # fmt: skip
    first = parse_experiment(values, base_dir=tmp_path)
    written = yaml.safe_load(yaml.safe_dump({**experiment_to_dict(first), "run": {"phase": "train"}}))
    again = parse_experiment(written, base_dir="/elsewhere")  # paths were written absolute
    assert again.datasets == first.datasets and again.split == first.split
    assert again.training == first.training and again.model == {"preset": "tiny", "img_size": 256, "window_size": 8}
    assert not again.datasets[1].labeled and again.datasets[2].split.val == ("x_1", "x_2")


@pytest.mark.shared_data
def test_pretrained_encoder_and_experts_are_loaded(pretrained):
    pre_out, _ = pretrained
    source = load_file(str(pre_out / "last" / "model.safetensors"))
    model = create_model("tiny", modalities=["MRI", "CT"], label_sets={"x": ["background", "liver"]}, **MICRO)
    report = load_pretrained(model, load_bundle(pre_out / "last"))
    assert report["new_experts"] == []
    own = dict(model.named_parameters())
    # experts are matched by modality name: this model's expert 0 is MRI, the pre-trained one's is 1
    w1 = "encoder.1.blocks.0.mlp.w1"
    assert torch.equal(own[w1][0], source[w1][1]) and torch.equal(own[w1][1], source[w1][0])
    for name in ("patch_embed.proj.weight", "encoder.2.blocks.1.attn.qkv.weight", "merges.0.reduction.weight"):
        assert torch.equal(own[name], source[name])
    # decoder blocks start from the mirrored encoder blocks (Swin-Unet), gates stay fresh
    assert torch.equal(own["decoder.0.blocks.1.attn.qkv.weight"], own["encoder.0.blocks.1.attn.qkv.weight"])
    assert torch.equal(own["decoder.1.blocks.0.mlp.w2"], own["encoder.1.blocks.0.mlp.w2"])
    assert not torch.equal(own["encoder.0.blocks.0.mlp.gate.weight"], source["encoder.0.blocks.0.mlp.gate.weight"])


@pytest.mark.shared_data
def test_train_with_init_writes_report(pretrained, workdir, cache_dir):
    pre_out, _ = pretrained
    out = workdir / "two_phase"
    run_train(experiment(workdir, epochs=1, val_every=0), out, cache_dir, init=pre_out, progress=False)
    report = json.loads((out / "init_report.json").read_text())
    assert report["counts"]["encoder"] > 20 and report["counts"]["mirrored"] > 20


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def test_resume_after_a_kill_gives_the_same_weights(mechanics):
    workdir, cache_dir = mechanics
    settings = dict(epochs=2, samples_per_epoch=48, checkpoint_every=2, val_every=1, augment=True)
    exp = experiment(workdir, **settings)
    exp = replace(exp, model={**exp.model, "drop_path_rate": 0.2})  # randomness that must be restored
    straight = workdir / "straight"
    run_train(exp, straight, cache_dir, progress=False)
    killed = workdir / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_train(exp, killed, cache_dir, progress=False, stop_at_step=9)  # checkpoint at step 8 survives
    assert torch.load(killed / "last" / "train_state.pt", weights_only=True)["step"] == 8
    run_train(exp, killed, cache_dir, resume=True, progress=False)
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _column(straight, "loss") == _column(killed, "loss")  # the resumed epoch's mean too
    assert _column(straight, "val_dice") == _column(killed, "val_dice")


@pytest.mark.parametrize("phase", [run_pretrain, run_train])
def test_training_draws_datasets_by_the_configs_weights_from_the_same_cache(mechanics, monkeypatch, phase):
    workdir, cache_dir = mechanics
    from m4oe.train import loop

    probabilities = []

    class Recording(loop.BalancedBatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            probabilities.append(self.probs.tolist())

    monkeypatch.setattr(loop, "BalancedBatchSampler", Recording)
    exp = experiment(workdir, epochs=1, pretrain_epochs=1, val_every=0)
    weighted = replace(exp, datasets=[exp.datasets[0], replace(exp.datasets[1], weight=3.0)])
    with pytest.raises(KeyboardInterrupt):
        phase(exp, workdir / "balanced", cache_dir, progress=False, stop_at_step=1)
    fingerprint = json.loads((cache_dir / "meta.json").read_text())["fingerprint"]
    with pytest.raises(KeyboardInterrupt):
        phase(weighted, workdir / "weighted", cache_dir, progress=False, stop_at_step=1)
    assert json.loads((cache_dir / "meta.json").read_text())["fingerprint"] == fingerprint
    assert probabilities == [[0.5, 0.5], [0.25, 0.75]]  # BTCV, CHAOS in the cache's order
    for run in ("balanced", "weighted"):
        shutil.rmtree(workdir / run)


def _column(run: Path, name: str) -> list[str]:
    lines = (run / "metrics.csv").read_text().splitlines()
    index = lines[0].split(",").index(name)
    return [line.split(",")[index] for line in lines[1:]]


def test_nan_loss_stops_with_the_step_and_keeps_last_checkpoint(mechanics, monkeypatch):
    workdir, cache_dir = mechanics
    from m4oe.train import finetune

    real = finetune.segmentation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 6 else loss), logs

    monkeypatch.setattr(finetune, "segmentation_loss", poisoned)
    out = workdir / "nan"
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 5"):
        run_train(experiment(workdir, epochs=1, checkpoint_every=4, val_every=0), out, cache_dir, progress=False)
    state = torch.load(out / "last" / "train_state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in _weights(out).values() if v.is_floating_point())


class DeviceReads(TorchDispatchMode):
    """Counts the operations that bring tensor values back to the host: on a GPU each one waits
    for all queued work (``item``/``int``/``float``/``bool`` reach ``_local_scalar_dense``)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default)  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("phase, routing", [("train", "soft"), ("train", "hard"), ("pretrain", None)])
def test_training_steps_read_nothing_back_from_the_device(mechanics, monkeypatch, phase, routing):
    """As on a GPU (index checks off), the loop reads values back only outside the steps: a run
    of 6 steps reads exactly as often as a run of 2."""
    workdir, cache_dir = mechanics
    from m4oe.model import checks
    from m4oe.train import loop

    monkeypatch.setattr(checks, "HOST_DEVICES", frozenset())  # what a GPU tensor gets
    monkeypatch.setattr(loop, "LOOK_EVERY", 1000)
    tolist = torch.Tensor.tolist
    reads = DeviceReads()

    def counted_tolist(tensor):  # a CPU tensor's tolist reads its memory without dispatching an op
        reads.count += 1
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def run(samples: int, out: Path) -> None:
        config = experiment(workdir, epochs=1, pretrain_epochs=1, samples_per_epoch=samples, val_every=0,
                            checkpoint_every=0, routing=routing)  # fmt: skip
        runner = run_train if phase == "train" else run_pretrain
        runner(config, out, cache_dir, progress=False)

    run(16, workdir / f"reads_{phase}_{routing}_warm")  # the cache exists from here on
    counts = []
    for samples in (16, 48):
        reads.count = 0
        with reads:
            run(samples, workdir / f"reads_{phase}_{routing}_{samples}")
        counts.append(reads.count)
    assert counts[0] == counts[1], counts


def test_per_modality_baseline_trains_one_model_each(mechanics):
    workdir, cache_dir = mechanics
    out = workdir / "per_modality"
    histories = run_train(experiment(workdir, epochs=1, baseline="per_modality"), out, cache_dir, progress=False)
    assert set(histories) == {"CT", "MRI"}
    ct = load_bundle(out / "CT" / "last")
    assert ct.modalities == ["CT"] and list(ct.label_sets) == ["BTCV"]
    assert "val_dice_BTCV" in histories["CT"].rows[-1] and "val_dice_CHAOS" not in histories["CT"].rows[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_match_one(mechanics):
    workdir, cache_dir = mechanics
    (workdir / "ddp").mkdir()
    config = write_config(workdir / "ddp", epochs=1, samples_per_epoch=48, augment=False, val_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["-m", "m4oe.cli", "train", str(config), "--cache", str(cache_dir), "--device", "cpu"]
    single = subprocess.run(
        [sys.executable, *base, "-o", str(workdir / "ddp1")], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    double = subprocess.run([*launch, *base, "-o", str(workdir / "ddp2")], env=env, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    a, b = _weights(workdir / "ddp1"), _weights(workdir / "ddp2")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=2e-4, rtol=1e-3), key
    losses = [
        float((workdir / run / "metrics.csv").read_text().splitlines()[1].split(",")[2]) for run in ("ddp1", "ddp2")
    ]
    assert abs(losses[0] - losses[1]) < 1e-4
    fresh = create_model("tiny", modalities=["CT", "MRI"], label_sets=load_bundle(workdir / "ddp1" / "last").label_sets,
                         **MICRO)  # fmt: skip
    assert not torch.equal(fresh.state_dict()["head.proj.weight"], a["head.proj.weight"])  # it did train


def test_organ_dice_keeps_each_validation_and_replaces_what_a_resume_redoes(tmp_path):
    path = tmp_path / "organ_dice.csv"
    for epoch, liver in ((1, 0.5), (2, 0.6), (3, 0.7), (2, 0.65)):  # the last: resumed from epoch 1's end
        result = {"dice": {"CHAOS": {"liver": liver, "spleen": 0.1}}, "dice_postprocessed": {"CHAOS": {"liver": 0.9}}}
        record_organ_dice(path, epoch, result)
    with open(path, newline="") as f:
        rows = [(int(r["epoch"]), r["organ"], float(r["dice"]), float(r["dice_postprocessed"]))
                for r in csv.DictReader(f)]  # fmt: skip
    assert [r[:3] for r in rows] == [(1, "liver", 0.5), (1, "spleen", 0.1), (2, "liver", 0.65), (2, "spleen", 0.1)]
    assert rows[0][3] == 0.9 and math.isnan(rows[1][3])  # spleen has no post-processed figure


def test_per_modality_baseline_resumes_each_of_its_runs(mechanics):
    workdir, cache_dir = mechanics
    exp = experiment(workdir, epochs=1, baseline="per_modality", val_every=0)
    run_train(exp, workdir / "per_modality_resume", cache_dir, progress=False)
    longer = experiment(workdir, epochs=2, baseline="per_modality", val_every=0)
    histories = run_train(longer, workdir / "per_modality_resume", cache_dir, resume=True, progress=False)
    assert {name: [r["epoch"] for r in h.rows] for name, h in histories.items()} == {"CT": [1, 2], "MRI": [1, 2]}
