"""Models: the M4oE Swin-UNet and ConvNeXt U-Net, their layers and presets."""

from .base import SegmentationModel
from .convnext_unet import ConvNeXtUNet
from .dense_init import init_from_dense
from .moe import DenseMLP, MoEMLP
from .presets import PRESETS, create_model, forward_flops, model_info, parameter_counts
from .swin_unet import M4oEUNet

__all__ = [
    "PRESETS",
    "ConvNeXtUNet",
    "SegmentationModel",
    "DenseMLP",
    "M4oEUNet",
    "MoEMLP",
    "create_model",
    "forward_flops",
    "init_from_dense",
    "model_info",
    "parameter_counts",
]
