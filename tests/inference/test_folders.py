"""`medseg.inference.folders` without a model: the cases of an input, where their label maps go (checked before any
work), and `predict_folder` with a plain Python ``predict`` (a threshold) writing all or nothing."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from fixtures import write_dicom_series
from medseg.errors import MedsegError
from medseg.inference.engines import Segmentation
from medseg.inference.folders import cases_of, label_targets, predict_folder
from medseg.io import Geometry, Image, load, save, save_dicom_seg

GEOMETRY_3D = Geometry((0.8, 0.7, 2.5), (-20.0, 15.5, 40.0), (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))


def bright_square(shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
    """Zeros with a bright square (a cube in 3D) from index 2 to 6 on every axis: 200 inside."""
    array: np.ndarray = np.zeros(shape, dtype)
    array[(slice(2, 6),) * len(shape)] = 200
    return array


def threshold(image: Image) -> Segmentation:
    """A model-free engine: label 1 where the first channel is above 100; probabilities are 0 or 1."""
    pixels = image.array[..., 0] if image.channels > 1 else image.array
    labels = (pixels > 100).astype(np.uint8)
    return Segmentation(image.with_array(labels), [1], "threshold", labels[None].astype(np.float32))


def write_inputs(folder: Path) -> dict[str, Path]:
    """A PNG (2D, 12 x 12) and a NIfTI volume (5 x 8 x 9, a non-identity geometry): two cases."""
    return {
        "flat": save(Image(bright_square((12, 12))), folder / "flat.png"),
        "vol": save(Image(bright_square((5, 8, 9), np.int16), GEOMETRY_3D), folder / "vol.nii.gz"),
    }


# ---- cases_of ----------------------------------------------------------------------------------------------
def test_cases_of_a_file(tmp_path: Path) -> None:
    path = save(Image(bright_square((8, 8))), tmp_path / "ct_0000.png")
    assert cases_of(path) == {"ct": [path]}
    other = save(Image(bright_square((8, 8))), tmp_path / "scan.png")
    assert cases_of(other) == {"scan": [other]}


def test_cases_of_a_folder_groups_channels_and_takes_series_folders(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pixels = Image(bright_square((8, 8)))
    t1 = save(pixels, folder / "brain_0000.png")
    t2 = save(pixels, folder / "brain_0001.png")
    flat = save(pixels, folder / "knee.png")
    save(pixels, folder / ".hidden.png")  # hidden: not a case
    (folder / "notes.txt").write_text("not an image")
    (folder / "stray.dcm").write_bytes(b"")  # single DICOM files beside the others are not cases
    series = write_dicom_series(folder / "chest", n_slices=2, rows=6, cols=6).folder
    (folder / ".cache").mkdir()  # hidden folder: not a case
    assert cases_of(folder) == {"brain": [t1, t2], "knee": [flat], "chest": [series]}


def test_a_folder_of_dicom_files_is_one_case(tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "patient7", n_slices=2, rows=6, cols=6).folder
    assert cases_of(series) == {"patient7": [series]}


def test_cases_of_nothing(tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="no such file or folder") as caught:
        cases_of(tmp_path / "missing")
    assert caught.value.path == tmp_path / "missing"


# ---- label_targets -----------------------------------------------------------------------------------------
def test_label_targets_follow_the_inputs_format(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    series = write_dicom_series(tmp_path / "in" / "chest", n_slices=2, rows=6, cols=6).folder
    photo = tmp_path / "in" / "photo.jpg"
    save(Image(np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3), channels=3), photo)  # a photograph
    cases = {"flat": [inputs["flat"]], "vol": [inputs["vol"]], "chest": [series], "photo": [photo]}
    out = tmp_path / "out"
    assert label_targets(cases, out) == {
        "flat": out / "flat.png",
        "vol": out / "vol.nii.gz",
        "chest": out / "chest.nii.gz",  # DICOM in, NIfTI out
        "photo": out / "photo.png",  # JPEG is lossy: PNG
    }
    assert not out.exists(), "checking the targets wrote something"


def test_label_targets_refusals(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    cases = {"flat": [inputs["flat"]]}
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(MedsegError, match="exists and is not a folder"):
        label_targets(cases, a_file)
    with pytest.raises(MedsegError, match="output folder holds the inputs") as caught:
        label_targets(cases, tmp_path / "in")  # label maps among the inputs would be read as inputs next time
    assert caught.value.path == tmp_path / "in"
    support = tmp_path / "support" / "flat.png"
    with pytest.raises(MedsegError, match="refusing to overwrite an input file"):
        label_targets(cases, tmp_path / "support", protect=[support])
    # two cases whose label maps would share a name (an empty case name falls back to the file's stem)
    other = save(Image(bright_square((8, 8))), tmp_path / "elsewhere" / "flat.png")
    with pytest.raises(MedsegError, match=r"cases flat and  would both be written to flat\.png"):
        label_targets({"flat": [inputs["flat"]], "": [other]}, tmp_path / "out")
    (tmp_path / "out" / "flat.png").mkdir(parents=True)
    with pytest.raises(MedsegError, match="a folder is where its label map would go"):
        label_targets(cases, tmp_path / "out")


# ---- predict_folder ----------------------------------------------------------------------------------------
def test_predict_folder_writes_one_label_map_per_case_in_the_inputs_format_and_geometry(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    progress: list[int] = []
    written = predict_folder(threshold, cases_of(tmp_path / "in"), out, on_case=lambda: progress.append(1))
    assert written == {"flat": out / "flat.png", "vol": out / "vol.nii.gz"}
    assert sorted(p.name for p in out.iterdir()) == ["flat.png", "vol.nii.gz"]  # no staging folder left
    assert len(progress) == 2
    for case, path in written.items():
        image, labels = load(inputs[case]), load(path)
        assert labels.shape == image.shape
        assert labels.geometry.matches(image.geometry)
        assert np.array_equal(labels.array, (image.array > 100).astype(np.uint8))
    assert load(written["vol"]).geometry.matches(GEOMETRY_3D)
    assert load(written["flat"]).meta["format"] == "png" and written["flat"].read_bytes()[:4] == b"\x89PNG"
    assert not (out / "probabilities").exists()


def test_channel_files_are_stacked_by_default(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    save(Image(bright_square((8, 8))), folder / "mr_0000.png")
    save(Image(np.full((8, 8), 7, np.uint8)), folder / "mr_0001.png")
    seen: list[int] = []

    def predict(image: Image) -> Segmentation:
        seen.append(image.channels)
        return threshold(image)

    written = predict_folder(predict, cases_of(folder), tmp_path / "out")
    assert seen == [2] and list(written) == ["mr"]
    assert np.array_equal(load(written["mr"]).array, (bright_square((8, 8)) > 100).astype(np.uint8))


def test_a_refused_case_writes_nothing_and_names_its_file(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    earlier = save(Image(np.full((12, 12), 3, np.uint8)), out / "flat.png")  # an earlier run's label map
    before = earlier.read_bytes()
    calls: list[str] = []

    def predict(image: Image) -> Segmentation:
        calls.append(image.meta["path"])
        if image.ndim == 3:
            raise MedsegError("this engine takes 2D images only")  # names no file
        return threshold(image)

    with pytest.raises(MedsegError, match="this engine takes 2D images only") as caught:
        predict_folder(predict, cases_of(tmp_path / "in"), out, save_probabilities=True)
    assert caught.value.path == inputs["vol"] and "vol.nii.gz" in str(caught.value)
    assert calls == [str(inputs["flat"]), str(inputs["vol"])], "the first case was not segmented before the refusal"
    assert sorted(p.name for p in out.iterdir()) == ["flat.png"], "a partial output or staging folder was left"
    assert earlier.read_bytes() == before

    fresh = tmp_path / "fresh"
    with pytest.raises(MedsegError):
        predict_folder(predict, cases_of(tmp_path / "in"), fresh)
    assert not fresh.exists(), "an output folder made for a refused run was left behind"


def test_check_refuses_before_any_prediction(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    calls: list[Image] = []

    def check(image: Image) -> None:
        if image.ndim == 3:
            raise MedsegError("the model is 2D")

    def predict(image: Image) -> Segmentation:
        calls.append(image)
        return threshold(image)

    with pytest.raises(MedsegError, match="the model is 2D") as caught:
        predict_folder(predict, cases_of(tmp_path / "in"), tmp_path / "out", check=check)
    assert caught.value.path == inputs["vol"]
    assert calls == [] and not (tmp_path / "out").exists()


def test_save_probabilities(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"

    def two_labels(image: Image) -> Segmentation:
        result = threshold(image)
        maps = np.stack([np.full(image.shape, 0.25, np.float32), np.full(image.shape, 0.75, np.float32)])
        return Segmentation(result.labels, [1, 3], "threshold", maps)

    predict_folder(two_labels, cases_of(tmp_path / "in"), out, save_probabilities=True)
    assert sorted(p.name for p in (out / "probabilities").iterdir()) == ["flat.npz", "vol.npz"]
    with np.load(out / "probabilities" / "vol.npz") as saved:
        assert saved["probabilities"].dtype == np.float16 and saved["probabilities"].shape == (2, 5, 8, 9)
        assert np.all(saved["probabilities"][0] == 0.25) and np.all(saved["probabilities"][1] == 0.75)
        assert saved["label_values"].tolist() == [1, 3]


def test_probabilities_are_skipped_when_the_engine_gives_none(tmp_path: Path) -> None:
    write_inputs(tmp_path / "in")

    def no_maps(image: Image) -> Segmentation:
        return Segmentation(threshold(image).labels, [1], "threshold")

    predict_folder(no_maps, cases_of(tmp_path / "in"), tmp_path / "out", save_probabilities=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["flat.png", "vol.nii.gz"]


def test_a_custom_loader_and_protected_files(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    loaded: list[Sequence[Path]] = []

    def load_case(files: Sequence[Path]) -> Image:
        loaded.append(files)
        return load(files[0])

    out = tmp_path / "out"
    predict_folder(threshold, {"flat": [inputs["flat"]]}, out, load_case=load_case)
    assert loaded == [[inputs["flat"]]]
    with pytest.raises(MedsegError, match="refusing to overwrite an input file"):
        predict_folder(threshold, {"flat": [inputs["flat"]]}, out, protect=[out / "flat.png"])


def test_label_targets_by_output_format(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    series = write_dicom_series(tmp_path / "in" / "ct").folder
    cases = cases_of(tmp_path / "in")
    out = tmp_path / "out"
    assert label_targets(cases, out, output_format="nifti") == {
        "flat": out / "flat.nii.gz",
        "vol": out / "vol.nii.gz",
        "ct": out / "ct.nii.gz",
    }
    assert label_targets({"ct": [series]}, out, output_format="dicom-seg") == {"ct": out / "ct.dcm"}
    with pytest.raises(MedsegError, match="DICOM-SEG output needs a DICOM input") as info:
        label_targets(cases, out, output_format="dicom-seg")
    assert info.value.path == inputs["flat"]
    with pytest.raises(MedsegError, match="unknown output format"):
        label_targets(cases, out, output_format="dicom")


def test_predict_folder_writes_dicom_segs_all_or_nothing(tmp_path: Path) -> None:
    import pydicom

    first = write_dicom_series(tmp_path / "in" / "ct_a")
    second = write_dicom_series(tmp_path / "in" / "ct_b")
    cases = cases_of(tmp_path / "in")
    calls: list[Path] = []

    def counting(image: Image) -> Segmentation:
        calls.append(Path(image.meta["path"]))
        return threshold(image)

    # a series a SEG cannot reference is refused before any prediction, and nothing is written
    broken = pydicom.dcmread(second.files[2])
    del broken.StudyInstanceUID
    broken.save_as(second.files[2])
    with pytest.raises(MedsegError, match="no StudyInstanceUID") as info:
        predict_folder(counting, cases, tmp_path / "out", output_format="dicom-seg")
    assert info.value.path == second.files[2] and calls == [] and not (tmp_path / "out").exists()

    shutil.rmtree(second.folder)
    targets = predict_folder(counting, cases_of(tmp_path / "in"), tmp_path / "out", output_format="dicom-seg",
                             segment_names={1: "bright"}, algorithm_name="threshold")  # fmt: skip
    assert targets == {"ct_a": tmp_path / "out" / "ct_a.dcm"}
    seg, image = load(targets["ct_a"]), load(first.folder)
    np.testing.assert_array_equal(seg.array, image.array > 100)
    assert seg.geometry.matches(image.geometry) and seg.meta["segment_names"] == {1: "bright"}
    assert pydicom.dcmread(targets["ct_a"]).SegmentSequence[0].SegmentAlgorithmName == "threshold"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ct_a.dcm"]  # no staging folder left


def test_a_dicom_seg_is_not_segmented_as_an_image(tmp_path: Path) -> None:
    series = write_dicom_series(tmp_path / "ct", n_slices=3, rows=8, cols=8)
    image = load(series.folder)
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 2:5, 2:5] = 1
    seg = save_dicom_seg(image.with_array(labels), tmp_path / "in" / "seg.dcm", series.folder)
    out = tmp_path / "out"
    with pytest.raises(MedsegError, match="is a DICOM-SEG") as caught:
        predict_folder(threshold, cases_of(seg), out)
    assert caught.value.path == seg and not out.exists()


def test_cases_of_a_glob_and_of_lists_of_paths(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "in")
    save(Image(bright_square((12, 12))), tmp_path / "in" / "two_0000.png")
    save(Image(bright_square((12, 12))), tmp_path / "in" / "two_0001.png")
    assert cases_of(str(tmp_path / "in" / "*.png")) == {
        "flat": [inputs["flat"]],
        "two": [tmp_path / "in" / "two_0000.png", tmp_path / "in" / "two_0001.png"],
    }
    (tmp_path / "cases.txt").write_text(f"# two cases\nin/vol.nii.gz\n\n{inputs['flat']}\n")
    assert cases_of(tmp_path / "cases.txt") == {"vol": [tmp_path / "in" / "vol.nii.gz"], "flat": [inputs["flat"]]}
    (tmp_path / "cases.csv").write_text("id,path\n1,in/vol.nii.gz\n")
    assert cases_of(tmp_path / "cases.csv") == {"vol": [tmp_path / "in" / "vol.nii.gz"]}
    bom = b"\xef\xbb\xbf"  # issue 22: lists saved with a UTF-8 byte order mark (Excel's "CSV UTF-8", Notepad)
    (tmp_path / "bom.csv").write_bytes(bom + b"path,id\r\nin/vol.nii.gz,1\r\n")
    assert cases_of(tmp_path / "bom.csv") == {"vol": [tmp_path / "in" / "vol.nii.gz"]}
    (tmp_path / "bom.txt").write_bytes(bom + b"in/vol.nii.gz\n")
    assert cases_of(tmp_path / "bom.txt") == {"vol": [tmp_path / "in" / "vol.nii.gz"]}


def test_cases_of_refuses_a_pattern_without_match_a_missing_listed_path_and_a_case_twice(tmp_path: Path) -> None:
    write_inputs(tmp_path / "a")
    write_inputs(tmp_path / "b")
    with pytest.raises(MedsegError, match="matches no file"):
        cases_of(str(tmp_path / "*.nii.gz"))
    (tmp_path / "list.txt").write_text("a/vol.nii.gz\na/gone.png\n")
    with pytest.raises(MedsegError, match=r"gone\.png, which does not exist"):
        cases_of(tmp_path / "list.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(MedsegError, match="empty"):
        cases_of(tmp_path / "empty.txt")
    with pytest.raises(MedsegError, match="are both case flat"):
        cases_of(str(tmp_path / "*" / "flat.png"))


def test_cases_of_refuses_one_file_named_twice(tmp_path: Path) -> None:
    """Issue 22: two spellings of one file (or a link beside its target) are not two channels."""
    write_inputs(tmp_path / "a")
    (tmp_path / "list.txt").write_text("a/../a/flat.png\na/flat.png\n")
    with pytest.raises(MedsegError) as caught:
        cases_of(tmp_path / "list.txt")
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'list.txt'}: ") and "\n" not in text
    assert "a/../a/flat.png and " in text and "are one file named twice" in text and "case flat" in text
    save(Image(bright_square((12, 12))), tmp_path / "a" / "two_0000.png")
    (tmp_path / "a" / "two_0001.png").symlink_to(tmp_path / "a" / "two_0000.png")
    with pytest.raises(MedsegError, match=r"two_0000\.png and .*two_0001\.png are one file named twice"):
        cases_of(tmp_path / "a")
