"""Small synthetic nnU-Net datasets written with SimpleITK, for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), direction=None, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    image.SetOrigin(origin[: image.GetDimension()])
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def phantom(seed: int, shape=(6, 24, 20)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 10, shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:5, 4:12, 3:10] = 1
    label[2:4, 14:20, 12:18] = 2
    image[label == 1] += 80
    image[label == 2] += 40
    return image, label


def make_dataset(root: Path, n: int = 3, modality: str = "CT", labels=LABELS) -> Path:
    """A clean nnU-Net v2 raw dataset with ``n`` cases named case_000 ..."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {"channel_names": {"0": modality}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    for i in range(n):
        image, label = phantom(i)
        write_image(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", image)
        write_image(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    return root


def write_config(path: Path, datasets: list[dict], **top) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"datasets": datasets, **top}))
    return path
