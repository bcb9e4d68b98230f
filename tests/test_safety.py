"""Never lose a user's files, never answer a wrong question (issue #27): each test fails on the old
behaviour (data deleted, a file overwritten, a wrong answer with exit 0, a traceback, an unclear line)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from typer.testing import CliRunner

from m4oe import BundleError, create_model, load_bundle, save_bundle
from m4oe.cli import app
from m4oe.config import ConfigError, load_experiment, parse_experiment
from m4oe.data.datasets import DataError
from m4oe.data.prepare import prepare
from m4oe.files import MARKER, OutputError, atomic_write, check_output_dir, folder_kind, save_figure
from m4oe.infer.files import predict_paths
from m4oe.infer.predict import PredictError, Predictor
from m4oe.train.finetune import run_train
from m4oe.train.loop import RunExists
from m4oe.train.pretrain import run_pretrain

from .conftest import MICRO
from .data_helpers import make_dataset, phantom, write_image
from .test_predict import l_shape, threshold_model

runner = CliRunner()
MODEL = {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in MICRO.items()}}
TRAIN = {"epochs": 1, "batch_size": 4, "samples_per_epoch": 8, "workers": 0, "val_every": 0, "pretrain_epochs": 1}


def _experiment(data: Path, **train) -> object:
    return parse_experiment({"model": MODEL, "train": {**TRAIN, **train}, "split": {"folds": 3},
                             "datasets": [{"path": str(data), "modality": "CT"}]})  # fmt: skip


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# the folder rule
# ------------------------------------------------------------------------------------------------


def test_prepare_into_the_raw_dataset_is_refused_and_deletes_nothing(tmp_path):
    data = make_dataset(tmp_path / "ds", n=2)
    before = _listing(data)
    with pytest.raises(OutputError, match="is the input"):
        prepare(_experiment(data), data, progress=False)
    with pytest.raises(OutputError, match="lies inside the input"):
        prepare(_experiment(data), data / "imagesTr", progress=False)
    with pytest.raises(OutputError, match="holds the input"):
        prepare(_experiment(data), tmp_path, progress=False)
    assert _listing(data) == before


def test_prepare_and_train_refuse_a_folder_of_other_files(tmp_path):
    data = make_dataset(tmp_path / "ds", n=3)
    mine = tmp_path / "thesis"
    (mine / "figures").mkdir(parents=True)
    (mine / "thesis.md").write_text("four years")
    (mine / "figures" / "f1.png").write_bytes(b"png")
    before = _listing(mine)
    with pytest.raises(OutputError, match="holds files m4oe did not write"):
        prepare(_experiment(data), mine, progress=False)
    with pytest.raises(OutputError, match="--cache .*holds files m4oe did not write"):
        run_train(_experiment(data), tmp_path / "run", mine, progress=False)
    with pytest.raises(OutputError, match="-o .*holds files m4oe did not write"):
        run_train(_experiment(data), mine, tmp_path / "cache", progress=False)
    assert _listing(mine) == before
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_prepare_into_a_file_is_refused_and_the_file_kept(tmp_path):
    data = make_dataset(tmp_path / "ds", n=2)
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    with pytest.raises(OutputError, match="is a file"):
        prepare(_experiment(data), notes, progress=False)
    assert notes.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "notes.md"]  # no hidden .notes.md.old-PID


@pytest.mark.slow
def test_m4oe_folders_of_another_kind_are_refused_and_its_own_reused(tmp_path):
    data = make_dataset(tmp_path / "ds", n=3)
    run_train(_experiment(data), tmp_path / "run", tmp_path / "cache", progress=False)
    assert folder_kind(tmp_path / "run") == "run" and folder_kind(tmp_path / "cache") == "cache"
    with pytest.raises(OutputError, match="is m4oe's run folder, not a cache folder"):
        prepare(_experiment(data), tmp_path / "run", progress=False)
    with pytest.raises(OutputError, match="is m4oe's cache folder, not a run folder"):
        run_train(_experiment(data), tmp_path / "cache", tmp_path / "cache2", progress=False)
    with pytest.raises(OutputError, match="is m4oe's cache folder, not a predictions folder"):
        check_output_dir(tmp_path / "cache", "predictions")
    # its own cache is rebuilt in place; one written before the marker existed is still recognised
    prepare(_experiment(data), tmp_path / "cache", progress=False, force=True)
    (tmp_path / "cache" / MARKER).unlink()
    assert folder_kind(tmp_path / "cache") == "cache"
    assert prepare(_experiment(data), tmp_path / "cache", progress=False).up_to_date


@pytest.mark.slow
def test_default_cache_in_a_place_that_cannot_hold_it_is_named(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "ds", n=3)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"model": MODEL, "train": TRAIN, "split": {"folds": 3},
                                      "datasets": [{"path": str(data), "modality": "CT"}]}))  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    (work / "cache").write_text("a file where the default cache folder would go")
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match=r"default --cache cache/exp: cannot be created here .*give --cache"):
        run_train(load_experiment(config), tmp_path / "run", progress=False)


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------


def test_predict_into_the_datasets_labels_is_refused(tmp_path):
    data = make_dataset(tmp_path / "ds", n=2)
    labels = _listing(data / "labelsTr")
    images = sorted((data / "imagesTr").iterdir())
    with pytest.raises(PredictError, match="lies inside the input .*ds"):
        predict_paths(Predictor(threshold_model()), images, data / "labelsTr", dataset="phantom", progress=False)
    assert _listing(data / "labelsTr") == labels


def test_existing_predictions_are_replaced_only_with_overwrite(tmp_path):
    image = write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape())
    out = tmp_path / "out"
    predictor = Predictor(threshold_model())
    predict_paths(predictor, [image], out, dataset="phantom", progress=False)
    (out / "a.nii.gz").write_bytes(b"the user's own edit")
    with pytest.raises(PredictError, match="1 output file.* exist already, e.g. a.nii.gz: pass --overwrite"):
        predict_paths(predictor, [image], out, dataset="phantom", progress=False)
    assert (out / "a.nii.gz").read_bytes() == b"the user's own edit"
    predict_paths(predictor, [image], out, dataset="phantom", progress=False, overwrite=True)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.nii.gz"))).max() == 6  # the liver's label value


def test_predict_into_an_existing_file_is_refused_before_the_model_runs(tmp_path, monkeypatch):
    image = write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape())
    target = tmp_path / "results.txt"
    target.write_text("keep")
    predictor = Predictor(threshold_model())
    monkeypatch.setattr(predictor, "predict_volume", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(PredictError, match="results.txt: is a file"):
        predict_paths(predictor, [image], target, dataset="phantom", progress=False)
    assert target.read_text() == "keep"


def test_probabilities_of_a_sheared_input_do_not_replace_its_label_map(tmp_path):
    sheared = (1.0, 0.2, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    image = write_image(tmp_path / "in" / "s_0000.mha", l_shape(), direction=sheared)
    out = tmp_path / "out"
    report = predict_paths(Predictor(threshold_model()), [image], out, dataset="phantom", probabilities=True,
                           progress=False)  # fmt: skip
    assert report.written == [out / "s.mha"]
    labels = sitk.ReadImage(str(out / "s.mha"))  # a label map, not an .npz written over it
    assert sitk.GetArrayFromImage(labels).max() == 6
    assert np.load(out / "s_probabilities.npz")["probabilities"].shape[0] == 3


@pytest.mark.parametrize("direction", [None, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), (0, 1.0, 0, -1.0, 0, 0, 0, 0, 1.0)])
def test_probabilities_are_in_the_label_maps_voxel_order_with_its_geometry(tmp_path, direction):
    array = l_shape()
    array[3:5, 10:14, 12:20] = 0.7  # a second bright region, not symmetric
    image = write_image(tmp_path / "in" / "c_0000.nii.gz", array, spacing=(0.7, 0.9, 2.5), direction=direction)
    out = tmp_path / "out"
    predict_paths(Predictor(threshold_model(), postprocess=False), [image], out, dataset="phantom",
                  probabilities=True, progress=False)  # fmt: skip
    written = sitk.ReadImage(str(out / "c.nii.gz"))
    stored = np.load(out / "c_probabilities.npz")
    probabilities, values = stored["probabilities"].astype(np.float32), stored["label_values"]
    assert probabilities.shape[1:] == sitk.GetArrayFromImage(written).shape
    assert np.array_equal(values[probabilities.argmax(0)], sitk.GetArrayFromImage(written))
    assert np.allclose(stored["spacing"], written.GetSpacing()) and np.allclose(stored["origin"], written.GetOrigin())
    assert np.allclose(stored["direction"], written.GetDirection())


def test_a_negative_voxel_size_gives_a_label_map_that_every_reader_places_like_the_scan(tmp_path):
    import struct

    array = l_shape().astype(np.int16) * 100
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    header = nib.Nifti1Header()
    header.set_qform(affine, code=1)
    plain = tmp_path / "in" / "p_0000.nii"
    plain.parent.mkdir()
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine, header), plain)
    raw = bytearray(plain.read_bytes())
    raw[80:84] = struct.pack("<f", -0.8)  # pixdim[1] < 0: ITK mirrors x, nibabel takes |0.8|
    scan = tmp_path / "in" / "n_0000.nii"
    scan.write_bytes(bytes(raw))  # the same voxels as the plain scan; only the header's sign differs
    report = predict_paths(Predictor(threshold_model()), [plain, scan], tmp_path / "out", dataset="phantom",
                           progress=False)  # fmt: skip
    assert [p.name for p, text in report.warnings if "negative voxel size" in text] == ["n_0000.nii"]
    labels, reference = tmp_path / "out" / "n.nii.gz", tmp_path / "out" / "p.nii.gz"
    assert sitk.ReadImage(str(labels)).GetDirection() == sitk.ReadImage(str(scan)).GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(labels))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(reference))))  # fmt: skip
    assert np.allclose(nib.load(str(labels)).affine, nib.load(str(scan)).affine)
    # before, ITK wrote positive sizes with a mirrored direction: nibabel showed the labels mirrored in x
    assert np.array_equal(np.asarray(nib.load(str(labels)).dataobj), np.asarray(nib.load(str(reference)).dataobj))
    assert np.asarray(nib.load(str(labels)).dataobj).any()


# ------------------------------------------------------------------------------------------------
# runs: every check before anything is written; resume compares what gives the weights their meaning
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = make_dataset(root / "ds", n=3)
    run_train(_experiment(data), root / "run", root / "cache", progress=False)
    return root, data


@pytest.mark.slow
def test_refused_runs_leave_the_run_folder_as_it_was(trained_run, tmp_path):
    root, data = trained_run
    before = _listing(root / "run")
    with pytest.raises(RunExists, match="--resume"):
        run_train(_experiment(data, lr=0.1), root / "run", root / "cache", progress=False)
    with pytest.raises(RunExists, match=r"cannot resume .*train.batch_size 4 -> 2"):
        run_train(_experiment(data, batch_size=2), root / "run", root / "cache", resume=True, progress=False)
    assert _listing(root / "run") == before  # config.yaml included
    with pytest.raises(BundleError, match="not a pretrain run folder"):
        run_train(_experiment(data), tmp_path / "new", root / "cache", init=tmp_path / "nothing", progress=False)
    assert not (tmp_path / "new").exists()  # no config.yaml left behind by a failed start


@pytest.mark.parametrize(
    "change, named",
    [({"img_size": 128}, "model.img_size 64 -> 128"), ({"embed_dim": 8}, "model.embed_dim 16 -> 8")],
)
@pytest.mark.slow
def test_resume_refuses_a_changed_model(trained_run, change, named):
    root, data = trained_run
    values = {"model": {**MODEL, **change}, "train": TRAIN, "split": {"folds": 3},
              "datasets": [{"path": str(data), "modality": "CT"}]}  # fmt: skip
    with pytest.raises(RunExists, match=named):
        run_train(parse_experiment(values), root / "run", root / f"cache{change}", resume=True, progress=False)


@pytest.mark.slow
def test_resume_refuses_a_changed_modality_or_normalisation(trained_run):
    root, data = trained_run
    for dataset, named in (({"modality": "MRI"}, "modalities"), ({"modality": "CT", "normalization": "mri"},
                                                                 "dataset ds normalization")):  # fmt: skip
        values = {"model": MODEL, "train": TRAIN, "split": {"folds": 3}, "datasets": [{"path": str(data), **dataset}]}
        with pytest.raises(RunExists, match=named):
            run_train(parse_experiment(values), root / "run", root / "cache_other", resume=True, progress=False)


# ------------------------------------------------------------------------------------------------
# bundles
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_phase_1_bundle_is_refused_by_predict_and_experts(tmp_path):
    data = make_dataset(tmp_path / "ds", n=3)
    run_pretrain(_experiment(data), tmp_path / "pre", tmp_path / "cache", progress=False)
    bundle = load_bundle(tmp_path / "pre" / "last")
    with pytest.raises(BundleError, match="phase-1 .*never learnt any labels"):
        Predictor(bundle)
    image = data / "imagesTr" / "case_000_0000.nii.gz"
    for command in (["predict", "-i", str(image)], ["experts", "-i", str(image)]):
        result = runner.invoke(app, [*command, "-m", str(tmp_path / "pre" / "last"), "-o", str(tmp_path / "o")])
        assert result.exit_code == 1 and "phase-1" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_an_edited_bundle_config_is_refused(micro_model, tmp_path):
    save_bundle(micro_model, tmp_path / "b")
    path = tmp_path / "b" / "config.json"
    saved = path.read_text()
    for edit in (lambda c: c["modalities"].reverse(), lambda c: c["model_config"].update(img_size=128)):
        config = json.loads(saved)
        edit(config)
        path.write_text(json.dumps(config, indent=2))
        with pytest.raises(BundleError, match="checksum does not match its content"):
            load_bundle(tmp_path / "b")
    path.write_text(saved)
    assert load_bundle(tmp_path / "b").modalities == micro_model.modalities


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "train, message",
    [({"min_lr": -1e-6}, "train.min_lr must be 0 or more"), ({"ce_weight": -1}, "train.ce_weight must be 0 or more"),
     ({"weight_decay": -0.1}, "weight_decay must be 0 or more"), ({"warmup_epochs": -1}, "warmup_epochs must be 0"),
     ({"grad_clip": -12}, "grad_clip must be 0 or more"), ({"val_every": -5}, "val_every must be 0 or more"),
     ({"samples_per_epoch": 0}, "samples_per_epoch must be 1 or more"),
     ({"samples_per_epoch": -16}, "samples_per_epoch must be 1 or more"),
     ({"ce_weight": 0, "dice_weight": 0}, "cannot both be 0"), ({"lr": "fast"}, "train.lr must be a finite number"),
     ({"grad_clip": float("nan")}, "grad_clip must be a finite number")],
)  # fmt: skip
def test_training_numbers_are_range_checked(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        parse_experiment({"datasets": [{"path": str(tmp_path)}], "train": train})


@pytest.mark.parametrize("value", [64.0, "64", True])
def test_integer_model_keys_take_whole_numbers_only(tmp_path, value):
    with pytest.raises(ConfigError, match=f"img_size must be a whole number, got {type(value).__name__}"):
        parse_experiment({"datasets": [{"path": str(tmp_path)}], "model": {**MODEL, "img_size": value}})


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(f"datasets:\n  - path: {tmp_path}\ntrain:\n  lr: 0.01\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="exp.yaml: line 6: key 'lr' is given twice"):
        load_experiment(config)
    result = runner.invoke(app, ["prepare", str(config), "--verify-only"])
    assert result.exit_code == 1 and "given twice" in result.output


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_nnunet_ignore_label_is_refused(tmp_path):
    data = make_dataset(tmp_path / "ds", n=3, labels={"background": 0, "liver": 1, "spleen": 2, "ignore": 3})
    result = runner.invoke(app, ["prepare", str(_config_file(tmp_path, data)), "--verify-only"])
    assert result.exit_code == 1 and "label 'ignore'" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("value", ['"1"', "1.0"])
def test_string_and_float_label_values_get_one_message(tmp_path, value):
    data = make_dataset(tmp_path / "ds", n=3)
    text = (data / "dataset.json").read_text().replace('"liver": 1', f'"liver": {value}')
    (data / "dataset.json").write_text(text)
    result = runner.invoke(app, ["prepare", str(_config_file(tmp_path, data)), "--verify-only"])
    assert result.exit_code == 1 and "label values must be whole numbers" in result.output, result.output


def _config_file(tmp_path: Path, data: Path, **dataset) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "train": TRAIN, "split": {"folds": 3},
                                    "datasets": [{"path": str(data), "modality": "CT", **dataset}]}))  # fmt: skip
    return path


@pytest.mark.slow
def test_all_empty_label_maps_are_warned_about_and_refused_by_train(tmp_path):
    data = make_dataset(tmp_path / "ds", n=3)
    for path in (data / "labelsTr").iterdir():
        write_image(path, np.zeros_like(phantom(0)[1]))
    with pytest.raises(DataError, match="no foreground voxels .*: every label map is empty"):  # CT statistics
        prepare(_experiment(data), tmp_path / "ct_cache", progress=False)
    values = {"model": MODEL, "train": TRAIN, "split": {"folds": 3},
              "datasets": [{"path": str(data), "modality": "CT", "normalization": "none"}]}  # fmt: skip
    result = prepare(parse_experiment(values), tmp_path / "cache", progress=False)
    assert any("every label map is empty" in w for w in result.warnings)
    with pytest.raises(DataError, match="ds: every label map is empty"):
        run_train(parse_experiment(values), tmp_path / "run", tmp_path / "cache", progress=False)
    assert not (tmp_path / "run").exists()


def test_nothing_to_train_on_names_the_cause(tmp_path):
    data = make_dataset(tmp_path / "ds", n=1)
    one = {"path": str(data), "normalization": "none"}
    values = {"model": MODEL, "train": TRAIN, "datasets": [{**one, "split": {"val": ["case_000"]}}]}
    with pytest.raises(DataError, match="all its 1 case.* are validation cases"):
        run_train(parse_experiment(values), tmp_path / "run", tmp_path / "c1", progress=False)
    values["datasets"] = [{**one, "labels": "none"}]
    with pytest.raises(DataError, match="has no labels .*can be pre-trained on, not trained on"):
        run_train(parse_experiment(values), tmp_path / "run", tmp_path / "c2", progress=False)


def test_overlay_refuses_a_reference_placed_elsewhere(tmp_path):
    image, label = phantom(0)
    scan = write_image(tmp_path / "scan.nii.gz", image)
    shifted = write_image(tmp_path / "ref.nii.gz", label, origin=(51.0, 0.0, 0.0))
    result = runner.invoke(app, ["overlay", "-i", str(scan), "--gt", str(shifted), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "geometry differs from image" in result.output, result.output
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------------
# tracebacks and unclear messages
# ------------------------------------------------------------------------------------------------


def test_add_modality_grows_compute_matched_models_twice_keeping_old_outputs():
    from m4oe.train.add_modality import grow_model

    torch.manual_seed(0)
    old = create_model("m4oe-convnext-s", modalities=["MRI", "CT"], label_sets={"a": ["background", "liver"]},
                       img_size=64, depths=(0, 1, 1, 1))  # the demo's model  # fmt: skip
    once = grow_model(old, "cineMRI", {"b": ["background", "heart"]}, close_to_old=True)  # used to raise
    twice = grow_model(once, "PET", {"c": ["background", "tumour"]}, close_to_old=True)
    image, dataset = torch.randn(2, 1, 64, 64), torch.zeros(2, dtype=torch.long)
    for model in (old, once, twice):
        model.eval()
    with torch.no_grad():
        reference = old(image, 0, dataset)
        for grown in (once, twice):
            assert torch.allclose(grown(image, 0, dataset)[:, :2], reference, atol=1e-4)
    widths = {tuple(p.shape) for n, p in twice.named_parameters() if n.endswith("mlp.w1")}
    assert all(shape[0] == 4 for shape in widths)  # four experts, each as wide as before


@pytest.mark.slow
def test_add_modality_trains_with_the_configs_dice(tmp_path, monkeypatch):
    from m4oe.train import add_modality
    from m4oe.train.loop import History

    old = create_model("tiny", modalities=["CT"], label_sets={"ct": ["background", "liver", "spleen"]}, **MICRO)
    extra = {"datasets": {"ct": {"modality": "CT", "normalization": {"scheme": "none"}, "label_values": {}}}}
    save_bundle(old, tmp_path / "old", extra=extra)
    data = make_dataset(tmp_path / "mr", n=3, modality="MRI")
    seen = {}
    monkeypatch.setattr(add_modality, "fit", lambda task, *a, **k: seen.setdefault("dice", task.dice) and History())
    values = {"datasets": [{"path": str(data), "name": "mr", "normalization": "none"}], "split": {"folds": 3},
              "train": {**TRAIN, "dice": "batch_present"}}  # fmt: skip
    add_modality.run_add_modality(tmp_path / "old", parse_experiment(values), tmp_path / "run", tmp_path / "cache",
                                  progress=False)  # fmt: skip
    assert seen["dice"] == "batch_present"  # it used to be 'sample' whatever the config said


def test_user_text_is_printed_as_written_not_as_markup(tmp_path):
    missing = tmp_path / "scans [patient 1]" / "x[/y].nii.gz"
    result = runner.invoke(app, ["overlay", "-i", str(missing), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "scans [patient 1]/x[/y].nii.gz" in result.output, result.output
    assert "Traceback" not in result.output
    bundle = tmp_path / "b"
    save_bundle(threshold_model(), bundle, extra=threshold_model().bundle_extra)
    result = runner.invoke(app, ["predict", "-m", str(bundle), "-i", str(tmp_path), "-o", str(tmp_path / "o"),
                                 "--tta-rotate", "nan"])  # fmt: skip
    assert result.exit_code == 1 and "got [nan]" in result.output, result.output


def test_written_paths_never_show_temporary_names(tmp_path):
    (tmp_path / "existingdir").mkdir()
    with pytest.raises(OutputError, match=r"existingdir: is a folder") as caught:
        atomic_write(tmp_path / "existingdir", lambda tmp: tmp.write_text("x"))
    assert "tmp-" not in str(caught.value)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    save_figure(fig, tmp_path / "picture")  # no suffix: PNG, not "Format 'tmp-PID' is not supported"
    plt.close(fig)
    assert (tmp_path / "picture").read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["overlay", "-i", str(tmp_path), "-o", str(tmp_path / "overlay")])
    assert result.exit_code == 1 and "ending in .png" in result.output, result.output


def test_evaluate_checks_its_options_before_scoring(tmp_path):
    from m4oe.eval.evaluate import EvaluationError, evaluate_folders

    with pytest.raises(EvaluationError, match="--nsd-tolerance -5"):
        evaluate_folders(tmp_path, tmp_path, tmp_path / "dataset.json", tmp_path / "s.json", -5.0)
    (tmp_path / "folder").mkdir()
    with pytest.raises(EvaluationError, match="folder: is a folder"):
        evaluate_folders(tmp_path, tmp_path, tmp_path / "dataset.json", tmp_path / "folder", 2.0)
    image = tmp_path / "scan.nii.gz"
    image.write_bytes(b"not a summary")
    with pytest.raises(EvaluationError, match="ending in .json"):
        evaluate_folders(tmp_path, tmp_path, tmp_path / "dataset.json", image, 2.0)
    assert image.read_bytes() == b"not a summary"
