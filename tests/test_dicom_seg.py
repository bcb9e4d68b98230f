"""DICOM-SEG: a synthetic CT series written with pydicom (files named against their z order), segmented,
the SEG read back with highdicom and compared voxel for voxel with the NIfTI label map."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from m4oe import create_model, save_bundle
from m4oe.cli import app

from .conftest import MICRO
from .test_predict import EXTRA, LABELS

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

SHAPE = (5, 24, 20)  # z, rows, columns


def write_series(folder, image):
    """A CT series: slice k at z = 40 - 3k mm, written to a file whose name sorts the other way."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k, plane in enumerate(image):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^One", "P1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261203", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImagePositionPatient = [-10.0, -12.0, 40.0 - 3.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.8], 3.0
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.save_as(folder / f"slice{len(image) - k:02d}.dcm", enforce_file_format=True)


def bundle(path):
    model = create_model("tiny", modalities=["CT"], label_sets={"phantom": LABELS}, **MICRO)
    save_bundle(model, path, extra=EXTRA)
    return path


def test_a_dicom_series_in_gives_a_seg_that_matches_the_nifti(tmp_path):
    from m4oe.infer import predict
    from m4oe.infer.files import predict_paths

    from .test_predict import threshold_model

    image = np.zeros(SHAPE, np.int16)
    image[1:4, 6:18, 4:9] = 1  # 'liver' where the threshold model sees a bright slice
    image[3, 3, 15] = 1
    write_series(tmp_path / "ct", image)
    report = predict_paths(predict.Predictor(threshold_model()), [tmp_path / "ct"], tmp_path / "out",
                           dataset="phantom", progress=False, dicom_seg=True)  # fmt: skip
    assert report.failed == []
    nifti = sitk.ReadImage(str(tmp_path / "out" / "ct.nii.gz"))
    labels = sitk.GetArrayFromImage(nifti)
    assert (labels == 6).sum() > 0  # liver's label value in this dataset
    seg = hd.seg.segread(tmp_path / "out" / "ct_seg.dcm")
    assert seg.SeriesInstanceUID != pydicom.dcmread(tmp_path / "ct" / "slice01.dcm").SeriesInstanceUID
    [segment] = seg.SegmentSequence
    assert segment.SegmentLabel == "liver"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT: liver
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    files = sorted((tmp_path / "ct").iterdir())
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    for f in files:  # each source slice: the SEG's mask against the NIfTI slice at the same position
        source = pydicom.dcmread(f)
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1], ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )[0, :, :, 0]  # fmt: skip
        z = nifti.TransformPhysicalPointToIndex([float(v) for v in source.ImagePositionPatient])[2]
        assert np.array_equal(mask.astype(bool), labels[z] == 6), f.name


def test_seg_is_refused_in_one_line_for_files_and_nothing_is_written(tmp_path):
    from .data_helpers import write_image
    from .test_predict import l_shape

    scan = write_image(tmp_path / "in" / "a_0000.nii.gz", l_shape(shape=(3, 20, 20)))
    result = CliRunner().invoke(app, ["predict", "-m", str(bundle(tmp_path / "b")), "-i", str(scan), "-o",
                                      str(tmp_path / "out"), "--dataset", "phantom", "--dicom-seg"])  # fmt: skip
    assert result.exit_code == 1 and "is not a DICOM series folder" in result.output
    assert not (tmp_path / "out").exists()


def test_every_shipped_structure_has_a_snomed_code():
    from m4oe.infer.dicom_seg import organ_codes

    shipped = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "right_adrenal_gland",
               "left_adrenal_gland", "right_ventricle", "myocardium", "left_ventricle"]  # fmt: skip
    codes = organ_codes()
    assert all(name in codes and codes[name][0].isdigit() for name in shipped)
    assert codes["liver"][:2] == ("10200004", "Liver")
