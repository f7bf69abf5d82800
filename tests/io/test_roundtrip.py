"""`save` then `load` gives back the same values, dtype kind and geometry, for every writable format."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import fixtures as fx
from medseg.errors import MedsegNotice
from medseg.io import Geometry, Image, label_path_for, load, save

OBLIQUE = Geometry(fx.NIFTI_SPACING, fx.NIFTI_ORIGIN, fx.oblique_direction())
FLIPPED = Geometry(fx.NIFTI_SPACING, fx.NIFTI_ORIGIN, fx.FLIPPED_DIRECTION)
GEOMETRY_2D = Geometry((0.5, 0.7), (3.0, -4.5), (-1.0, 0.0, 0.0, 1.0))

VOLUME_FORMATS = [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz"]
# Formats whose geometry is stored as float64 numbers (NIfTI: float32; NRRD: spacing x direction).
EXACT_GEOMETRY = {".mha", ".mhd", ".npz"}


def leftovers(folder: Path) -> list[str]:
    """Hidden or temporary entries (e.g. ``.case.x1y2.tmp``) anywhere under ``folder``."""
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def volume(dtype: type) -> np.ndarray:
    values = fx.volume_values(dtype=np.int64)
    if np.dtype(dtype).kind == "f":
        return (values + 0.25).astype(dtype)
    if np.dtype(dtype) == np.uint8:
        return (values % 256).astype(dtype)
    return values.astype(dtype)


@pytest.mark.parametrize("ext", VOLUME_FORMATS)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_volume_round_trip(tmp_path, ext, dtype):
    array = volume(dtype)
    out = save(Image(array, OBLIQUE), tmp_path / f"vol{ext}")
    assert out == tmp_path / f"vol{ext}"
    back = load(out)
    assert back.array.dtype == array.dtype
    np.testing.assert_array_equal(back.array, array)
    assert back.channels == 1
    assert back.geometry.matches(OBLIQUE), back.geometry.describe_difference(OBLIQUE)
    if ext in EXACT_GEOMETRY:
        assert back.geometry == OBLIQUE
    assert back.meta["path"] == str(out)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", [".nrrd", ".nhdr", ".mha"])
def test_axis_aligned_geometry_is_exact_in_text_headers(tmp_path, ext):
    back = load(save(Image(volume(np.int16), FLIPPED), tmp_path / f"vol{ext}"))
    assert back.geometry == FLIPPED


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_nifti_geometry_is_float32_precise(tmp_path, ext):
    back = load(save(Image(volume(np.int16), OBLIQUE), tmp_path / f"vol{ext}"))
    np.testing.assert_allclose(back.geometry.spacing, OBLIQUE.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, OBLIQUE.origin, atol=1e-5)
    np.testing.assert_allclose(back.geometry.direction, OBLIQUE.direction, atol=1e-6)


def test_detached_headers_name_their_final_data_file(tmp_path):
    save(Image(volume(np.int16), FLIPPED), tmp_path / "vol.mhd")
    save(Image(volume(np.int16), FLIPPED), tmp_path / "vol2.nhdr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.mhd", "vol.zraw", "vol2.nhdr", "vol2.raw.gz"]
    assert "ElementDataFile = vol.zraw" in (tmp_path / "vol.mhd").read_text()
    assert "vol2.raw.gz" in (tmp_path / "vol2.nhdr").read_text()
    # The pair still reads once moved elsewhere.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("vol.mhd", "vol.zraw"):
        (tmp_path / name).rename(moved / name)
    np.testing.assert_array_equal(load(moved / "vol.mhd").array, volume(np.int16))


# --------------------------------------------------------------------------------------------------
# 2D formats


def labels_2d(dtype: type, top: int) -> np.ndarray:
    values = fx.label_values((12, 20), n_labels=4).astype(np.int64)
    values[0, 0] = top
    return values.astype(dtype)


@pytest.mark.parametrize(
    ("ext", "array"),
    [
        (".png", fx.grey_values()),
        (".png", labels_2d(np.uint8, 255)),
        (".png", labels_2d(np.uint16, 1000)),  # 16-bit PNG
        (".png", labels_2d(np.uint16, 65535)),
        (".bmp", fx.grey_values()),
        (".bmp", labels_2d(np.uint8, 200)),
        (".tif", fx.grey_values()),
        (".tif", labels_2d(np.uint16, 40000)),
        (".tif", labels_2d(np.int32, 70000)),
        (".tif", fx.grey_values().astype(np.float32) / 7),
        (".npy", labels_2d(np.int64, 70000)),
        (".npy", fx.grey_values().astype(np.float64) / 7),
        (".npy", labels_2d(np.uint8, 3).astype(bool)),
        (".npz", labels_2d(np.uint16, 1000)),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v.dtype}-max{v.max()}",
)
def test_2d_round_trip(tmp_path, ext, array):
    out = save(Image(array), tmp_path / f"img{ext}")
    back = load(out)
    assert back.array.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(back.array, array)
    assert back.channels == 1
    assert back.geometry == Geometry.identity(2)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".npy", ".npz"])
def test_rgb_round_trip(tmp_path, ext):
    _, rgb = fx.write_png_rgb(tmp_path / "src.png")
    back = load(save(Image(rgb, channels=3), tmp_path / f"rgb{ext}"))
    assert back.channels == 3
    assert back.shape == (12, 20)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, rgb)


def test_tiff_stack_round_trip(tmp_path):
    array = volume(np.uint16)
    back = load(save(Image(array), tmp_path / "stack.tif"))
    assert back.shape == array.shape
    np.testing.assert_array_equal(back.array, array)


@pytest.mark.parametrize("ext", [".tif", ".png", ".npy"])
def test_formats_without_geometry_say_they_drop_it(tmp_path, ext):
    array = volume(np.uint8) if ext != ".png" else labels_2d(np.uint8, 3)
    placed = Image(array, OBLIQUE if array.ndim == 3 else GEOMETRY_2D)
    with pytest.warns(MedsegNotice, match=f"{ext[1:].upper().replace('TIF', 'TIFF')} files keep no spacing"):
        back = load(save(placed, tmp_path / f"placed{ext}"))
    np.testing.assert_array_equal(back.array, array)  # the values are written; the geometry is not
    assert back.geometry == Geometry.identity(array.ndim)


@pytest.mark.parametrize("ext", [".tif", ".png", ".npy", ".npz", ".nii.gz"])
def test_no_note_where_nothing_is_lost(tmp_path, ext):
    array = volume(np.uint8) if ext != ".png" else labels_2d(np.uint8, 3)
    geometry = OBLIQUE if ext in (".npz", ".nii.gz") else Geometry.identity(array.ndim)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedsegNotice)
        save(Image(array, geometry), tmp_path / f"kept{ext}")


@pytest.mark.parametrize("ext", [".npy", ".npz"])
def test_numpy_3d_round_trip(tmp_path, ext):
    array = volume(np.float64)
    geometry = OBLIQUE if ext == ".npz" else Geometry.identity(3)
    back = load(save(Image(array, geometry), tmp_path / f"vol{ext}"))
    assert back.array.dtype == np.float64
    np.testing.assert_array_equal(back.array, array)
    assert back.geometry == geometry


def test_npz_keeps_2d_geometry_exactly(tmp_path):
    back = load(save(Image(labels_2d(np.uint8, 3), GEOMETRY_2D), tmp_path / "l.npz"))
    assert back.geometry == GEOMETRY_2D


def test_bool_label_maps_are_written_as_uint8(tmp_path):
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2:4, 1:5] = True
    back = load(save(Image(mask, FLIPPED), tmp_path / "mask.nii.gz"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask)
    back2d = load(save(Image(mask[1]), tmp_path / "mask.png"))
    np.testing.assert_array_equal(back2d.array, mask[1])


def test_float16_volume_is_written_as_float32(tmp_path):
    array = (volume(np.float32) / 8).astype(np.float16)
    back = load(save(Image(array, FLIPPED), tmp_path / "half.nii.gz"))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, array.astype(np.float32))


def test_save_creates_folders_and_replaces_an_earlier_output(tmp_path):
    target = tmp_path / "a" / "b" / "pred.nii.gz"
    save(Image(np.zeros((3, 4, 5), np.uint8)), target)
    save(Image(np.ones((3, 4, 5), np.uint8)), target)
    assert load(target).array.max() == 1
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# A label map for an input keeps the input's geometry


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", ["flipped", "oblique"])
def test_label_for_an_input_keeps_its_geometry(tmp_path, ext, direction):
    cosines = fx.FLIPPED_DIRECTION if direction == "flipped" else fx.oblique_direction()
    src = fx.write_nifti(tmp_path / "in" / f"case_0000{ext}", direction=cosines)
    before = src.read_bytes()
    image = load(src)
    label = image.with_array((image.array % 4).astype(np.uint8))
    target = label_path_for(src, tmp_path / "out", case="case")
    assert target == tmp_path / "out" / f"case{ext}"
    back = load(save(label, target, protect=(src,)))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, label.array)
    if ext == ".nrrd" and direction == "oblique":
        # NRRD stores spacing x direction; splitting it again can differ in the last bit.
        for name in ("spacing", "origin", "direction"):
            np.testing.assert_allclose(getattr(back.geometry, name), getattr(image.geometry, name), atol=1e-12)
    else:
        assert back.geometry == image.geometry
    assert src.read_bytes() == before


def test_label_for_a_medsam_npz_keeps_its_spacing(tmp_path):
    src, arrays = fx.write_medsam_npz_3d(tmp_path / "in" / "CT_case.npz")
    image = load(src)
    gts = load(src, key="gts")
    target = save(image.with_array(gts.array), label_path_for(src, tmp_path / "out"), key="segs")
    assert target.name == "CT_case.npz"
    with np.load(target) as npz:
        assert set(npz.keys()) == {"segs", "spacing", "origin", "direction"}
        np.testing.assert_array_equal(npz["spacing"], arrays["spacing"])
    back = load(target)
    assert back.meta["npz_key"] == "segs"
    assert back.geometry == image.geometry
    np.testing.assert_array_equal(back.array, arrays["gts"])


# --------------------------------------------------------------------------------------------------
# Reading the fixture files


def test_read_medsam_npz_3d(tmp_path):
    src, arrays = fx.write_medsam_npz_3d(tmp_path / "case.npz")
    image = load(src)
    assert image.meta["npz_key"] == "imgs"
    assert image.meta["npz_keys"] == ["imgs", "gts", "spacing"]
    np.testing.assert_array_equal(image.array, arrays["imgs"])
    assert image.geometry.spacing == (0.8, 0.9, 3.0)
    assert image.spacing == (3.0, 0.9, 0.8)
    assert image.geometry.origin == (0.0, 0.0, 0.0)
    gts = load(src, key="gts")
    assert gts.is_label_map()
    np.testing.assert_array_equal(gts.array, arrays["gts"])
    assert gts.geometry == image.geometry


def test_read_medsam_npz_2d(tmp_path):
    src, arrays = fx.write_medsam_npz_2d(tmp_path / "case.npz")
    image = load(src)
    assert image.channels == 3
    assert image.shape == (12, 20)
    assert image.geometry.spacing == (0.5, 0.5)
    gts = load(src, key="gts")
    assert gts.channels == 1
    np.testing.assert_array_equal(gts.array, arrays["gts"])


def test_read_grey_png(tmp_path):
    path, grey = fx.write_png_grey(tmp_path / "g.png")
    image = load(path)
    assert (image.channels, image.array.dtype) == (1, np.uint8)
    np.testing.assert_array_equal(image.array, grey)
    assert image.meta["format"] == "png"
    assert image.geometry == Geometry.identity(2)


def test_read_rgb_and_rgba_png(tmp_path):
    path, rgb = fx.write_png_rgb(tmp_path / "c.png")
    image = load(path)
    assert image.channels == 3
    np.testing.assert_array_equal(image.array, rgb)
    path, rgb = fx.write_png_rgba(tmp_path / "ca.png")
    image = load(path)
    assert image.channels == 3  # alpha dropped
    np.testing.assert_array_equal(image.array, rgb)


def test_read_palette_png_gives_indices(tmp_path):
    path, labels = fx.write_png_palette_labels(tmp_path / "pal.png")
    image = load(path)
    assert image.meta["mode"] == "P"
    assert image.channels == 1
    assert image.is_label_map()
    np.testing.assert_array_equal(image.array, labels)
    # and writing it back as PNG keeps the indices
    back = load(save(image.with_array(image.array), tmp_path / "out" / "pal.png"))
    np.testing.assert_array_equal(back.array, labels)


def test_rgb_image_as_lossy_jpeg(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    back = load(save(Image(rgb, channels=3), tmp_path / "c.jpg"))
    assert back.channels == 3
    assert back.shape == (16, 24)
    assert np.abs(back.array.astype(int) - rgb).max() <= 3


def test_grey_photograph_saves_as_jpeg_but_label_map_does_not(tmp_path):
    from medseg.errors import MedsegError

    grey = (np.arange(100 * 120) % 256).astype(np.uint8).reshape(100, 120)
    save(Image(grey), tmp_path / "g.jpg")
    assert load(tmp_path / "g.jpg").shape == (100, 120)
    with pytest.raises(MedsegError, match="lossy"):
        save(Image((grey > 128).astype(np.uint8)), tmp_path / "m.jpg")
    rgb = np.stack([grey] * 3, axis=-1)
    with pytest.raises(MedsegError, match="GIF"):
        save(Image(rgb, channels=3), tmp_path / "c.gif")


def test_npz_key_defaults_to_medsam_names(tmp_path):
    save(Image(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)), tmp_path / "i.npz")
    save(Image(np.eye(8, dtype=np.uint8)), tmp_path / "s.npz")
    assert "imgs" in np.load(tmp_path / "i.npz") and "segs" in np.load(tmp_path / "s.npz")
