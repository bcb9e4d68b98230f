"""Configuration schemas shared by every part of m4oe (the bottom of the import graph)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROUTING_MODES = ("soft", "hard", "uniform")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


ARCHITECTURES = ("swin", "convnext")


def _check_field_types(config: Any, prefix: str) -> None:
    """Every plain field of a config dataclass holds a value of its declared kind: whole numbers for
    ``int`` fields (``64.0`` and ``"64"`` are refused), finite numbers for ``float`` ones, true/false
    for ``bool`` ones, text for ``str`` ones, lists of whole numbers for ``tuple[int, ...]`` ones."""
    import math

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    checks = {
        "int": (whole, "a whole number"),
        "float": (lambda v: (whole(v) or isinstance(v, float)) and math.isfinite(v), "a finite number"),
        "bool": (lambda v: isinstance(v, bool), "true or false"),
        "str": (lambda v: isinstance(v, str), "text"),
        "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(map(whole, v)), "a list of whole numbers"),
        "int | None": (lambda v: v is None or whole(v), "a whole number"),
        "str | None": (lambda v: v is None or isinstance(v, str), "text"),
    }
    for f in dataclasses.fields(config):
        if f.type in checks:
            fits, kind = checks[f.type]
            value = getattr(config, f.name)
            if not fits(value):
                raise ConfigError(f"{prefix}{f.name} must be {kind}, got {type(value).__name__} {value!r}")



@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an M4oE model (or its dense baseline).

    Attributes:
        arch: backbone, ``swin`` (the paper's Swin-UNet) or ``convnext`` (a ConvNeXt-block U-Net
            with a full-resolution first level; ``patch_size``, ``num_heads``, ``window_size`` and
            ``qkv_bias`` do not apply to it).
        img_size: side of the square input slice in pixels; a multiple of ``32 * window_size``.
        patch_size: side of the patch embedding (Swin-Unet uses 4).
        in_chans: input channels, ``1 + 2 * slice_context`` (set from it; medical slices are not
            repeated to RGB).
        embed_dim: token width of the first stage; stage ``i`` has ``embed_dim * 2**i``.
        depths: Swin blocks per encoder stage (the decoder mirrors them).
        num_heads: attention heads per stage.
        window_size: side of the attention window in tokens.
        mlp_ratio: hidden width of the dense MLP relative to the token width.
        compute_matched: if true each expert has hidden ``mlp_ratio * C / E`` (total expert size
            equals one dense MLP); if false each expert has the full ``mlp_ratio * C``.
        moe_encoder, moe_decoder: replace the MLP of the encoder / decoder blocks by M4oE layers.
        routing: default expert routing, one of ``soft`` (gate), ``hard`` (own modality's expert)
            or ``uniform`` (mean of experts, the no-gate ablation).
        gate_modality: the gate also sees a learned embedding of the sample's modality.
        closed_experts: ``(modality, expert)`` index pairs the soft gate may not route to (their gate
            logit is ``-inf``). ``add-modality --freeze-old`` closes the new expert to the old
            modalities, so that their soft-routed outputs stay those of the old model.
        drop_path_rate: stochastic depth rate, linearly increasing over the encoder blocks.
        qkv_bias: bias in the attention's query/key/value projection.
        kernel_size: depthwise convolution size of the ``convnext`` blocks.
        deep_supervision: ``convnext`` only: auxiliary heads at 1/2 and 1/4 resolution, trained with
            the main head (nnU-Net style); inference uses the main head alone.
        norm: ``convnext`` only: ``layer`` (LayerNorm over channels, ConvNeXt) or ``instance``
            (per channel over the pixels, nnU-Net / MedNeXt).
        init: ``convnext`` only: ``trunc_normal`` (std 0.02, ConvNeXt) or ``kaiming`` (nnU-Net).
        spatial: ``convnext`` only: the block's spatial convolution, ``depthwise`` (ConvNeXt) or
            ``full`` (a dense ``k x k`` convolution; more FLOPs, better use of CPU GEMM kernels).
        full_res_convs: ``convnext`` only: residual units ``x + GELU(Norm(Conv3x3(x)))`` at full
            resolution, that many after the stem and that many before the head (dense, no experts).
            Without them the last decoder level only fuses the upsampled features with the stem's.
        slice_context: neighbouring slices on each side given with each slice as extra input
            channels (2.5D input: ``[z - k, ..., z + k]``, zero beyond the volume), so that the model
            sees where it is in the stack (the base of the heart, the ends of an organ). A new
            model starts as its 2D twin: the stem's weights on the neighbours start at zero.
        matched_experts: with ``compute_matched``, the number of experts each expert's width is
            matched for (0: the model's number of modalities). ``add-modality`` sets it to the old
            count, so that the old experts keep their width when one more is added.
    """

    arch: str = "swin"
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 1
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    compute_matched: bool = False
    moe_encoder: bool = True
    moe_decoder: bool = True
    routing: str = "soft"
    gate_modality: bool = False
    drop_path_rate: float = 0.1
    qkv_bias: bool = True
    closed_experts: tuple[tuple[int, int], ...] = ()
    kernel_size: int = 7
    deep_supervision: bool = False
    norm: str = "layer"
    init: str = "trunc_normal"
    spatial: str = "depthwise"
    full_res_convs: int = 0
    slice_context: int = 0
    matched_experts: int = 0

    def __post_init__(self) -> None:
        _check_field_types(self, "")
        if self.in_chans == 1 and self.slice_context > 0:
            object.__setattr__(self, "in_chans", 1 + 2 * self.slice_context)
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        try:
            closed = tuple((int(m), int(e)) for m, e in self.closed_experts)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"closed_experts must be (modality, expert) index pairs, got {self.closed_experts!r}"
            ) from err
        object.__setattr__(self, "closed_experts", closed)
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: patching and every merge halve the grid."""
        if self.arch == "convnext":
            return 2 ** (self.num_stages - 1)
        return self.patch_size * 2 ** (self.num_stages - 1) * self.window_size

    def validate(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.arch == "convnext":
            self._validate_convnext()
        else:
            self._validate_swin()
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.slice_context < 0:
            raise ConfigError(f"slice_context must be >= 0, got {self.slice_context}")
        if self.matched_experts < 0:
            raise ConfigError(f"matched_experts must be >= 0, got {self.matched_experts}")
        if self.in_chans != 1 + 2 * self.slice_context:
            raise ConfigError(
                f"in_chans {self.in_chans} does not match slice_context {self.slice_context}: the input is each "
                f"slice with its neighbours, 1 + 2 * slice_context channels; set slice_context, not in_chans"
            )
        for m, e in self.closed_experts:
            if m < 0 or e < 0 or m == e:
                raise ConfigError(f"closed_experts: ({m}, {e}) must be indices >= 0 and never a modality's own expert")

    def _validate_convnext(self) -> None:
        if not self.depths or any(d < 0 for d in self.depths) or len(self.depths) < 2:
            raise ConfigError(f"depths must list at least 2 levels of >= 0 blocks, got {self.depths}")
        for name in ("img_size", "in_chans", "embed_dim", "kernel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.norm not in ("layer", "instance"):
            raise ConfigError(f"norm must be layer or instance, got {self.norm!r}")
        if self.spatial not in ("depthwise", "full"):
            raise ConfigError(f"spatial must be depthwise or full, got {self.spatial!r}")
        if self.full_res_convs < 0:
            raise ConfigError(f"full_res_convs must be >= 0, got {self.full_res_convs}")
        if self.init not in ("trunc_normal", "kaiming"):
            raise ConfigError(f"init must be trunc_normal or kaiming, got {self.init!r}")
        if self.img_size % self.size_multiple:
            raise ConfigError(
                f"img_size {self.img_size} must be a multiple of {self.size_multiple} "
                f"({self.num_stages} levels each halve the side)"
            )

    def _validate_swin(self) -> None:
        for name in ("deep_supervision", "full_res_convs"):
            if getattr(self, name):
                raise ConfigError(f"{name} is available with arch: convnext only")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ConfigError(
                f"depths {self.depths} and num_heads {self.num_heads} must be non-empty and of equal length"
            )
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if heads <= 0 or dim % heads:
                raise ConfigError(f"stage {i}: width {dim} is not divisible by {heads} heads")
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.size_multiple:
            valid = ", ".join(str(self.size_multiple * k) for k in range(1, 4))
            raise ConfigError(
                f"img_size {self.img_size} does not fit window_size {self.window_size}: with patch "
                f"{self.patch_size} and {self.num_stages} stages the side must be a multiple of "
                f"{self.size_multiple} (valid sizes: {valid}, ...); or change window_size"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["depths"] = list(self.depths)
        out["num_heads"] = list(self.num_heads)
        out["closed_experts"] = [list(pair) for pair in self.closed_experts]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        _reject_unknown(cls, values, "unknown model config keys")
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"bad model config: {err}") from err

    def replace(self, **overrides: Any) -> "ModelConfig":
        base = self.to_dict()
        base.update(overrides)
        return ModelConfig.from_dict(base)


PRESETS: dict[str, ModelConfig] = {
    # The paper's model as the published code builds it: every expert as wide as the dense MLP.
    "m4oe-t": ModelConfig(),
    # Compute-matched experts (hidden 4C/E): total size close to the dense Swin-UNet.
    "m4oe-t-lite": ModelConfig(compute_matched=True),
    # The dense Swin-UNet baseline (no experts, no gate).
    "swin-unet": ModelConfig(moe_encoder=False, moe_decoder=False),
    # A small model for tests and CPU demos.
    "tiny": ModelConfig(
        img_size=128, embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.0
    ),
    # M4oE on a ConvNeXt-block U-Net (full-resolution first level, deep supervision): learns from
    # small data and small compute. Experts are compute-matched (hidden 3C/E each).
    "m4oe-convnext-s": ModelConfig(
        arch="convnext", img_size=128, embed_dim=16, depths=(0, 1, 2, 2, 2), kernel_size=3, mlp_ratio=3.0,
        compute_matched=True, drop_path_rate=0.0, deep_supervision=True, init="kaiming",
    ),
    # Its dense twin (plain MLP in every block).
    "convnext-unet-s": ModelConfig(
        arch="convnext", img_size=128, embed_dim=16, depths=(0, 1, 2, 2, 2), kernel_size=3, mlp_ratio=3.0,
        moe_encoder=False, moe_decoder=False, drop_path_rate=0.0, deep_supervision=True, init="kaiming",
    ),
}  # fmt: skip


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    """A preset's model config with ``overrides`` applied (checked against the preset's values)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset].replace(**overrides) if overrides else PRESETS[preset]


