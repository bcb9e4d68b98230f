"""Named model presets, ``create_model`` and model statistics (parameters, FLOPs)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import PRESETS, ModelConfig, preset_config
from .base import SegmentationModel
from .convnext_unet import ConvNeXtUNet
from .moe import MoEMLP
from .swin_unet import M4oEUNet

__all__ = ["PRESETS", "build_model", "create_model", "forward_flops", "model_info", "parameter_counts", "preset_config"]

BACKBONES: dict[str, type[SegmentationModel]] = {"swin": M4oEUNet, "convnext": ConvNeXtUNet}


def build_model(config: ModelConfig, modalities: list[str], label_sets: dict[str, list[str]]) -> SegmentationModel:
    """The model of ``config.arch`` (Swin-UNet or ConvNeXt U-Net) for these modalities and label sets."""
    return BACKBONES[config.arch](config, modalities, label_sets)


def create_model(
    preset: str,
    *,
    modalities: list[str],
    label_sets: dict[str, list[str]],
    **overrides: Any,
) -> SegmentationModel:
    """Build an M4oE model (or a dense baseline) from a named preset.

    Args:
        preset: a name in :data:`m4oe.config.PRESETS` (``m4oe-t``, ``m4oe-convnext-s``, ...).
        modalities: modality names, one expert each (e.g. ``["CT", "MRI"]``).
        label_sets: dataset name -> class names, background first.
        overrides: any :class:`~m4oe.config.ModelConfig` field (e.g. ``img_size=256, window_size=8``).

    Example:
        >>> model = create_model("tiny", modalities=["CT", "MRI"],
        ...                      label_sets={"ct": ["background", "liver"], "mr": ["background", "liver", "spleen"]})
        >>> model.class_names
        ['background', 'liver', 'spleen']
    """
    model = build_model(preset_config(preset, **overrides), modalities, label_sets)
    model.preset = preset
    model.overrides = dict(overrides)
    return model


def parameter_counts(model: SegmentationModel) -> dict[str, int]:
    """Total, expert (a shared expert included), gate and head parameters."""
    experts = gates = 0
    for module in model.modules():
        if isinstance(module, MoEMLP):
            experts += sum(p.numel() for p in (module.w1, module.b1, module.w2, module.b2))
            if module.shared is not None:
                experts += sum(p.numel() for p in module.shared.parameters())
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
def forward_flops(model: SegmentationModel, routing: str | None = None) -> int:
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
