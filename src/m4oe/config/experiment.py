"""The experiment schema: datasets, split, training settings, and the parsing of its YAML mapping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import ConfigError, check_field_types, field_names, from_mapping, reject_unknown
from .choices import (
    BASELINES,
    COMPILE_MODES,
    DICE_MODES,
    FLIP_AXES,
    FOREGROUND_SAMPLING,
    NORMALIZATION_SCHEMES,
    OPTIMIZERS,
    PRECISION_ALIASES,
    PRECISIONS,
    ROUTING_MODES,
    SCHEDULES,
)
from .model import preset_config


@dataclass(frozen=True)
class SplitConfig:
    """How cases are split into training and validation (by case or patient, never by slice).

    Either k-fold (``folds``, ``fold``, ``seed``; cases whose ids share the first match of
    ``group_pattern`` stay together, e.g. ``patient\\d+`` for the two frames of an ACDC patient),
    or an explicit ``val`` list of case ids (every other case trains).
    """

    folds: int = 5
    fold: int = 0
    seed: int = 12345
    group_pattern: str | None = None
    val: tuple[str, ...] | None = None

    def validate(self, where: str) -> None:
        if self.val is None:
            if self.folds < 2:
                raise ConfigError(f"{where}: split.folds must be >= 2, got {self.folds}")
            if not 0 <= self.fold < self.folds:
                raise ConfigError(f"{where}: split.fold must be in [0, {self.folds}), got {self.fold}")
        if self.group_pattern is not None:
            import re

            try:
                re.compile(self.group_pattern)
            except re.error as err:
                raise ConfigError(f"{where}: split.group_pattern is not a valid regex: {err}") from err


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of an experiment.

    Attributes:
        path: nnU-Net v2 raw folder (or MSD-style folder with a ``training`` list in dataset.json).
        modality: the expert it belongs to (default: ``channel_names["0"]`` of dataset.json).
        name: short name (default: the folder name).
        normalization: ``ct`` (global foreground percentile clip + z-score), ``mri`` (per-case
            percentile clip + z-score) or ``none``; default ``ct`` when the modality names CT.
        label_map: rename or merge labels, ``{old_name: new_name}`` (same new name = merged).
        labeled: false for images without labels (``labels: none``: phase-1 pre-training only).
        cases: restrict to these case ids; ``max_cases``: to the first N (sorted) cases.
        weight: relative sampling weight of the dataset (default 1: datasets balanced). It steers
            the sampler only: changing it keeps the slice cache.
        split: per-dataset split; default: the experiment's ``split``.
        flip: in-plane axes to reverse after reorientation, for files whose header direction
            contradicts their anatomy: ``x`` (right-left), ``y`` (anterior-posterior). The same flip
            is applied when predicting with ``--dataset`` of this name, and undone on the output.
            BTCV's files, for one, store posterior where their header says anterior.
        fov: the central fraction of each in-plane side the model sees (default 1: all of it), so
            that a small target in a wide field of view (a heart in a chest MRI) gets more pixels.
            ``prepare`` refuses a value that leaves labelled voxels of any case outside; prediction
            for this dataset (or for a modality whose datasets share one view) sees the same part
            and calls the rest background.
        stored_window: the physical window the files store as 0..255, e.g. ``[-125, 275]`` for
            BTCV's 8-bit Hounsfield window (default: dataset.json's ``stored_window``, else none: the
            values are physical). The cache, its statistics and the bundle are then in physical units,
            so the model takes a scan straight from a scanner.
    """

    path: str
    modality: str | None = None
    name: str | None = None
    normalization: str | None = None
    label_map: dict[str, str] | None = None
    labeled: bool = True
    cases: tuple[str, ...] | None = None
    max_cases: int | None = None
    weight: float = 1.0
    split: SplitConfig | None = None
    flip: tuple[str, ...] = ()
    fov: float = 1.0
    stored_window: tuple[float, float] | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the ``train:`` section); phase-1 settings live under ``train.pretrain``.

    Defaults follow the paper (AdamW, weight decay 1e-4, batch 36) with a linear warm-up and a
    cosine decay of the learning rate per step.
    """

    epochs: int = 100
    batch_size: int = 36
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    samples_per_epoch: int | None = None  # default: the number of training slices
    # a wall-clock budget for the model: phase 2's epochs (then only its validation points) are fitted
    # so that phase 2 and the phase-1 run it starts from (--init) end within it; samples_per_epoch unused
    minutes: float | None = None
    val_every: int = 5  # epochs; 0 = never
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    workers: int = 2
    seed: int = 0
    amp: str = "auto"  # the precision: auto (bf16 on CUDA, fp32 on a CPU) | bf16 | fp32 (before: off)
    compile: str = "auto"  # auto (on for CUDA) | on | off
    grad_clip: float = 12.0
    foreground_fraction: float = 0.33
    # any: a forced foreground slice is any slice with foreground | class: a foreground class drawn
    # uniformly, then a slice holding it (nnU-Net's oversampling, so small organs are drawn as often)
    foreground_sampling: str = "any"
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    # sample: soft Dice per sample, averaged | batch: nnU-Net's batch Dice within each dataset |
    # batch_present: the same over the classes present in or predicted for each dataset's share
    dice: str = "sample"
    # ways to make the experts modality experts (issue #29): an auxiliary loss, the mean over gated
    # layers and tokens of -log(gate weight of the sample's own modality expert), with this weight ...
    route_weight: float = 0.0
    route_decay: float = 0.0  # ... falling linearly to 0 over this fraction of phase 2 (0: constant)
    # a routing curriculum (MoME's): each soft gate mixed with the sample's own expert, all of it at the
    # start, handing over linearly to the learnt gate alone by this fraction of phase 2 (0: off)
    handover: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (Nesterov, momentum 0.99, as nnU-Net)
    schedule: str = "cosine"  # cosine | poly (nnU-Net's (1 - step/steps)^0.9), after the warm-up
    augment: bool = True
    # robustness augmentation (coarser resolution, monotonic intensity remapping): each per slice with
    # this probability (0: off, and nothing of it drawn)
    robust_augment: float = 0.0
    routing: str | None = None  # override the model's routing mode for training
    baseline: str | None = None  # "per_modality": one model per modality (paradigm a)
    # phase 1 (MAE)
    pretrain_epochs: int = 50
    pretrain_samples_per_epoch: int | None = None  # default: samples_per_epoch
    pretrain_lr: float = 1.5e-4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare `off` / `on` as false / true: take them as the words the user wrote
        for name in ("amp", "compile"):
            if isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, "on" if getattr(self, name) else "off")
        object.__setattr__(self, "amp", PRECISION_ALIASES.get(self.amp, self.amp))
        check_field_types(self, "train.")  # whole numbers for every int field, finite numbers for floats
        positive = ("epochs", "batch_size", "lr", "workers", "pretrain_epochs", "pretrain_lr")
        for name in positive:
            value = getattr(self, name)
            if name == "workers" and value == 0:
                continue
            if value <= 0:
                raise ConfigError(f"train.{name} must be a positive number, got {value!r}")
        at_least_zero = ("min_lr", "weight_decay", "warmup_epochs", "grad_clip", "ce_weight", "dice_weight",
                         "val_every", "checkpoint_every", "seed", "route_weight")  # fmt: skip
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more, got {getattr(self, name)!r}")
        if self.ce_weight + self.dice_weight <= 0:
            raise ConfigError("train.ce_weight and train.dice_weight cannot both be 0: nothing would be learnt")
        for name in ("samples_per_epoch", "pretrain_samples_per_epoch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(
                    f"train.{name} must be 1 or more (or left out: all training slices), got {getattr(self, name)}"
                )
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"train.minutes must be a positive number of minutes (or null: no budget), "
                              f"got {self.minutes}")  # fmt: skip
        words = (("amp", PRECISIONS), ("compile", COMPILE_MODES), ("dice", DICE_MODES), ("optimizer", OPTIMIZERS),
                 ("schedule", SCHEDULES), ("foreground_sampling", FOREGROUND_SAMPLING))  # fmt: skip
        for name, allowed in words:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, allowed in (("routing", ROUTING_MODES), ("baseline", BASELINES)):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {allowed} or left out, got {getattr(self, name)!r}")
        for name in ("route_decay", "handover"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be a fraction of phase 2 in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"train.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.robust_augment <= 1.0:
            raise ConfigError(f"train.robust_augment must be a probability in [0, 1], got {self.robust_augment}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"train.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return from_mapping(cls, values, "train")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: datasets, model and (later) training settings, from one YAML file."""

    datasets: tuple[DatasetConfig, ...]
    model: dict[str, Any]
    split: SplitConfig
    train: dict[str, Any]
    source: str | None = None

    @property
    def preset(self) -> str:
        return self.model.get("preset", "m4oe-t")

    @property
    def model_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "preset"}

    @property
    def training(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)


