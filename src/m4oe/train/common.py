"""Pieces both training phases use: the slice cache of a config, the model it implies, run metadata."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, DatasetConfig, ExperimentConfig, experiment_to_dict
from ..data.cache_format import CacheMeta, read_meta
from ..data.loader import SliceCache
from ..files import check_output_dir, mark_output_dir, write_text
from ..model.base import SegmentationModel
from ..model.presets import create_model, preset_config
from .checkpoint import RESUME_KEYS, STATE_FILE, RunExists
from .runtime import Runtime, barrier


def default_cache_dir(experiment: ExperimentConfig) -> Path:
    stem = Path(experiment.source).stem if experiment.source else "experiment"
    return Path("cache") / stem


def check_run_folders(experiment: ExperimentConfig, cache_dir: Path | None, outs: list[Path], resume: bool,
                      states: bool = True) -> None:  # fmt: skip
    """Everything about a run's folders that can be refused, refused before anything is written: the
    cache must be new, empty or m4oe's own cache, each run folder new, empty or m4oe's own run, none
    of them a dataset (or inside one, or holding one); with ``states``, a run folder that holds a run
    needs ``resume``, and ``resume`` needs a checkpoint (a per-modality baseline's folder holds runs
    of its own, checked once they are known)."""
    datasets = [d.path for d in experiment.datasets]
    cache = Path(cache_dir or default_cache_dir(experiment))
    check_output_dir(cache, "cache", datasets, option="--cache")
    for out in outs:
        check_output_dir(out, "run", [*datasets, cache])
        if not states:
            continue
        if not resume and (out / "last").exists():
            raise RunExists(
                f"{out} already holds a run (its last/ checkpoint): pass --resume to continue it, or choose another -o"
            )
        if resume and not (out / "last" / STATE_FILE).is_file():
            raise RunExists(f"{out}: no checkpoint to resume from ({out / 'last' / STATE_FILE}); leave out --resume")


def check_resume(out: Path, model: SegmentationModel, extra: dict[str, Any], config) -> None:
    """Refuse to resume ``out`` when anything that gives its weights their meaning changed: the phase,
    the model, the input size, the modalities (expert order), the datasets and their label sets,
    modality, normalisation, label values, flip and field of view, or the batch, seed and epoch size
    the checkpoint's position counts in. Names the first settings that differ."""
    import torch

    from ..bundle import read_bundle_config
    from ..config import ModelConfig

    saved = read_bundle_config(out / "last")
    before = saved.get("extra", {})
    changes: list[str] = []

    def compare(name: str, old: Any, new: Any) -> None:
        if json.dumps(old, sort_keys=True, default=list) != json.dumps(new, sort_keys=True, default=list):
            changes.append(f"{name} {old!r} -> {new!r}")

    compare("phase", before.get("phase"), extra.get("phase"))
    old_model = ModelConfig.from_dict(saved["model_config"]).to_dict()
    for key, value in model.config.to_dict().items():
        compare(f"model.{key}", old_model.get(key), value)
    compare("modalities", saved["modalities"], model.modalities)
    compare("label sets", saved["label_sets"], model.label_sets)
    compare("img_size of the cache", before.get("img_size"), extra.get("img_size"))
    old_datasets, new_datasets = before.get("datasets", {}), extra.get("datasets", {})
    for name in sorted(set(old_datasets) | set(new_datasets)):
        old, new = old_datasets.get(name, {}), new_datasets.get(name, {})
        for key in sorted(set(old) | set(new)):
            compare(f"dataset {name} {key}", old.get(key), new.get(key))
    state = torch.load(out / "last" / STATE_FILE, map_location="cpu", weights_only=True)
    for key in RESUME_KEYS:
        compare(f"train.{key}", state["config"].get(key), getattr(config, key))
    if changes:
        more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
        raise RunExists(
            f"cannot resume {out}: {'; '.join(changes[:3])}{more} changed since its checkpoint; resume with the "
            "run's own settings (its config.yaml), or start a new run in another -o"
        )


def ensure_cache(
    experiment: ExperimentConfig,
    cache_dir: Path | None,
    runtime: Runtime,
    progress: bool = True,
    img_size: int | None = None,
):
    """Open the config's slice cache, preparing it first if needed (a no-op when up to date).

    Slices are fitted to ``img_size`` (default: the config's model input size).
    """
    from ..data.prepare import prepare

    option = "--cache" if cache_dir else "default --cache"
    cache_dir = Path(cache_dir or default_cache_dir(experiment))
    img_size = img_size or preset_config(experiment.preset, **experiment.model_overrides).img_size
    if runtime.main and not _reuse_as_is(experiment, cache_dir):
        result = prepare(experiment, cache_dir, img_size=img_size, progress=progress, output_option=option)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    barrier(runtime)
    cache = SliceCache(cache_dir)
    if cache.img_size != img_size:
        raise ConfigError(f"{cache_dir}: cache slices are {cache.img_size} px but the model takes {img_size} px")
    return cache