def _reject_unknown(cls, values: dict[str, Any], message: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{message} {unknown}; allowed: {sorted(known)}")


def build_vocabulary(label_sets: dict[str, list[str]]) -> list[str]:
    """Union of all label sets in first-seen order, background first: same names are one class."""
    vocab = ["background"]
    for labels in label_sets.values():
        vocab.extend(name for name in labels if name not in vocab)
    return vocab


# --------------------------------------------------------------------------------------------------
# Experiment configuration (YAML)
# --------------------------------------------------------------------------------------------------

NORMALIZATION_SCHEMES = ("ct", "mri", "none")
FLIP_AXES = {"x": "right-left", "y": "anterior-posterior"}  # in-plane axes of a canonical (LPS) slice


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
    val_every: int = 5  # epochs; 0 = never
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = at epoch ends only
    workers: int = 2
    seed: int = 0
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
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
    optimizer: str = "adamw"  # adamw | sgd (Nesterov, momentum 0.99, as nnU-Net)
    schedule: str = "cosine"  # cosine | poly (nnU-Net's (1 - step/steps)^0.9), after the warm-up
    augment: bool = True
    routing: str | None = None  # override the model's routing mode for training
    baseline: str | None = None  # "per_modality": one model per modality (paradigm a)
    # phase 1 (MAE)
    pretrain_epochs: int = 50
    pretrain_lr: float = 1.5e-4
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare `off` / `on` as false / true: take them as the words the user wrote
        for name in ("amp", "compile"):
            if isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, "on" if getattr(self, name) else "off")
        _check_field_types(self, "train.")
        counts = ("epochs", "batch_size", "workers", "pretrain_epochs", "val_every", "checkpoint_every", "seed")
        optional = ("samples_per_epoch",)  # None: the number of training slices
        for name in (*counts, *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"train.{name} must be a whole number, got {value!r}")
        positive = ("epochs", "batch_size", "lr", "workers", "pretrain_epochs", "pretrain_lr")
        for name in positive:
            value = getattr(self, name)
            if name == "workers" and value == 0:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive number, got {value!r}")
        at_least_zero = ("min_lr", "weight_decay", "warmup_epochs", "grad_clip", "ce_weight", "dice_weight",
                         "val_every", "checkpoint_every", "seed")  # fmt: skip
        for name in at_least_zero:
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more, got {getattr(self, name)!r}")
        if self.ce_weight + self.dice_weight <= 0:
            raise ConfigError("train.ce_weight and train.dice_weight cannot both be 0: nothing would be learnt")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(
                "train.samples_per_epoch must be 1 or more (or left out: all training slices), got "
                f"{self.samples_per_epoch}"
            )
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"train.amp must be auto, bf16 or off, got {self.amp!r}")
        for name, allowed in (("dice", ("sample", "batch", "batch_present")), ("optimizer", ("adamw", "sgd")),
                              ("schedule", ("cosine", "poly")), ("foreground_sampling", ("any", "class"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"train.compile must be auto, on or off, got {self.compile!r}")
        if self.routing is not None and self.routing not in ROUTING_MODES:
            raise ConfigError(f"train.routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.baseline not in (None, "per_modality"):
            raise ConfigError(f"train.baseline must be per_modality or left out, got {self.baseline!r}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"train.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"train.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        _reject_unknown(cls, values, "train: unknown keys")
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"bad train config: {err}") from err


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


_DATASET_KEYS = {
    "path", "modality", "name", "normalization", "label_map", "labels", "cases", "max_cases", "weight", "split",
    "flip", "fov",
}  # fmt: skip
_SPLIT_KEYS = {"folds", "fold", "seed", "group_pattern", "val"}
_TOP_KEYS = {"datasets", "model", "split", "train", "run"}  # run: what a run folder's config.yaml records


def _expect(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _unknown(values: dict, known: set[str], where: str) -> None:
    extra = sorted(set(values) - known)
    if extra:
        raise ConfigError(f"{where}: unknown keys {extra}; allowed: {sorted(known)}")


def _parse_split(values: Any, where: str, default: SplitConfig | None = None) -> SplitConfig:
    if values is None:
        return default or SplitConfig()
    _expect(values, dict, where)
    _unknown(values, _SPLIT_KEYS, where)
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


def _parse_dataset(values: Any, index: int, split: SplitConfig, base_dir: Path) -> DatasetConfig:
    where = f"datasets[{index}]"
    _expect(values, dict, where)
    _unknown(values, _DATASET_KEYS, where)
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
    )


def parse_experiment(values: Any, base_dir: str | Path = ".", source: str | None = None) -> ExperimentConfig:
    """Validate a parsed YAML mapping; relative dataset paths are resolved against ``base_dir``."""
    where = source or "config"
    try:
        _expect(values, dict, "the config")
        _unknown(values, _TOP_KEYS, "the config")
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
        entry: dict[str, Any] = {"path": d.path}
        for key in ("modality", "name", "normalization", "label_map", "max_cases"):
            if getattr(d, key) is not None:
                entry[key] = getattr(d, key)
        if d.cases is not None:
            entry["cases"] = list(d.cases)
        if not d.labeled:
            entry["labels"] = "none"
        entry["weight"] = d.weight
        if d.flip:
            entry["flip"] = list(d.flip)
        if d.fov != 1:
            entry["fov"] = d.fov
        if d.split != experiment.split:
            entry["split"] = split_dict(d.split)
        datasets.append(entry)
    return {
        "model": {"preset": experiment.preset, **experiment.model_overrides},
        "split": split_dict(experiment.split),
        "train": dataclasses.asdict(experiment.training),
        "datasets": datasets,
    }


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file; errors name the file and the offending key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return parse_experiment(values, base_dir=path.parent, source=str(path))


class DuplicateKeyError(ValueError):
    """A YAML mapping names one key twice (YAML readers silently keep the last)."""


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a key written twice in one mapping."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKeyError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in one section; keep one"
                )
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader
