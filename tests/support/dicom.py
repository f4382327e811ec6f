"""Valid DICOM instances made on the fly (pydicom)."""

from __future__ import annotations

import io
import os


def make_dicom(index: int, rows: int = 64, cols: int = 64, frames: int = 1,
               patient: str = "OBJFS^TEST", study: int = 0, series: int = 0) -> bytes:
    """A valid Part-10 CT instance with random pixels; uids derive from the arguments."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = "1.2.826.0.1.3680043.8.498."
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(root, [patient, str(study), str(series),
                                                          str(index)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient
    ds.PatientID = patient.replace("^", "")
    ds.StudyInstanceUID = generate_uid(root, [patient, str(study)])
    ds.SeriesInstanceUID = generate_uid(root, [patient, str(study), str(series)])
    ds.StudyDescription = f"study {study}"
    ds.Modality = "CT"
    ds.InstanceNumber = index
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = os.urandom(rows * cols * 2 * frames)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
