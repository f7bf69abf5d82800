"""Medical image I/O: `load` / `save` for NIfTI, NRRD, MHA/MHD, DICOM series and DICOM-SEG, PNG-like, NPY/NPZ, MRC."""

from medseg.io.api import load, save
from medseg.io.dicom_seg import read_dicom_seg, save_dicom_seg
from medseg.io.formats import SUPPORTED_EXTENSIONS, case_of, format_of, label_path_for, split_extension
from medseg.io.image import Geometry, Image, as_label_array

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "Geometry",
    "Image",
    "as_label_array",
    "case_of",
    "format_of",
    "label_path_for",
    "load",
    "read_dicom_seg",
    "save",
    "save_dicom_seg",
    "split_extension",
]
