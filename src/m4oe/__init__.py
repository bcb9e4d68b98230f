"""m4oe: one segmentation model across imaging modalities (M4oE, Jiang & Shen, MICCAI 2024)."""

from ._version import __version__
from .bundle import BundleError, load_bundle, save_bundle
from .model import ConvNeXtUNet, M4oEUNet, SegmentationModel, create_model

__all__ = [
    "BundleError",
    "ConvNeXtUNet",
    "M4oEUNet",
    "SegmentationModel",
    "create_model",
    "load_bundle",
    "save_bundle",
    "__version__",
]