_DATASET_KEYS = field_names(DatasetConfig) - {"labeled"} | {"labels"}  # YAML says labels: none
_SPLIT_KEYS = field_names(SplitConfig)
_TOP_KEYS = {"datasets", "model", "split", "train", "run"}  # run: what a run folder's config.yaml records


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _parse_split(values: Any, where: str, default: SplitConfig | None = None) -> SplitConfig:
    if values is None:
        return default or SplitConfig()
    _expect(values, dict, where)
    reject_unknown(values, _SPLIT_KEYS, where)
    base = dataclasses.asdict(default or SplitConfig())
    for key in ("folds", "fold", "seed"):
        if key in values:
            base[key] = _expect(values[key], int, f"{where}.{key}")
    if "group_pattern" in values:
        base["group_pattern"] = _expect(values["group_pattern"], str, f"{where}.group_pattern")
    if "val" in values:
        val = _expect(values["val"], list, f"{where}.val")
        base["val"] = tuple(str(v) for v in val)
    split = SplitConfig(**base)
    split.validate(where)
    return split


def window_pair(value: Any) -> tuple[float, float] | None:
    """A ``stored_window`` as ``(low, high)``, or None unless it is two numbers with low < high."""
    ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    return (float(value[0]), float(value[1])) if ok and value[0] < value[1] else None


