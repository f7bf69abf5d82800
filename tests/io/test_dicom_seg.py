"""DICOM-SEG: label maps written as Segmentations that reference their DICOM series, read back by medseg and by
highdicom; series in several geometries (axial, oblique, shuffled and non-contiguous instance numbers, one
slice); the bad inputs (one line naming the file, nothing written)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import fixtures as fx
from medseg.errors import MedsegError
from medseg.io import Geometry, Image, load, save, save_dicom_seg
from medseg.io.dicom_seg import segment_labels
from medseg.io.dicom_source import SEGMENTATION_SOP_CLASSES, read_source

SHAPE = (8, 32, 32)  # slices, rows, columns


def oblique_orientation(a: float = 0.4, b: float = 0.25) -> tuple[float, ...]:
    """ImageOrientationPatient rotated about z by ``a`` and tilted about the row axis by ``b`` (orthonormal)."""
    row = (math.cos(a), math.sin(a), 0.0)
    column = (-math.sin(a) * math.cos(b), math.cos(a) * math.cos(b), math.sin(b))
    return row + column


GEOMETRIES = {
    "axial": {},
    "oblique": {"orientation": oblique_orientation(), "pixel_spacing": (0.8, 0.65), "slice_step": 3.0},
    # instance numbers neither contiguous nor in position order, files written shuffled
    "shuffled": {"instance_numbers": [40, 7, 13, 2, 99, 5, 61, 30], "write_order": [5, 2, 7, 0, 3, 1, 6, 4]},
    "descending": {"slice_step": -2.0},
}


def write_series(folder: Path, kind: str = "axial", **options: object) -> fx.DicomSeries:
    settings = {"n_slices": SHAPE[0], "rows": SHAPE[1], "cols": SHAPE[2], **GEOMETRIES[kind], **options}
    return fx.write_dicom_series(folder, **settings)  # type: ignore[arg-type]


def two_labels(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """Label 1 a block on slices 1-3, label 2 a patch on slice 5; slices 0 and 7 empty."""
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 5:12, 6:15] = 1
    labels[5, 20:26, 3:9] = 2
    return labels


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> fx.DicomSeries:
    return write_series(tmp_path_factory.mktemp("seg") / "ct")


@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_written_seg_reads_back_on_the_series_grid(tmp_path: Path, kind: str) -> None:
    series = write_series(tmp_path / "ct", kind)
    image = load(series.folder)
    labels = two_labels()
    written = save_dicom_seg(image.with_array(labels), tmp_path / "out" / "ct.dcm", series.folder,
                             segment_names={1: "liver", 2: "tumour"})  # fmt: skip
    assert written == tmp_path / "out" / "ct.dcm"
    assert [p.name for p in written.parent.iterdir()] == ["ct.dcm"]  # no temporary file left
    back = load(written)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    assert back.geometry.matches(image.geometry), back.geometry.describe_difference(image.geometry)
    assert back.meta["format"] == "dicom-seg"
    assert back.meta["segment_names"] == {1: "liver", 2: "tumour"}
    assert back.meta["referenced_series_instance_uid"] == series.series_uid


@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_highdicom_reads_each_frame_on_the_instance_at_its_position(tmp_path: Path, kind: str) -> None:
    series = write_series(tmp_path / "ct", kind)
    labels = two_labels()
    written = save_dicom_seg(load(series.folder).with_array(labels), tmp_path / "ct.dcm", series.folder)
    seg = hd.seg.segread(written)
    # series.files[k] is the k-th slice along +normal, which is label-map slice k (descending: the reverse)
    order = list(reversed(series.files)) if kind == "descending" else series.files
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in order]
    for k, ds in enumerate(headers):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ds.SOPInstanceUID], segment_numbers=[1, 2], combine_segments=True
        )
        np.testing.assert_array_equal(pixels[0], labels[k], err_msg=f"slice {k}")
    # every frame sits where the instance it references does
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in headers}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(positions[uid], abs=1e-4)
    assert seg.NumberOfFrames == SHAPE[0] * 2  # empty frames kept: the SEG covers the whole grid
    volume = seg.get_volume(combine_segments=True)
    assert volume.spatial_shape == SHAPE
    assert sorted(np.unique(volume.array).tolist()) == [0, 1, 2]


def test_seg_attributes(axial: fx.DicomSeries, tmp_path: Path) -> None:
    written = save_dicom_seg(load(axial.folder).with_array(two_labels()), tmp_path / "s.dcm", axial.folder,
                             segment_names=["liver", "tumour"], algorithm_type="AUTOMATIC",
                             algorithm_name="medseg test")  # fmt: skip
    seg = pydicom.dcmread(written)
    source = pydicom.dcmread(axial.files[0])
    assert seg.Modality == "SEG" and seg.SOPClassUID in SEGMENTATION_SOP_CLASSES
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.PatientID == source.PatientID and seg.PatientName == source.PatientName
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == axial.series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in axial.files}
    assert seg.Manufacturer == "medseg" and seg.SoftwareVersions
    segments = seg.SegmentSequence
    assert [s.SegmentNumber for s in segments] == [1, 2]
    assert [s.SegmentLabel for s in segments] == ["liver", "tumour"]
    assert {s.SegmentAlgorithmType for s in segments} == {"AUTOMATIC"}
    assert segments[0].SegmentAlgorithmName == "medseg test"
    category = segments[0].SegmentedPropertyCategoryCodeSequence[0]
    kind = segments[0].SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeMeaning) == ("SCT", "Tissue")
    assert (kind.CodingSchemeDesignator, kind.CodeMeaning) == ("SCT", "Organ")
    manual = save_dicom_seg(load(axial.folder).with_array(two_labels()), tmp_path / "m.dcm", axial.folder,
                            algorithm_type="MANUAL")  # fmt: skip
    assert [s.SegmentLabel for s in pydicom.dcmread(manual).SegmentSequence] == ["label 1", "label 2"]
    assert pydicom.dcmread(manual).SegmentSequence[0].SegmentAlgorithmType == "MANUAL"


def test_save_writes_seg_for_a_label_made_on_a_series(axial: fx.DicomSeries, tmp_path: Path) -> None:
    image = load(axial.folder)
    assert image.meta["dicom_source"] == str(axial.folder)
    label = image.with_array(two_labels())
    assert "path" not in label.meta and label.meta["dicom_source"] == str(axial.folder)
    written = save(label, tmp_path / "via_save.dcm")
    np.testing.assert_array_equal(load(written).array, two_labels())
    # without a known series (a label map from elsewhere) .dcm stays refused
    with pytest.raises(MedsegError, match="DICOM-SEG of a label map made on a DICOM series"):
        save(Image(two_labels(), image.geometry), tmp_path / "orphan.dcm")
    with pytest.raises(MedsegError, match="DICOM"):  # the CT itself is no label map
        save(image, tmp_path / "ct.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["via_save.dcm"]


def test_empty_label_maps_write_valid_segs(axial: fx.DicomSeries, tmp_path: Path) -> None:
    image = load(axial.folder)
    empty = image.with_array(np.zeros(SHAPE, np.uint8))
    plain = save_dicom_seg(empty, tmp_path / "plain.dcm", axial.folder)
    named = save_dicom_seg(empty, tmp_path / "named.dcm", axial.folder, segment_names={1: "liver", 2: "tumour"})
    assert [s.SegmentLabel for s in pydicom.dcmread(plain).SegmentSequence] == ["label 1"]
    assert [s.SegmentLabel for s in pydicom.dcmread(named).SegmentSequence] == ["liver", "tumour"]
    for path in (plain, named):
        back = load(path)
        assert back.shape == SHAPE and not back.array.any()
        assert back.geometry.matches(image.geometry)


def test_segment_labels() -> None:
    assert segment_labels([1, 2], None) == ["label 1", "label 2"]
    assert segment_labels([], None) == ["label 1"]
    assert segment_labels([1], {0: "background", 1: "liver", 3: "vessel"}) == ["liver", "label 2", "vessel"]
    assert segment_labels([1], ["liver", "tumour"]) == ["liver", "tumour"]
    assert segment_labels([1], {}) == ["label 1"]
    assert segment_labels([1], ["x" * 80]) == ["x" * 64]
    with pytest.raises(MedsegError, match="label value 3 has no segment name"):
        segment_labels([1, 3], ["liver", "tumour"])
    with pytest.raises(MedsegError, match="label value 2 has no segment name"):
        segment_labels([2], {1: "liver", 3: "vessel"})


def test_one_slice_series_gives_a_2d_seg(tmp_path: Path) -> None:
    series = write_series(tmp_path / "one", n_slices=1, write_order=[0], suffix=".dcm")
    image = load(series.folder)
    assert image.ndim == 2
    labels = two_labels()[1]
    back = load(save_dicom_seg(image.with_array(labels), tmp_path / "one.dcm", series.folder))
    assert back.ndim == 2
    np.testing.assert_array_equal(back.array, labels)
    assert back.geometry.matches(image.geometry), back.geometry.describe_difference(image.geometry)
    # a single DICOM file is a source too
    single = load(series.files[0])
    back = load(save_dicom_seg(single.with_array(labels), tmp_path / "file.dcm", series.files[0]))
    np.testing.assert_array_equal(back.array, labels)


def test_a_folder_holding_only_a_seg_loads_it(axial: fx.DicomSeries, tmp_path: Path) -> None:
    written = save_dicom_seg(load(axial.folder).with_array(two_labels()), tmp_path / "only" / "x.dcm", axial.folder)
    np.testing.assert_array_equal(load(written.parent).array, two_labels())


def test_a_seg_beside_its_series_is_a_clear_error(tmp_path: Path) -> None:
    series = write_series(tmp_path / "ct")
    label = load(series.folder).with_array(two_labels())
    shutil.copy(save_dicom_seg(label, tmp_path / "x.dcm", series.folder), series.folder / "seg.dcm")
    with pytest.raises(MedsegError, match=r"DICOM-SEG \(seg.dcm\) beside image slices") as info:
        load(series.folder)
    assert str(info.value).startswith(str(series.folder)) and "\n" not in str(info.value)


def test_a_seg_of_nonempty_frames_only_reads_on_its_own_grid(axial: fx.DicomSeries, tmp_path: Path) -> None:
    """A SEG from elsewhere (highdicom's default leaves out empty frames) covers slices 1-5 only."""
    image = load(axial.folder)
    headers = _headers(axial)
    code = pydicom.sr.codedict.codes.SCT
    descriptions = [hd.seg.SegmentDescription(n, f"s{n}", code.Tissue, code.Organ, "MANUAL") for n in (1, 2)]
    seg = hd.seg.Segmentation(headers, two_labels(), "BINARY", descriptions, hd.UID(), 5, hd.UID(), 1, "other",
                              "other", "1", "1")  # fmt: skip
    seg.save_as(tmp_path / "other.dcm")
    back = load(tmp_path / "other.dcm")
    np.testing.assert_array_equal(back.array, two_labels()[1:6])
    assert back.geometry.spacing == pytest.approx(image.geometry.spacing)
    assert back.geometry.origin == pytest.approx(axial.positions[1])
    assert back.meta["segment_names"] == {1: "s1", 2: "s2"}


def test_overlapping_segments_are_refused(axial: fx.DicomSeries, tmp_path: Path) -> None:
    headers = _headers(axial)
    stacked = np.zeros((*SHAPE, 2), np.uint8)
    stacked[2, 4:10, 4:10, 0] = stacked[2, 6:12, 6:12, 1] = 1
    code = pydicom.sr.codedict.codes.SCT
    descriptions = [hd.seg.SegmentDescription(n, f"s{n}", code.Tissue, code.Organ, "MANUAL") for n in (1, 2)]
    seg = hd.seg.Segmentation(headers, stacked, "BINARY", descriptions, hd.UID(), 5, hd.UID(), 1, "other",
                              "other", "1", "1")  # fmt: skip
    seg.save_as(tmp_path / "overlap.dcm")
    with pytest.raises(MedsegError, match="cannot read DICOM-SEG as a label map") as info:
        load(tmp_path / "overlap.dcm")
    assert str(info.value).startswith(str(tmp_path / "overlap.dcm")) and "\n" not in str(info.value)


# ---- bad input: one line naming the file, nothing written ------------------------------------------------------
@pytest.mark.parametrize(
    "attribute", ["SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient"]
)
def test_a_source_without_an_attribute_a_seg_needs(tmp_path: Path, attribute: str) -> None:
    series = write_series(tmp_path / "ct")
    label = load(series.folder).with_array(two_labels())
    ds = pydicom.dcmread(series.files[3])
    delattr(ds, attribute)
    ds.save_as(series.files[3])
    out = tmp_path / "out"
    with pytest.raises(MedsegError, match=f"no {attribute}: a DICOM-SEG needs it") as info:
        save_dicom_seg(label, out / "x.dcm", series.folder)
    assert str(info.value).startswith(str(series.files[3])) and "\n" not in str(info.value)
    assert not out.exists()


def _headers(series: fx.DicomSeries) -> list[pydicom.Dataset]:
    """The series' headers in slice order, with the Type 2 attributes highdicom copies (the fixture has not all)."""
    headers = [pydicom.dcmread(f) for f in series.files]
    for ds in headers:
        ds.PatientBirthDate = ds.PatientSex = ds.AccessionNumber = ds.StudyID = ds.StudyTime = ""
    return headers


def _moved(geometry: Geometry, **change: tuple[float, ...]) -> Geometry:
    return Geometry(**{"spacing": geometry.spacing, "origin": geometry.origin, "direction": geometry.direction,
                       **change})  # fmt: skip


def test_a_label_map_off_the_series_grid(axial: fx.DicomSeries, tmp_path: Path) -> None:
    image = load(axial.folder)
    g = image.geometry
    flipped = tuple((np.asarray(g.direction).reshape(3, 3) @ np.diag([-1.0, 1.0, 1.0])).ravel().tolist())
    cases = [
        (Image(two_labels()[:-1], g), r"shape \(7, 32, 32\) does not fit"),
        (Image(two_labels(), _moved(g, spacing=(0.6, 0.7, 3.0))), "grid differs from the DICOM series .*: spacing"),
        (Image(two_labels(), _moved(g, origin=(-39.0, -35.5, 112.0))), "origin"),
        (Image(two_labels(), _moved(g, direction=flipped)), "direction"),
        (Image(two_labels()[0], Geometry((0.6, 0.7), g.origin[:2], (1.0, 0.0, 0.0, 1.0))), "2D label map"),
    ]
    for label, fragment in cases:
        with pytest.raises(MedsegError, match=fragment):
            save_dicom_seg(label, tmp_path / "x.dcm", axial.folder)
    assert list(tmp_path.iterdir()) == []


def test_bad_label_maps_and_targets(axial: fx.DicomSeries, tmp_path: Path) -> None:
    image = load(axial.folder)
    label = image.with_array(two_labels())
    half = image.with_array(two_labels() * 0.5)
    rgb = Image(np.zeros((*SHAPE, 3), np.uint8), image.geometry, channels=3)
    cases = [
        (label, tmp_path / "x.dcm", {"segment_names": ["liver"]}, "label value 2 has no segment name"),
        (half, tmp_path / "x.dcm", {}, "non-integer values"),
        (rgb, tmp_path / "x.dcm", {}, "one channel"),
        (label, tmp_path / "x.dcm", {"algorithm_type": "GUESSED"}, "algorithm type"),
        (label, tmp_path / "x.nii.gz", {}, "written to a .dcm file"),
        (label, axial.files[0], {}, "overwrite an input"),
        (label, axial.folder / "seg.dcm", {}, "into the source series folder"),
        (label, tmp_path / "x.dcm", {"source": tmp_path / "nowhere"}, "no such DICOM series"),
    ]
    for image_, target, options, fragment in cases:
        source = options.pop("source", axial.folder)
        with pytest.raises(MedsegError, match=fragment) as info:
            save_dicom_seg(image_, target, source, **options)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    assert sorted(axial.folder.iterdir()) == sorted(axial.files)


def test_a_folder_of_two_series_is_no_source(tmp_path: Path) -> None:
    series = write_series(tmp_path / "ct")
    label = load(series.folder).with_array(two_labels())
    write_series(tmp_path / "ct", name_prefix="B")  # a second series in the same folder
    with pytest.raises(MedsegError, match="2 DICOM series"):
        save_dicom_seg(label, tmp_path / "x.dcm", series.folder)


def test_read_source_sorts_by_position_not_instance_number(tmp_path: Path) -> None:
    series = write_series(tmp_path / "ct", "shuffled")
    source = read_source(series.folder)
    assert list(source.files) == series.files
    assert source.shape == SHAPE
    assert source.geometry.matches(load(series.folder).geometry)
