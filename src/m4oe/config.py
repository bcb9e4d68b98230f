"""Configuration schemas shared by every part of m4oe (the bottom of the import graph)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ROUTING_MODES = ("soft", "hard", "uniform")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an M4oE Swin-UNet (or its dense baseline).

    Attributes:
        img_size: side of the square input slice in pixels; a multiple of ``32 * window_size``.
        patch_size: side of the patch embedding (Swin-Unet uses 4).
        in_chans: image channels (1: medical slices are not repeated to RGB).
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
        drop_path_rate: stochastic depth rate, linearly increasing over the encoder blocks.
        qkv_bias: bias in the attention's query/key/value projection.
    """

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this: patching and every merge halve the grid."""
        return self.patch_size * 2 ** (self.num_stages - 1) * self.window_size

    def validate(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
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
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["depths"] = list(self.depths)
        out["num_heads"] = list(self.num_heads)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"bad model config: {err}") from err

    def replace(self, **overrides: Any) -> "ModelConfig":
        base = self.to_dict()
        base.update(overrides)
        return ModelConfig.from_dict(base)


__all__ = ["ConfigError", "ModelConfig", "ROUTING_MODES"]
