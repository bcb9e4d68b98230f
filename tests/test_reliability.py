"""Silent wrong results and untidy leftovers (issue #14): each test fails on the old behaviour."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from m4oe import create_model, save_bundle
from m4oe.config import ConfigError, parse_experiment
from m4oe.data.io import ImageReadError, read_label_map
from m4oe.eval.evaluate import EvaluationError, evaluate_folders
from m4oe.infer.files import check_output_names
from m4oe.infer.predict import PredictError, cpu_threads
from m4oe.train.finetune import run_train
from m4oe.train.loop import RunExists, remove_stale_temporaries

from .conftest import LABEL_SETS, MICRO, MODALITIES
from .data_helpers import make_dataset, phantom, write_image


def test_output_names_that_collide_are_refused(tmp_path):
    inputs = [tmp_path / "in" / n for n in ("case_0000.nii.gz", "case_0001.nii.gz", "case.mha", "other_0000.nii.gz")]
    with pytest.raises(PredictError, match="written twice, e.g. case.nii.gz"):
        check_output_names(inputs, tmp_path / "out")
    check_output_names(inputs[2:], tmp_path / "out")  # distinct names pass


def test_predicting_into_the_input_folder_is_refused(tmp_path):
    image = write_image(tmp_path / "scans" / "a_0000.nii.gz", phantom(0)[0])
    with pytest.raises(PredictError, match="holds the input .*a_0000.nii.gz"):
        check_output_names([image], tmp_path / "scans")
    check_output_names([image], tmp_path / "labels")


def _label_files(tmp_path: Path):
    _, label = phantom(0)
    ref = write_image(tmp_path / "ref" / "case_000.nii.gz", label)
    return ref, label


def test_truncated_float_and_undeclared_label_maps_are_refused(tmp_path):
    ref, label = _label_files(tmp_path)
    raw = gzip.decompress(ref.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(ImageReadError, match="truncated"):
        read_label_map(truncated)
    probabilities = write_image(tmp_path / "float.nii.gz", label.astype(np.float32) * 0.4)
    with pytest.raises(ImageReadError, match="non-integer"):
        read_label_map(probabilities)
    undeclared = write_image(tmp_path / "seven.nii.gz", np.where(label == 2, 7, label).astype(np.uint8))
    with pytest.raises(ImageReadError, match=r"\[7\] are not declared"):
        read_label_map(undeclared, {0, 1, 2})
    whole = write_image(tmp_path / "whole.nii.gz", label.astype(np.float32))  # integer-valued floats are fine
    assert read_label_map(whole, {0, 1, 2}).array.dtype == np.int64


def test_evaluate_refuses_a_truncated_prediction(tmp_path):
    ref, _ = _label_files(tmp_path)
    dataset = make_dataset(tmp_path / "ds", n=1)
    pred = tmp_path / "pred" / "case_000.nii.gz"
    pred.parent.mkdir()
    raw = gzip.decompress(ref.read_bytes())
    pred.write_bytes(gzip.compress(raw[: len(raw) - 200]))
    with pytest.raises(EvaluationError, match="truncated"):
        evaluate_folders(ref.parent, pred.parent, dataset / "dataset.json", tmp_path / "summary.json", workers=1)
    assert not (tmp_path / "summary.json").exists()


def test_stale_checkpoint_temporaries_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / ".last.tmp-999999999"
    live = tmp_path / f".last.tmp-{os.getpid()}"
    old = tmp_path / ".best.old-999999998"
    for folder in (dead, live, old):
        (folder / "x").mkdir(parents=True)
    (tmp_path / "last").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, old])
    assert live.exists() and (tmp_path / "last").exists() and not dead.exists()


def test_bundle_files_are_readable_by_others(tmp_path, monkeypatch):
    from m4oe import files

    monkeypatch.setattr(files, "_UMASK", 0o022)  # the umask read at import, as a typical shell sets it
    model = create_model("tiny", modalities=MODALITIES, label_sets=LABEL_SETS, **MICRO)
    bundle = save_bundle(model, tmp_path / "bundle")
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((bundle / name).stat().st_mode) == 0o644, name


def test_cpu_threads_follow_omp_num_threads_and_affinity(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert cpu_threads() == 1


def test_overrides_are_checked_against_the_chosen_preset(tmp_path):
    values = {"datasets": [{"path": str(tmp_path), "modality": "CT"}]}
    # tiny has window 4: 256 px is valid for it, not for m4oe-t's window 7
    parse_experiment({**values, "model": {"preset": "tiny", "img_size": 256}})
    with pytest.raises(ConfigError, match="unknown preset 'bogus'"):
        parse_experiment({**values, "model": {"preset": "bogus"}})
    with pytest.raises(ConfigError, match="img_size 224"):
        parse_experiment({**values, "model": {"preset": "tiny", "img_size": 224}})


@pytest.mark.slow
def test_training_into_an_existing_run_needs_resume(tmp_path):
    data = make_dataset(tmp_path / "ds", n=3)
    model = {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()}}
    train = {"epochs": 1, "batch_size": 4, "samples_per_epoch": 8, "workers": 0, "val_every": 0}
    experiment = parse_experiment({"model": model, "train": train, "split": {"folds": 3},
                                   "datasets": [{"path": str(data), "modality": "CT"}]})  # fmt: skip
    run_train(experiment, tmp_path / "run", tmp_path / "cache", progress=False)
    before = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(RunExists, match="--resume"):
        run_train(experiment, tmp_path / "run", tmp_path / "cache", progress=False)
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_second_added_modality_finds_favoured_experts():
    from m4oe.train.add_modality import favoured_experts, grow_model

    torch.manual_seed(0)
    old = create_model("tiny", modalities=["CT", "MRI"], label_sets={"a": ["background", "liver"]}, **MICRO)
    once = grow_model(old, "cineMRI", {"b": ["background", "heart"]}, close_to_old=True)
    assert once.config.closed_experts  # the old modalities may not use the new expert
    images = torch.randn(2, 1, 64, 64)
    favoured = favoured_experts(once, images)  # used to fail: the closed gate needs a modality
    assert len(favoured) == 14 and all(0 <= e < 3 for e in favoured)
    twice = grow_model(once, "PET", {"c": ["background", "tumour"]}, close_to_old=True)
    assert twice.modalities == ["CT", "MRI", "cineMRI", "PET"]


def _two_datasets(tmp_path: Path, **first) -> dict:
    a = make_dataset(tmp_path / "a", n=3)
    b = make_dataset(tmp_path / "b", n=3, modality="MRI")
    model = {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()}}
    return {"model": model, "split": {"folds": 3},
            "datasets": [{"path": str(a), "modality": "CT", **first}, {"path": str(b), "modality": "MRI"}]}  # fmt: skip


def _cache(values: dict, cache: Path):
    from m4oe.train.common import ensure_cache
    from m4oe.train.loop import Runtime

    return ensure_cache(parse_experiment(values), cache, Runtime(torch.device("cpu")), progress=False)


@pytest.mark.slow
def test_cache_is_rebuilt_when_the_fold_changes_and_kept_when_only_the_weight_does(tmp_path):
    from m4oe.train.common import sampling_weights

    values = _two_datasets(tmp_path)
    first = _cache(values, tmp_path / "cache")
    other_fold = _cache({**values, "split": {"folds": 3, "fold": 1}}, tmp_path / "cache")
    assert other_fold.meta["fingerprint"] != first.meta["fingerprint"]
    assert not np.array_equal(other_fold.slice_mask("val"), first.slice_mask("val"))
    # the weight only steers the sampler: the cache is kept, and training reads the weight from the config
    weighted = {**values, "split": {"folds": 3, "fold": 1}}
    weighted["datasets"] = [{**values["datasets"][0], "weight": 3.0}, values["datasets"][1]]
    written = (tmp_path / "cache" / "meta.json").stat().st_mtime_ns
    reused = _cache(weighted, tmp_path / "cache")
    assert reused.meta["fingerprint"] == other_fold.meta["fingerprint"]
    assert (tmp_path / "cache" / "meta.json").stat().st_mtime_ns == written
    assert sampling_weights(parse_experiment(weighted), reused) == [3.0, 1.0]
    assert sampling_weights(parse_experiment({**weighted, "datasets": weighted["datasets"][1:]}), reused) == [1.0, 1.0]


@pytest.mark.slow
def test_subset_config_must_match_the_cache(tmp_path):
    values = _two_datasets(tmp_path)
    _cache(values, tmp_path / "cache")
    subset = {**values, "datasets": values["datasets"][:1]}
    assert _cache(subset, tmp_path / "cache").dataset_names == ["a", "b"]  # the same settings: reused
    changed = {**subset, "datasets": [{**values["datasets"][0], "normalization": "mri"}]}
    with pytest.raises(ConfigError, match=r"datasets \['a'\] were prepared with other settings"):
        _cache(changed, tmp_path / "cache")


@pytest.mark.slow
def test_a_cache_rebuilt_under_a_reader_is_refused(tmp_path):
    from m4oe.data.datasets import DataError
    from m4oe.data.prepare import prepare

    values = _two_datasets(tmp_path)
    cache = _cache(values, tmp_path / "cache")
    prepare(parse_experiment({**values, "split": {"folds": 3, "fold": 2}}), tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="rebuilt or removed while this run was reading it"):
        cache.read(np.arange(2))  # a loader worker opening the arrays after the rebuild


def test_verify_only_reports_validation_cases_that_do_not_exist(tmp_path):
    from m4oe.data.datasets import DataError
    from m4oe.data.prepare import check

    data = make_dataset(tmp_path / "ds", n=3)
    experiment = parse_experiment({"datasets": [{"path": str(data), "modality": "CT",
                                                 "split": {"val": ["case_001", "case_099"]}}]})  # fmt: skip
    with pytest.raises(DataError) as info:
        check(experiment, workers=1, progress=False)
    assert "split.val names cases that are not in the dataset: ['case_099']" in str(info.value)


@pytest.mark.slow
def test_resumed_epoch_counts_the_slices_before_the_interruption(tmp_path):
    import csv

    data = make_dataset(tmp_path / "ds", n=3)
    model = {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()}}
    train = {"epochs": 1, "batch_size": 4, "samples_per_epoch": 24, "workers": 0, "val_every": 0,
             "checkpoint_every": 2}  # fmt: skip
    experiment = parse_experiment({"model": model, "train": train, "split": {"folds": 3},
                                   "datasets": [{"path": str(data), "modality": "CT"}]})  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_train(experiment, tmp_path / "run", tmp_path / "cache", progress=False, stop_at_step=5)
    run_train(experiment, tmp_path / "run", tmp_path / "cache", resume=True, progress=False)
    with open(tmp_path / "run" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    # slices/s x seconds = the slices of the whole epoch (24), not only the 8 after the resume
    assert float(row["slices_per_s"]) * float(row["epoch_seconds"]) == pytest.approx(24, rel=0.05)
