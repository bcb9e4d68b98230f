"""The model schema (:class:`ModelConfig`), the preset registry and the union label vocabulary."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .base import ConfigError, check_field_types, from_mapping
from .choices import ARCHITECTURES, CONVNEXT_INITS, CONVNEXT_NORMS, CONVNEXT_SPATIAL, ROUTING_MODES


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
        shared_expert: every M4oE layer also has one shared expert, as wide as one modality expert,
            that every token passes through unweighted beside the gated modality experts (so that
            what all modalities need is learnt once; DeepSeekMoE's shared experts). Costs one
            expert's FLOPs and parameters more per layer.
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
    shared_expert: bool = False
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
        check_field_types(self, "")
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
        if self.norm not in CONVNEXT_NORMS:
            raise ConfigError(f"norm must be one of {CONVNEXT_NORMS}, got {self.norm!r}")
        if self.spatial not in CONVNEXT_SPATIAL:
            raise ConfigError(f"spatial must be one of {CONVNEXT_SPATIAL}, got {self.spatial!r}")
        if self.full_res_convs < 0:
            raise ConfigError(f"full_res_convs must be >= 0, got {self.full_res_convs}")
        if self.init not in CONVNEXT_INITS:
            raise ConfigError(f"init must be one of {CONVNEXT_INITS}, got {self.init!r}")
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
        return from_mapping(cls, values, "model")

    def replace(self, **overrides: Any) -> "ModelConfig":
        base = self.to_dict()
        base.update(overrides)
        return ModelConfig.from_dict(base)


PRESETS: dict[str, ModelConfig] = {}
"""Named model configs. Each architecture module registers its own (timm style: ``m4oe.model.swin_unet``
registers ``m4oe-t`` and the Swin presets, ``m4oe.model.convnext_unet`` the ConvNeXt ones); importing
``m4oe`` imports them all."""


def register_preset(name: str, config: ModelConfig) -> ModelConfig:
    """Make ``config`` available as ``name`` (to :func:`preset_config`, ``create_model`` and YAML files)."""
    if PRESETS.get(name, config) != config:
        raise ValueError(f"preset {name!r} is registered twice with different configs")
    PRESETS[name] = config
    return config


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    """A preset's model config with ``overrides`` applied (checked against the preset's values)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset].replace(**overrides) if overrides else PRESETS[preset]


def build_vocabulary(label_sets: dict[str, list[str]]) -> list[str]:
    """Union of all label sets in first-seen order, background first: same names are one class."""
    vocab = ["background"]
    for labels in label_sets.values():
        vocab.extend(name for name in labels if name not in vocab)
    return vocab