def _parse_dataset(values: Any, index: int, split: SplitConfig, base_dir: Path) -> DatasetConfig:
    where = f"datasets[{index}]"
    _expect(values, dict, where)
    reject_unknown(values, _DATASET_KEYS, where)
    if "path" not in values:
        raise ConfigError(f"{where}: 'path' is required (an nnU-Net raw dataset folder)")
    path = Path(_expect(values["path"], str, f"{where}.path")).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    labels = values.get("labels", "auto")
    if labels not in ("auto", "none", None):
        raise ConfigError(f"{where}.labels must be 'none' (images only) or left out, got {labels!r}")
    norm = values.get("normalization")
    if norm is not None and norm not in NORMALIZATION_SCHEMES:
        raise ConfigError(f"{where}.normalization must be one of {NORMALIZATION_SCHEMES}, got {norm!r}")
    label_map = values.get("label_map")
    if label_map is not None:
        _expect(label_map, dict, f"{where}.label_map")
        label_map = {str(k): str(v) for k, v in label_map.items()}
        if "background" in label_map or "background" in label_map.values():
            raise ConfigError(f"{where}.label_map: background cannot be renamed or be a target")
    cases = values.get("cases")
    if cases is not None:
        cases = tuple(str(c) for c in _expect(cases, list, f"{where}.cases"))
    max_cases = values.get("max_cases")
    if max_cases is not None and _expect(max_cases, int, f"{where}.max_cases") < 1:
        raise ConfigError(f"{where}.max_cases must be >= 1, got {max_cases}")
    weight = float(_expect(values.get("weight", 1.0), (int, float), f"{where}.weight"))
    if not weight > 0:
        raise ConfigError(f"{where}.weight must be positive, got {weight}")
    flip = tuple(str(a) for a in _expect(values.get("flip", []), list, f"{where}.flip"))
    if not set(flip) <= set(FLIP_AXES) or len(set(flip)) != len(flip):
        raise ConfigError(f"{where}.flip must list distinct in-plane axes among {list(FLIP_AXES)}, got {list(flip)}")
    fov = float(_expect(values.get("fov", 1.0), (int, float), f"{where}.fov"))
    if not 0.1 <= fov <= 1:
        raise ConfigError(f"{where}.fov must be a fraction of the field of view in [0.1, 1], got {fov}")
    window = values.get("stored_window")
    if window is not None:
        pair = window_pair(_expect(window, list, f"{where}.stored_window"))
        if pair is None:
            raise ConfigError(f"{where}.stored_window must be [low, high] in physical units (low < high), got {window}")
        window = pair
    return DatasetConfig(
        path=str(path),
        modality=_expect(values["modality"], str, f"{where}.modality") if "modality" in values else None,
        name=_expect(values["name"], str, f"{where}.name") if "name" in values else None,
        normalization=norm,
        label_map=label_map,
        labeled=labels != "none" and labels is not None,
        cases=cases,
        max_cases=max_cases,
        weight=weight,
        split=_parse_split(values.get("split"), f"{where}.split", split) if "split" in values else split,
        flip=flip,
        fov=fov,
        stored_window=window,
    )


