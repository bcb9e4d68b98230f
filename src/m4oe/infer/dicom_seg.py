"""DICOM-SEG output (``predict --dicom-seg``): for a DICOM series in, a DICOM Segmentation object
(highdicom) that references the source series, one segment per structure found, each with its label
and a SNOMED CT concept from ``organ_codes.csv`` (a structure it does not list is coded as an
anatomical structure, its label saying which). Left and right organs carry the organ's code; the
segment label names the side.

Needs the ``dicom`` extra: ``pip install "m4oe[dicom]"`` (highdicom, pydicom).
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from .._version import __version__
from .predict import PredictError


def _require():
    try:
        import highdicom
        import pydicom
    except ImportError as err:
        missing = f"--dicom-seg needs the dicom extra ({err.name} is missing)"
        raise PredictError(f'{missing}: pip install "m4oe[dicom]"') from None
    return highdicom, pydicom


@cache
def organ_codes() -> dict[str, tuple[str, str, str]]:
    """Structure name -> (SNOMED CT code, meaning, category ``organ`` or ``structure``)."""
    text = resources.files("m4oe.infer").joinpath("organ_codes.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return {row["name"]: (row["sct_code"], row["meaning"], row["category"]) for row in rows}


def series_files(folder: Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, in the order SimpleITK stacks them (the
    label map's z order)."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise PredictError(f"{folder}: --dicom-seg needs a folder holding one DICOM series, found {len(ids)}")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def check_inputs(inputs: list[Path]) -> None:
    """Refuse, before any work, inputs that are not DICOM series (a SEG references its source series)."""
    _require()
    others = [p for p in inputs if not p.is_dir()]
    if others:
        raise PredictError(f"--dicom-seg: {others[0]} is not a DICOM series folder; a DICOM-SEG references the "
                           "series it segments (give DICOM series, or leave out --dicom-seg)")  # fmt: skip


def write_dicom_seg(folder: Path, labels: np.ndarray, classes: dict[int, str], path: Path,
                    model_name: str = "m4oe") -> Path | None:  # fmt: skip
    """Write the SEG of ``labels`` (``[z, y, x]`` in the series' stacking order, label values) for the
    series in ``folder`` to ``path``; ``None`` (nothing written) when no structure was found."""
    hd, pydicom = _require()
    from pydicom.sr.codedict import codes

    from ..files import atomic_write

    files = series_files(folder)
    if labels.shape[0] != len(files):
        raise PredictError(f"{folder}: {len(files)} DICOM files but a label map of {labels.shape[0]} slices")
    sources = [pydicom.dcmread(f) for f in files]
    present = [v for v in classes if v != 0 and np.any(labels == v)]
    if not present:
        return None
    segments = np.zeros(labels.shape, np.uint8)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(name="m4oe", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)  # fmt: skip
    for number, value in enumerate(present, start=1):
        segments[labels == value] = number
        name = classes[value]
        code, meaning, category = organ_codes().get(name, ("91723000", "Anatomical structure", "structure"))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.Organ if category == "organ" else codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        ))  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=segments, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="m4oe", manufacturer_model_name=model_name[:64],
        software_versions=__version__, device_serial_number="none", series_description="m4oe segmentation",
    )  # fmt: skip
    return atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
