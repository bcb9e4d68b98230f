"""The one override syntax (``--set SECTION.KEY=VALUE``) and the config package's single homes."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from m4oe.cli import app
from m4oe.config import ConfigError, apply_overrides, load_experiment

BASE = {
    "model": {"preset": "tiny"},
    "train": {"lr": 0.001},
    "datasets": [{"path": "a", "name": "CT1", "modality": "CT"}, {"path": "data/MRI2", "modality": "MRI"}],
}


def test_words_set_sections_datasets_by_name_and_all_datasets():
    values = apply_overrides(BASE, ["train.lr=0.01", "model.depths=[0,1,2]", "train.augment=false",
                                    "datasets.MRI2.fov=0.8", "datasets.*.weight=2", "split.fold=1"])  # fmt: skip
    assert values["train"] == {"lr": 0.01, "augment": False}
    assert values["model"] == {"preset": "tiny", "depths": [0, 1, 2]}
    assert [d.get("fov") for d in values["datasets"]] == [None, 0.8]  # MRI2: its folder's name
    assert [d["weight"] for d in values["datasets"]] == [2, 2]
    assert values["split"] == {"fold": 1}
    assert BASE["train"] == {"lr": 0.001} and "fov" not in BASE["datasets"][1]  # the input is not changed
    assert apply_overrides(BASE, ["train.lr=0.01", "train.lr=0.02"])["train"]["lr"] == 0.02  # the last word wins


@pytest.mark.parametrize(
    "word, message",
    [("train.lr", "give SECTION.KEY=VALUE"), ("lr=0.1", "give SECTION.KEY=VALUE"), ("run.x=1", "SECTION one of"),
     ("train.lr=", "give SECTION.KEY=VALUE"), ("datasets.PET.fov=1", "no dataset named 'PET'; the config has"),
     ("datasets.fov=1", "datasets.NAME.KEY=VALUE"), ("train.lr=[1", "not valid YAML")],
)  # fmt: skip
def test_bad_words_are_refused_naming_the_word(word, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(BASE, [word])


def test_cli_set_changes_the_run_and_is_checked_like_the_file(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**BASE, "datasets": [{"path": str(tmp_path), "modality": "CT"}]}))
    experiment = load_experiment(config, ["train.lr=0.02", "model.img_size=256"])
    assert experiment.training.lr == 0.02 and experiment.model["img_size"] == 256
    assert yaml.safe_load(config.read_text())["train"] == {"lr": 0.001}
    result = CliRunner().invoke(app, ["prepare", str(config), "--verify-only", "--set", "train.lr=-1"])
    assert result.exit_code == 1 and "train.lr must be a positive number" in result.output, result.output
    result = CliRunner().invoke(app, ["prepare", str(config), "--verify-only", "--set", "train.lrr=1"])
    assert result.exit_code == 1 and "unknown keys ['lrr']" in result.output, result.output


def test_every_set_of_allowed_words_has_one_home():
    """The code that acts on a word list imports it from config.choices (the same object)."""
    from m4oe import bench
    from m4oe.config import choices
    from m4oe.data import loader, prepare
    from m4oe.infer import predict
    from m4oe.model import swin
    from m4oe.train import losses

    assert losses.DICE_MODES is choices.DICE_MODES
    assert loader.FOREGROUND_SAMPLING is choices.FOREGROUND_SAMPLING
    assert prepare.STORAGE_TYPES is choices.STORAGE_TYPES
    assert predict.PRECISIONS is choices.PRECISIONS
    assert swin.ATTENTION_KERNELS is choices.ATTENTION_KERNELS
    assert bench.HARD_KERNELS is choices.HARD_KERNELS


def test_the_config_package_imports_nothing_above_it():
    import ast
    from pathlib import Path

    import m4oe.config

    for path in Path(m4oe.config.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} imports from outside the config package: {node.module}"


def test_presets_are_registered_by_their_architecture_modules():
    from m4oe.config import PRESETS, ModelConfig, register_preset
    from m4oe.model import convnext_unet, swin_unet

    arch = {name: config.arch for name, config in PRESETS.items()}
    assert arch == {"m4oe-t": "swin", "m4oe-t-lite": "swin", "swin-unet": "swin", "tiny": "swin",
                    "m4oe-convnext-s": "convnext", "convnext-unet-s": "convnext"}  # fmt: skip
    assert 'register_preset("m4oe-t"' in open(swin_unet.__file__).read()
    assert 'register_preset("m4oe-convnext-s"' in open(convnext_unet.__file__).read()
    assert register_preset("tiny", PRESETS["tiny"]) is PRESETS["tiny"]  # the same config again: a no-op
    with pytest.raises(ValueError, match="registered twice"):
        register_preset("tiny", ModelConfig())