def parse_experiment(values: Any, base_dir: str | Path = ".", source: str | None = None) -> ExperimentConfig:
    """Validate a parsed YAML mapping; relative dataset paths are resolved against ``base_dir``."""
    where = source or "config"
    try:
        _expect(values, dict, "the config")
        reject_unknown(values, _TOP_KEYS, "the config")
        datasets = _expect(values.get("datasets"), list, "datasets")
        if not datasets:
            raise ConfigError("datasets: at least one dataset is required")
        split = _parse_split(values.get("split"), "split")
        parsed = tuple(_parse_dataset(d, i, split, Path(base_dir)) for i, d in enumerate(datasets))
        model = dict(_expect(values.get("model") or {}, dict, "model"))
        if "preset" in model:
            _expect(model["preset"], str, "model.preset")
        overrides = {k: v for k, v in model.items() if k != "preset"}
        preset_config(model.get("preset", "m4oe-t"), **overrides)  # unknown preset or invalid keys fail here
        train = dict(_expect(values.get("train") or {}, dict, "train"))
        TrainConfig.from_dict(train)  # unknown or invalid training keys fail here
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return ExperimentConfig(datasets=parsed, model=model, split=split, train=train, source=source)


def experiment_to_dict(experiment: ExperimentConfig) -> dict[str, Any]:
    """The experiment as a YAML-ready mapping that :func:`parse_experiment` reads back to the same
    experiment (dataset paths absolute, training settings resolved)."""

    def split_dict(split: SplitConfig) -> dict[str, Any]:
        values = dataclasses.asdict(split)
        if split.val is not None:
            values["val"] = list(split.val)
        return {k: v for k, v in values.items() if v is not None}

    datasets = []
    for d in experiment.datasets:
        entry: dict[str, Any] = {}
        for f in dataclasses.fields(DatasetConfig):
            value = getattr(d, f.name)
            if f.name == "labeled":
                if not value:
                    entry["labels"] = "none"
            elif f.name == "split":
                if value != experiment.split:
                    entry["split"] = split_dict(value)
            elif f.name in ("path", "weight") or value != f.default:  # path and weight always written
                entry[f.name] = list(value) if isinstance(value, tuple) else value
        datasets.append(entry)
    return {
        "model": {"preset": experiment.preset, **experiment.model_overrides},
        "split": split_dict(experiment.split),
        "train": dataclasses.asdict(experiment.training),
        "datasets": datasets,
    }