def _reuse_as_is(experiment: ExperimentConfig, cache_dir: Path) -> bool:
    """A complete cache is used without re-preparing when it holds more datasets than the config
    (a run on a subset) or when the raw data is not on this machine (a cache carried to a GPU)."""
    meta = read_meta(cache_dir)
    if meta is None or not meta.complete:
        return False
    held = set(meta.dataset_names)
    wanted = _dataset_names(experiment)
    if not wanted <= held:
        return False
    if not all(Path(d.path).is_dir() for d in experiment.datasets):
        return True  # a cache carried to a machine without the raw data: nothing to compare with
    if wanted == held:
        return False  # prepare() compares the whole fingerprint and rebuilds what changed
    _check_subset(experiment, cache_dir, meta)
    return True


def _check_subset(experiment: ExperimentConfig, cache_dir: Path, meta: CacheMeta) -> None:
    """A config on some of a cache's datasets must describe them as the cache was prepared."""
    from ..data.cache_format import dataset_fingerprint
    from ..data.datasets import DataError
    from ..data.prepare import discover

    problems: list[str] = []
    sources = discover(experiment, problems)
    if problems:
        raise DataError(problems, "the datasets cannot be opened")
    held = {d.name: d.fingerprint for d in meta.datasets}
    changed = [s.name for s in sources if held.get(s.name) != dataset_fingerprint(s)]
    if changed:
        raise ConfigError(
            f"{cache_dir}: datasets {changed} were prepared with other settings or files (split, label_map, "
            f"normalization, cases, flip, fov); prepare a cache for this config (another --cache) or "
            "rebuild this one"
        )


def experiment_datasets(experiment: ExperimentConfig, cache: SliceCache) -> list[str]:
    """The cache's datasets that the config names, in cache order."""
    wanted = _dataset_names(experiment)
    return [n for n in cache.dataset_names if n in wanted]


def sampling_weights(experiment: ExperimentConfig, cache: SliceCache) -> list[float]:
    """Each cached dataset's sampling weight from the config (1 for datasets the config leaves out;
    the sampler's mask keeps them out of the run anyway), in the cache's order."""
    weights = {_dataset_name(d): d.weight for d in experiment.datasets}
    return [weights.get(name, 1.0) for name in cache.dataset_names]


def _dataset_names(experiment: ExperimentConfig) -> set[str]:
    return {_dataset_name(d) for d in experiment.datasets}


def _dataset_name(dataset: DatasetConfig) -> str:
    """The name the cache holds a dataset under: its ``name``, else its folder's."""
    return dataset.name or Path(dataset.path).name


def model_for(experiment: ExperimentConfig, cache: SliceCache, datasets: list[str] | None = None) -> SegmentationModel:
    """The config's model over the cache's modalities and label sets (or a subset of datasets)."""
    names = datasets or cache.dataset_names
    label_sets = {n: cache.label_sets[n] for n in names}
    modality = cache.dataset_modality
    modalities = [m for m in cache.modalities if any(modality[n] == m for n in names)]
    return create_model(experiment.preset, modalities=modalities, label_sets=label_sets, **experiment.model_overrides)


def inference_metadata(
    cache: SliceCache, model: SegmentationModel, phase: str, train: dict[str, Any]
) -> dict[str, Any]:
    """What ``predict`` needs besides the weights: per-dataset modality, normalisation, label values."""
    datasets = {
        d.name: {"modality": d.modality, "normalization": d.normalization, "label_values": d.label_values,
                 "flip": d.flip, "fov": d.fov}
        for d in cache.info.datasets
        if d.name in model.label_sets
    }  # fmt: skip
    return {
        "phase": phase,
        "img_size": cache.img_size,
        "datasets": datasets,
        "cache_fingerprint": cache.info.fingerprint,
        "train": train,
    }


def write_run_config(out: Path, experiment: ExperimentConfig, extra: dict[str, Any]) -> None:
    """The resolved config of a run, next to its results: ``m4oe train RUN/config.yaml`` reruns it
    (``run:`` records the phase, cache and the like, and is ignored when read). Marks ``out`` as a run."""
    mark_output_dir(out, "run")
    resolved = {**experiment_to_dict(experiment), "run": extra}
    write_text(out / "config.yaml", yaml.safe_dump(json.loads(json.dumps(resolved, default=list)), sort_keys=False))
