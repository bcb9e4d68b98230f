"""Model bundles: a folder with ``model.safetensors`` and ``config.json``; loading never unpickles.

``config.json`` holds everything needed to rebuild the model and use it on new scans: the resolved
model config (plus the preset and overrides it came from), the modalities (expert order), the union
label vocabulary, each dataset's label set, the SHA-256 of the weights file, and a free ``extra``
mapping (normalisation statistics, label values, training provenance).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import ConfigError, ModelConfig
from .files import atomic_write
from .model.base import SegmentationModel
from .model.presets import build_model

FORMAT = "m4oe-bundle"
FORMAT_VERSION = 2  # 2: config.json carries its own checksum (config_sha256) and its kind
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What a bundle records of one training dataset, to serve requests for it."""

    modality: str
    normalization: dict[str, Any]  # the intensity normalisation and its statistics
    label_values: dict[str, int]  # class name -> the dataset's label value
    flip: list[str]
    fov: float

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DatasetInfo:
        return cls(record.get("modality", ""), dict(record.get("normalization", {})),
                   dict(record.get("label_values") or {}), list(record.get("flip", [])),
                   float(record.get("fov", 1.0)))  # fmt: skip


@dataclass(frozen=True)
class BundleInfo:
    """A bundle's ``extra`` mapping, typed: the phase that wrote it, each dataset's
    :class:`DatasetInfo`, and the classes validation chose to cut to their largest component."""

    phase: str | None
    datasets: dict[str, DatasetInfo]
    keep_largest: dict[str, list[str]]
    record: dict[str, Any]

    @classmethod
    def of(cls, model: SegmentationModel) -> BundleInfo:
        """The typed view of ``model.bundle_extra`` (empty for a model that was never saved)."""
        record = dict(getattr(model, "bundle_extra", None) or {})
        datasets = {name: DatasetInfo.from_record(info) for name, info in record.get("datasets", {}).items()}
        chosen = record.get("postprocessing", {}).get("keep_largest", {})
        return cls(record.get("phase"), datasets, {k: list(v) for k, v in chosen.items()}, record)


class BundleError(RuntimeError):
    """A bundle folder is missing, corrupted or does not match the model it describes."""


def save_bundle(model: SegmentationModel, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a bundle in ``directory`` (created if needed; existing files replaced).

    Each file is written to a temporary name and renamed into place; the config, which names the
    weights' checksum, is written last, so an interrupted save is detected on load.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    if extra is None:
        extra = getattr(model, "bundle_extra", {})
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "m4oe_version": __version__,
        "preset": getattr(model, "preset", None),
        "overrides": getattr(model, "overrides", {}),
        "model_config": model.config.to_dict(),
        "modalities": model.modalities,
        "class_names": model.class_names,
        "label_sets": model.label_sets,
        "weights": {"file": WEIGHTS, "sha256": _sha256(weights)},
        "kind": "pretrain" if extra.get("phase") == "pretrain" else "segmentation",
        "extra": extra,
    }
    config["config_sha256"] = config_digest(config)
    text = json.dumps(config, indent=2)
    atomic_write(directory / CONFIG, lambda tmp: tmp.write_text(text))
    return directory


def load_bundle(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> SegmentationModel:
    """Rebuild a model from a bundle folder; ``model.bundle_extra`` holds the config's ``extra``."""
    directory = Path(directory)
    config = read_bundle_config(directory)
    weights = directory / config["weights"]["file"]
    if not weights.is_file():
        raise BundleError(f"{weights}: weights file missing")
    with ThreadPoolExecutor(1, "m4oe-sha256") as pool:
        digest = pool.submit(_sha256, weights)  # hashed while the model is built (hashlib releases the GIL)
        try:
            model = build_model(
                ModelConfig.from_dict(config["model_config"]), config["modalities"], config["label_sets"]
            )
            build_error = None
        except (ConfigError, ValueError, TypeError) as err:
            build_error = err
        if digest.result() != config["weights"]["sha256"]:
            raise BundleError(f"{weights}: checksum does not match {directory / CONFIG} (corrupted or replaced file)")
    if build_error is not None:
        raise BundleError(f"{directory / CONFIG}: cannot build the model: {build_error}") from build_error
    if model.class_names != config["class_names"]:
        raise BundleError(
            f"{directory / CONFIG}: class_names {config['class_names']} do not match the label sets "
            f"(which give {model.class_names})"
        )
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{weights}: unreadable safetensors file: {err}") from err
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise BundleError(
            f"{weights}: weights do not fit the model in {CONFIG}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state)
    model.preset = config.get("preset")
    model.overrides = config.get("overrides", {})
    model.bundle_extra = config.get("extra", {})
    model.bundle_kind = bundle_kind(config)
    return model.to(map_location)


def read_bundle_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``config.json`` of a bundle without touching the weights."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"{path}: not an m4oe bundle config (format is not {FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {config['format_version']} is newer than this m4oe reads")
    if "config_sha256" in config or config.get("format_version", 0) >= 2:
        if config.get("config_sha256") != config_digest(config):
            raise BundleError(
                f"{path}: its checksum does not match its content (an edited or damaged file); use the bundle as "
                "saved (settings are changed by training a new model, not by editing config.json)"
            )
    required = ("model_config", "modalities", "class_names", "label_sets", "weights")
    missing = [key for key in required if key not in config]
    if missing:
        raise BundleError(f"{path}: missing keys {missing}")
    shapes = {
        "model_config": lambda v: isinstance(v, dict),
        "modalities": _str_list,
        "class_names": _str_list,
        "label_sets": lambda v: isinstance(v, dict) and all(isinstance(k, str) and _str_list(x) for k, x in v.items()),
        "weights": lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("file", "sha256")),
    }
    wrong = [key for key, fits in shapes.items() if not fits(config[key])]
    if wrong:
        raise BundleError(f"{path}: wrong types for {wrong} (an edited or damaged file); use the bundle as saved")
    return config


def bundle_kind(config: dict[str, Any]) -> str:
    """``segmentation`` (a trained segmentation model) or ``pretrain`` (phase 1: the head never saw labels);
    bundles saved before the kind was recorded say it through their training phase."""
    if "kind" in config:
        return str(config["kind"])
    return "pretrain" if config.get("extra", {}).get("phase") == "pretrain" else "segmentation"


def check_segmentation_bundle(model: SegmentationModel, where: str | os.PathLike) -> None:
    """Refuse a phase-1 bundle where a segmentation model is needed (predict, experts, add-modality)."""
    if getattr(model, "bundle_kind", "segmentation") == "pretrain":
        raise BundleError(
            f"{where}: a phase-1 (MAE pre-training) bundle, whose head never learnt any labels; give a bundle "
            "made by 'm4oe train' (RUN/best or RUN/last)"
        )


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a bundle config without its own checksum, in a canonical JSON form."""
    content = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
