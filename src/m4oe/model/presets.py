"""Named model presets, ``create_model`` and model statistics (parameters, FLOPs)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ConfigError, ModelConfig
from .moe import MoEMLP
from .unet import M4oEUNet

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
}


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset].replace(**overrides) if overrides else PRESETS[preset]


def create_model(
    preset: str,
    *,
    modalities: list[str],
    label_sets: dict[str, list[str]],
    **overrides: Any,
) -> M4oEUNet:
    """Build an M4oE Swin-UNet (or a baseline) from a named preset.

    Args:
        preset: one of ``m4oe-t``, ``m4oe-t-lite``, ``swin-unet``, ``tiny``.
        modalities: modality names, one expert each (e.g. ``["CT", "MRI"]``).
        label_sets: dataset name -> class names, background first.
        overrides: any :class:`~m4oe.config.ModelConfig` field (e.g. ``img_size=256, window_size=8``).

    Example:
        >>> model = create_model("tiny", modalities=["CT", "MRI"],
        ...                      label_sets={"ct": ["background", "liver"], "mr": ["background", "liver", "spleen"]})
        >>> model.class_names
        ['background', 'liver', 'spleen']
    """
    model = M4oEUNet(preset_config(preset, **overrides), modalities, label_sets)
    model.preset = preset
    model.overrides = dict(overrides)
    return model


def parameter_counts(model: M4oEUNet) -> dict[str, int]:
    """Total, expert, gate and head parameters."""
    experts = gates = 0
    for module in model.modules():
        if isinstance(module, MoEMLP):
            experts += sum(p.numel() for p in (module.w1, module.b1, module.w2, module.b2))
            gates += sum(p.numel() for p in module.gate.parameters())
            if module.modality_embed is not None:
                gates += module.modality_embed.weight.numel()
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "experts": experts,
        "gates": gates,
        "head": sum(p.numel() for p in model.head.parameters()),
    }


@torch.no_grad()
def forward_flops(model: M4oEUNet, routing: str | None = None) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on one slice, counted by PyTorch."""
    cfg = model.config
    image = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    modality = 0  # one expert for the whole batch: hard routing runs that expert alone
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(image, modality, routing=routing)
    model.train(was_training)
    return counter.get_total_flops()


def model_info(preset: str, modalities: list[str], num_classes: int = 14, **overrides: Any) -> dict[str, Any]:
    """Parameters and GFLOPs of a preset, for ``m4oe info``."""
    labels = ["background"] + [f"class_{k}" for k in range(1, num_classes)]
    model = create_model(preset, modalities=modalities, label_sets={"data": labels}, **overrides)
    info: dict[str, Any] = {
        "preset": preset,
        "modalities": modalities,
        "num_classes": num_classes,
        "img_size": model.config.img_size,
        "params": parameter_counts(model),
        "gflops_per_slice": round(forward_flops(model) / 1e9, 3),
    }
    if model.config.moe_encoder or model.config.moe_decoder:
        info["gflops_per_slice_hard_routing"] = round(forward_flops(model, routing="hard") / 1e9, 3)
    return info
