"""Image IO through SimpleITK: NIfTI, NRRD, MHA and DICOM series in, NIfTI (or any ITK format) out.

Volumes are handled as numpy arrays in ``[z, y, x]`` order together with their :class:`Geometry`
(spacing, origin, direction), so a prediction can be written back with exactly the input's geometry.
:func:`read_volume` reorients a volume to a fixed axis order (``LPS``) so that slices of datasets
stored in different orientations look alike; :func:`from_canonical` undoes it exactly.

SimpleITK is imported inside the functions: training and benchmarks never need it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
CANONICAL = "LPS"


class ImageReadError(RuntimeError):
    """A file or DICOM series could not be read as a 3D image."""


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume: ITK spacing/origin ``(x, y, z)`` and row-major direction."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image) -> Geometry:
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply(self, image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def to_dict(self) -> dict[str, list[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Geometry:
        return cls(tuple(values["spacing"]), tuple(values["origin"]), tuple(values["direction"]))

    def orthonormal(self, tol: float = 1e-6) -> bool:
        """Whether the direction is a rotation/reflection (what NIfTI can store exactly)."""
        n = int(round(len(self.direction) ** 0.5))
        d = np.asarray(self.direction, dtype=float).reshape(n, n)
        return bool(np.allclose(d @ d.T, np.eye(n), atol=tol))

    def mismatch(self, other: Geometry, tol: float = 1e-4) -> str | None:
        """Describe how ``other`` differs (spacing, origin or direction), or None if it matches."""
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            scale = 1.0 if name == "direction" else max(1.0, float(np.abs(a).max(initial=0.0)))
            if a.shape != b.shape or np.abs(a - b).max(initial=0.0) > tol * scale:
                return f"{name} {tuple(np.round(a, 5).tolist())} vs {tuple(np.round(b, 5).tolist())}"
        return None


def read_sitk(path: str | os.PathLike):
    """Read a file, or a folder holding one DICOM series, as a SimpleITK image."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageReadError(f"{path}: folder holds no DICOM series")
            if len(series) > 1:
                raise ImageReadError(f"{path}: folder holds {len(series)} DICOM series; give one series per folder")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        if not path.is_file():
            raise ImageReadError(f"{path}: file not found")
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        if isinstance(err, ImageReadError):
            raise
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "rror" in line or "annot" in line), first[0] if first else "")
        raise ImageReadError(f"{path}: unreadable or truncated image ({reason.strip()[:200]})") from err


def check_file(path: str | os.PathLike) -> list[str]:
    """Problems SimpleITK does not report: truncated NIfTI data and NaN/Inf voxels in NIfTI files.

    ITK's NIfTI reader fills missing bytes of a truncated file with garbage and turns non-finite
    voxels into 0, so NIfTI files are also read with nibabel, which does neither.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return []
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        return [f"{path}: unreadable or truncated image ({str(err).splitlines()[0][:200]})"]
    if np.issubdtype(data.dtype, np.floating):
        bad = int((~np.isfinite(data)).sum())
        if bad:
            return [f"{path}: {bad} NaN/Inf voxels"]
    return []


def negative_voxel_sizes(path: str | os.PathLike) -> list[float] | None:
    """The header's ``pixdim[1:4]`` of a NIfTI file when any is negative, else None.

    The standard says voxel sizes are positive; ITK reads a negative one as a mirrored axis, nibabel
    (and the viewers built on it) as its absolute value, so the two disagree on the orientation.
    """
    path = Path(path)
    if not path.is_file() or not path.name.lower().endswith((".nii", ".nii.gz")):
        return None
    try:
        raw = _raw_header(path)
    except (OSError, EOFError, zlib.error):  # an unreadable file is reported by check_file
        return None
    if raw is None:
        return None
    sizes = [round(float(v), 6) for v in np.frombuffer(raw[80:92], dtype=_header_dtype(raw) + "f4")]
    return sizes if min(sizes) < 0 else None


def _raw_header(path: Path) -> bytes | None:
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read(348)
    return raw if len(raw) == 348 else None


def _header_dtype(raw: bytes) -> str:
    """Byte order of a NIfTI-1 header: its first field, sizeof_hdr, is 348."""
    return "<" if int.from_bytes(raw[:4], "little") == 348 else ">"


def write_like_nifti(array_zyx: np.ndarray, source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write ``array_zyx`` (the source file's own voxel order, as SimpleITK reads it) as a NIfTI file
    whose header is the source's, byte for byte in its geometry fields (negative voxel sizes
    included), so that every reader places it exactly as it places the source."""
    import gzip

    import nibabel as nib

    source = Path(source)
    with nib.imageglobals.LoggingOutputSuppressor():  # its note that it makes the pixdims positive
        header = nib.load(str(source)).header.copy()
    header.set_data_dtype(array_zyx.dtype)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), None, header=header)
    data = bytearray(image.to_bytes())
    data[80:92] = _raw_header(source)[80:92]  # the signed voxel sizes as the source wrote them
    if str(path).lower().endswith(".gz"):
        data = gzip.compress(bytes(data), compresslevel=6)
    return atomic_write(path, lambda tmp: tmp.write_bytes(bytes(data)))


