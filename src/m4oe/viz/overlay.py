"""``m4oe overlay``: image, reference and prediction through the organ centre in three planes.

Volumes are shown in the canonical (LPS) order with their physical aspect ratio: axial slices with
anterior up, coronal and sagittal slices with superior up. Each label value keeps one colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import save_figure


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    if mask.any():
        return tuple(int(round(c)) for c in np.argwhere(mask).mean(axis=0))
    return tuple(s // 2 for s in mask.shape)


def _planes(volume: np.ndarray, centre, spacing_zyx):
    z, y, x = centre
    sz, sy, sx = spacing_zyx
    return [
        ("axial", volume[z], sy / sx, False),
        ("coronal", volume[:, y, :], sz / sx, True),
        ("sagittal", volume[:, :, x], sz / sy, True),
    ]


def render_overlay(
    image: np.ndarray,
    spacing_zyx,
    labels: dict[str, np.ndarray],
    path: Path,
    title: str = "",
    label_names: dict[int, str] | None = None,
) -> Path:
    """Write a PNG grid: rows = planes, columns = image then one column per label map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    first = next(iter(labels.values()), np.zeros(image.shape, np.int64))
    centre = _centre(first > 0) if first.any() else _centre(np.zeros(image.shape, bool))
    lo, hi = np.percentile(image, [1, 99])
    max_label = max([int(m.max()) for m in labels.values()] + [1])
    colours = plt.get_cmap("tab20", 20)(np.arange(20))
    cmap = ListedColormap(np.vstack([[0, 0, 0, 0], colours[np.arange(max_label) % 20]]))
    columns = ["image", *labels]
    fig, axes = plt.subplots(3, len(columns), figsize=(3.2 * len(columns), 9.6), squeeze=False)
    image_planes = _planes(image, centre, spacing_zyx)
    label_planes = {name: _planes(m, centre, spacing_zyx) for name, m in labels.items()}
    for row, (plane, img, aspect, flip) in enumerate(image_planes):
        origin = "lower" if flip else "upper"
        for col, name in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin, interpolation="nearest")
            if name != "image":
                overlay = label_planes[name][row][1]
                masked = np.ma.masked_equal(overlay, 0)
                ax.imshow(masked, cmap=cmap, vmin=0, vmax=max_label, alpha=0.55, aspect=aspect, origin=origin,
                          interpolation="nearest")  # fmt: skip
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name)
        axes[row, 0].text(-0.05, 0.5, plane, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right")
    if label_names:
        present = sorted({int(v) for m in labels.values() for v in np.unique(m) if v})
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(v / max_label)) for v in present]
        fig.legend(handles, [label_names.get(v, str(v)) for v in present], loc="lower center",
                   ncol=min(7, max(1, len(present))), fontsize=8)  # fmt: skip
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 if label_names else 0, 1, 0.97))
    path = save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path


def overlay_files(image: Path, out: Path, gt: Path | None = None, pred: Path | None = None,
                  label_names: dict[int, str] | None = None) -> Path:  # fmt: skip
    """Read an image and its label maps (any of them optional) and render the overlay."""
    from ..data.io import read_label_map, read_volume

    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"-o {out}: give a file name ending in .png")
    volume = read_volume(image)
    labels = {}
    declared = None if label_names is None else {0, *label_names}
    for name, path in (("reference", gt), ("prediction", pred)):
        if path is not None:
            label = read_label_map(path, declared)
            if label.array.shape != volume.array.shape:
                raise ValueError(f"{path}: shape {label.array.shape} does not match image {image} {volume.array.shape}")
            # the same tolerance as evaluate: a label map placed elsewhere would be drawn on the wrong anatomy
            mismatch = volume.geometry.mismatch(label.geometry, tol=1e-3)
            if mismatch:
                raise ValueError(f"{path}: geometry differs from image {image}: {mismatch}")
            labels[name] = label.array.astype(np.int64)
    return render_overlay(volume.array, volume.spacing_zyx, labels, out, Path(image).name, label_names)
