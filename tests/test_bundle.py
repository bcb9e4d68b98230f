"""Model bundles: safetensors + JSON, round trip, corruption and mismatch errors."""

from __future__ import annotations

import json

import pytest
import torch

from m4oe import BundleError, load_bundle, save_bundle
from m4oe.bundle import read_bundle_config

from .conftest import batch


@pytest.mark.slow
def test_round_trip_gives_identical_outputs(micro_model, tmp_path):
    micro_model.eval()
    extra = {"normalization": {"CT": {"mean": 1.5, "std": 2.0}}}
    save_bundle(micro_model, tmp_path / "bundle", extra=extra)
    loaded = load_bundle(tmp_path / "bundle").eval()
    image, modality, dataset = batch(3)
    with torch.no_grad():
        assert torch.equal(loaded(image, modality, dataset), micro_model(image, modality, dataset))
    assert loaded.class_names == micro_model.class_names
    assert loaded.modalities == micro_model.modalities
    assert loaded.label_sets == micro_model.label_sets
    assert loaded.config == micro_model.config
    assert loaded.bundle_extra == extra
    assert loaded.preset == "tiny"
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["config.json", "model.safetensors"]


def test_corrupted_weights_are_reported(micro_model, tmp_path):
    save_bundle(micro_model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors: checksum"):
        load_bundle(tmp_path)


def test_truncated_weights_with_matching_checksum_are_reported(micro_model, tmp_path):
    save_bundle(micro_model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    config = json.loads((tmp_path / "config.json").read_text())
    import hashlib

    config["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    _resign(tmp_path, config)
    with pytest.raises(BundleError, match="unreadable safetensors"):
        load_bundle(tmp_path)


def test_mismatched_config_is_reported(micro_model, tmp_path):
    save_bundle(micro_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_config"]["embed_dim"] = 32
    _resign(tmp_path, config)
    with pytest.raises(BundleError, match="wrong shape"):
        load_bundle(tmp_path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no config.json"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle_config(tmp_path)


def test_class_names_must_match_label_sets(micro_model, tmp_path):
    save_bundle(micro_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["class_names"] = list(reversed(config["class_names"]))
    _resign(tmp_path, config)
    with pytest.raises(BundleError, match="class_names"):
        load_bundle(tmp_path)


def test_unbuildable_config_is_reported_after_the_checksum(micro_model, tmp_path):
    """The model is built while the weights are hashed; a bad file is still named before a bad config."""
    save_bundle(micro_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_config"]["embed_dim"] = -8
    _resign(tmp_path, config)
    with pytest.raises(BundleError, match="config.json: cannot build the model"):
        load_bundle(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors: checksum"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [("modalities", "CT"), ("label_sets", {"ct": "liver"}), ("weights", {"file": 3}), ("model_config", [])],
)
def test_wrong_types_in_config_json_are_one_message(micro_model, tmp_path, key, value):
    save_bundle(micro_model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    _resign(tmp_path, config)
    with pytest.raises(BundleError, match=rf"wrong types for \['{key}'\]"):
        load_bundle(tmp_path)


def _resign(folder, config) -> None:
    """Write an edited config.json with a matching checksum of its own (as a v1 bundle, which had none,
    or a deliberate edit would be): the checks behind the checksum must still hold."""
    from m4oe.bundle import config_digest

    config["config_sha256"] = config_digest(config)
    (folder / "config.json").write_text(json.dumps(config))