def read_label_map(path: str | os.PathLike, declared: set[int] | None = None, canonical: bool = True) -> "Volume":
    """Read a label map, refusing what would silently give wrong scores: a truncated or NaN NIfTI,
    non-integer values (a float probability map), and values outside ``declared`` (when given)."""
    problems = check_file(path)
    if problems:
        raise ImageReadError(problems[0])
    volume = read_volume(path, canonical=canonical)
    array = volume.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise ImageReadError(f"{path}: not a label map (non-integer values); give integer class labels")
        volume.array = array.astype(np.int64)
    if declared is not None:
        undeclared = sorted(set(np.unique(volume.array).tolist()) - set(declared))
        if undeclared:
            raise ImageReadError(
                f"{path}: label values {undeclared[:10]} are not declared in dataset.json "
                f"(declared: {sorted(declared)})"
            )
    return volume


@dataclass
class Volume:
    """A volume read for processing: ``array`` in ``[z, y, x]`` canonical (``LPS``) order.

    ``geometry`` and ``orientation`` are the file's own, to write results back exactly;
    ``spacing_zyx`` is the voxel size along the canonical array axes.
    """

    array: np.ndarray
    geometry: Geometry
    orientation: str
    spacing_zyx: tuple[float, float, float]
    source: Path | None = None  # the file it was read from (None: a DICOM series or an array)


def read_volume(path: str | os.PathLike, canonical: bool = True) -> Volume:
    """Read a single-channel 3D volume; with ``canonical`` reorient it to ``LPS`` axis order."""
    import SimpleITK as sitk

    image = read_sitk(path)
    if image.GetDimension() != 3:
        raise ImageReadError(f"{path}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"{path}: expected one channel, got {image.GetNumberOfComponentsPerPixel()}")
    geometry = Geometry.of(image)
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if canonical and orientation != CANONICAL:
        image = sitk.DICOMOrient(image, CANONICAL)
    spacing = image.GetSpacing()
    source = Path(path) if Path(path).is_file() else None
    return Volume(sitk.GetArrayFromImage(image), geometry, orientation, (spacing[2], spacing[1], spacing[0]), source)


def flip_in_plane(array: np.ndarray, axes: list[str] | tuple[str, ...]) -> np.ndarray:
    """``array [..., y, x]`` (canonical order) reversed along the named in-plane axes (``x``, ``y``);
    its own inverse. Returns ``array`` itself when ``axes`` is empty."""
    if not axes:
        return array
    dims = tuple({"x": -1, "y": -2}[a] for a in axes)
    return np.ascontiguousarray(np.flip(array, dims))


def from_canonical(array: np.ndarray, geometry: Geometry, orientation: str):
    """Undo the reorientation of :func:`read_volume`: an ``LPS``-order array as an image with ``geometry``."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if orientation != CANONICAL:
        # Build the canonical placement of the original grid, then reorient back to it.
        reference = sitk.Image([1, 1, 1], sitk.sitkUInt8)
        geometry.apply(reference)
        canon = sitk.DICOMOrient(reference, CANONICAL)
        image.SetDirection(canon.GetDirection())
        image = sitk.DICOMOrient(image, orientation)
    geometry.apply(image)
    return image


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, orientation: str = CANONICAL) -> Path:
    """Write an ``[z, y, x]`` array (canonical order unless ``orientation`` says otherwise) atomically."""
    return write_image(from_canonical(array, geometry, orientation), path)


def write_image(image, path: str | os.PathLike) -> Path:
    """Write a SimpleITK image atomically, compressed."""
    import SimpleITK as sitk

    return atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def strip_image_suffix(name: str) -> str:
    """A file name without its image suffix (the longest of :data:`IMAGE_SUFFIXES` it ends with)."""
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
