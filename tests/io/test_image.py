"""`Geometry` and `Image`: affine, orientation codes, spacing order, validation, `as_label_array`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

import fixtures as fx
from medseg.errors import MedsegError
from medseg.io import Geometry, Image, as_label_array, load

IDENTITY_3D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def one_line(err: pytest.ExceptionInfo[MedsegError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------------
# Geometry


def test_identity_geometry():
    g = Geometry.identity(3)
    assert g.spacing == (1.0, 1.0, 1.0)
    assert g.origin == (0.0, 0.0, 0.0)
    assert g.direction == IDENTITY_3D
    assert g.ndim == 3
    assert Geometry.identity(2).direction == (1.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(g.direction_matrix(), np.eye(3))


def test_affine_maps_numpy_index_to_lps_point_for_a_flipped_volume():
    # x flipped: ITK index i runs to patient right; spacing (sx, sy, sz) = (0.75, 0.8, 2.5).
    g = Geometry((0.75, 0.8, 2.5), (-12.5, 30.25, 41.0), fx.FLIPPED_DIRECTION)
    affine = g.affine()
    assert affine.shape == (4, 4)
    z, y, x = 2, 3, 4
    by_hand = (-12.5 - 0.75 * x, 30.25 + 0.8 * y, 41.0 + 2.5 * z)
    np.testing.assert_allclose(affine @ [z, y, x, 1], [*by_hand, 1.0])
    # The origin is the point of index (0, 0, 0); the last row is homogeneous.
    np.testing.assert_allclose(affine[:3, 3], g.origin)
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])
    # Columns are numpy axes z, y, x: one step in z moves 2.5 mm superior only.
    np.testing.assert_allclose(affine[:3, 0], [0.0, 0.0, 2.5])
    np.testing.assert_allclose(affine[:3, 2], [-0.75, 0.0, 0.0])


def test_affine_agrees_with_simpleitk_for_an_oblique_volume():
    g = Geometry((0.7, 0.9, 3.0), (5.0, -7.5, 100.0), fx.oblique_direction(0.4))
    img = sitk.Image(8, 9, 10, sitk.sitkUInt8)
    img.SetSpacing(g.spacing)
    img.SetOrigin(g.origin)
    img.SetDirection(g.direction)
    affine = g.affine()
    for z, y, x in [(0, 0, 0), (1, 2, 3), (9, 8, 7), (4, 0, 6)]:
        expected = img.TransformIndexToPhysicalPoint((x, y, z))  # ITK index order is (x, y, z)
        np.testing.assert_allclose(affine @ [z, y, x, 1], [*expected, 1.0], atol=1e-12)


def test_affine_2d():
    g = Geometry((0.5, 2.0), (10.0, 20.0), (1.0, 0.0, 0.0, -1.0))
    affine = g.affine()
    assert affine.shape == (3, 3)
    # numpy index (row y=3, column x=4) -> (10 + 0.5*4, 20 - 2*3)
    np.testing.assert_allclose(affine @ [3, 4, 1], [12.0, 14.0, 1.0])


@pytest.mark.parametrize(
    ("direction", "code"),
    [
        (IDENTITY_3D, "LPS"),
        (fx.FLIPPED_DIRECTION, "RPS"),
        ((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), "RAS"),
        ((1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0), "LPI"),
        # sagittal: index x runs posterior, y inferior, z left
        ((0, 0, 1.0, 1.0, 0, 0, 0, -1.0, 0), "PIL"),
        # coronal: x left, y inferior, z posterior
        ((1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0), "LIP"),
    ],
)
def test_orientation_codes(direction, code):
    assert Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(float(v) for v in direction)).orientation() == code


def test_orientation_of_an_oblique_volume_follows_the_dominant_axis():
    # rotated 0.3 rad about z with x flipped: x column is mostly -L (R), y column mostly P
    assert Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), fx.oblique_direction(0.3)).orientation() == "RPS"


def test_orientation_2d():
    assert Geometry.identity(2).orientation() == "LP"
    assert Geometry((1.0, 1.0), (0.0, 0.0), (-1.0, 0.0, 0.0, -1.0)).orientation() == "RA"


def test_ras_nifti_reads_with_ras_code(tmp_path):
    import nibabel as nib

    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.uint8), np.diag([2.0, 3.0, 4.0, 1.0])), str(path))
    img = load(path)
    assert img.geometry.orientation() == "RAS"
    assert img.geometry.spacing == pytest.approx((2.0, 3.0, 4.0))
    # nibabel's (x, y, z) array is numpy (z, y, x) here
    assert img.shape == (6, 5, 4)


def test_matches_uses_a_tolerance_and_describes_differences():
    g = Geometry((0.7, 0.8, 2.5), (1.0, 2.0, 3.0), IDENTITY_3D)
    close = Geometry((0.7 + 1e-6, 0.8, 2.5), (1.0, 2.0 - 1e-6, 3.0), IDENTITY_3D)
    assert g.matches(close)
    assert g.describe_difference(close) == ""
    far = Geometry((0.7, 0.8, 2.5), (1.0, 2.0, 3.5), IDENTITY_3D)
    assert not g.matches(far)
    assert g.describe_difference(far).startswith("origin")
    flipped = Geometry(g.spacing, g.origin, fx.FLIPPED_DIRECTION)
    assert not g.matches(flipped)
    assert g.describe_difference(flipped).startswith("direction")
    assert not g.matches(Geometry.identity(2))
    assert g.describe_difference(Geometry.identity(2)) == "3D vs 2D"


# --------------------------------------------------------------------------------------------------
# Image


def test_image_spacing_is_reversed_itk_spacing():
    img = Image(np.zeros((4, 5, 6), np.int16), Geometry((0.5, 0.8, 3.0), (0.0, 0.0, 0.0), IDENTITY_3D))
    assert img.spacing == (3.0, 0.8, 0.5)
    assert img.geometry.spacing == (0.5, 0.8, 3.0)
    assert img.shape == (4, 5, 6)
    assert img.ndim == 3
    assert img.voxel_volume_mm3 == pytest.approx(0.5 * 0.8 * 3.0)


def test_loaded_nifti_spacing_order(tmp_path):
    path = fx.write_nifti(tmp_path / "v.nii.gz")
    img = load(path)
    assert img.shape == fx.NIFTI_SHAPE
    assert img.spacing == pytest.approx(tuple(reversed(fx.NIFTI_SPACING)))


def test_image_defaults_to_identity_geometry_and_copies_meta():
    meta = {"path": "/x.png", "format": "png"}
    img = Image(np.zeros((3, 4), np.uint8), meta=meta)
    assert img.geometry == Geometry.identity(2)
    img.meta["extra"] = 1
    assert "extra" not in meta


def test_rgb_image_shape_excludes_channels():
    img = Image(np.zeros((6, 7, 3), np.uint8), channels=3)
    assert img.ndim == 2
    assert img.shape == (6, 7)
    assert not img.is_label_map()


def test_with_array_keeps_geometry_and_drops_path():
    g = Geometry((0.5, 0.8, 3.0), (1.0, 2.0, 3.0), fx.oblique_direction())
    img = Image(np.zeros((4, 5, 6), np.int16), g, meta={"path": "/in.nii.gz", "format": "nifti"})
    label = img.with_array(np.ones((4, 5, 6), np.uint8), role="label")
    assert label.geometry == g
    assert "path" not in label.meta
    assert label.meta == {"format": "nifti", "role": "label"}
    assert label.is_label_map()
    assert img.meta["path"] == "/in.nii.gz"


@pytest.mark.parametrize(
    ("array", "kwargs", "words"),
    [
        (np.zeros((0, 5)), {}, "empty"),
        (np.zeros(5), {}, "1D"),
        (np.zeros((2, 3, 4, 5)), {}, "4D"),
        (np.zeros((4, 5, 2)), {"channels": 3}, "channels"),
        (np.zeros((4, 5)), {"geometry": Geometry.identity(3)}, "geometry"),
    ],
)
def test_image_rejects_bad_arrays(array, kwargs, words):
    with pytest.raises(MedsegError) as err:
        Image(array, **kwargs)
    assert words in one_line(err)


def test_image_error_names_the_path():
    with pytest.raises(MedsegError) as err:
        Image(np.zeros((0, 3)), meta={"path": "/data/case.npy"})
    assert one_line(err).startswith("/data/case.npy: ")


# --------------------------------------------------------------------------------------------------
# as_label_array


def label_image(array: np.ndarray, **kwargs) -> Image:
    return Image(array, meta={"path": "/data/label.nii.gz"}, **kwargs)


def test_float_labels_with_integral_values_are_accepted():
    array = np.array([[0.0, 1.0], [2.0, 7.0]], dtype=np.float32)
    out = as_label_array(label_image(array))
    assert out.dtype.kind in "iu"
    np.testing.assert_array_equal(out, [[0, 1], [2, 7]])


def test_integer_labels_are_returned_unchanged():
    array = np.array([[0, 1], [300, 2]], dtype=np.uint16)
    out = as_label_array(label_image(array))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, array)


def test_bool_labels_become_uint8():
    out = as_label_array(label_image(np.array([[True, False], [False, True]])))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 0], [0, 1]])


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN/inf"),
        (np.array([[0.0, 0.5], [1.0, 2.0]]), "non-integer"),
        (np.array([[0, -1], [1, 2]], dtype=np.int16), "negative"),
        (np.array([[0.0, -3.0], [1.0, 2.0]]), "negative"),
        (np.array([[0j, 1j], [1, 2]]), "dtype"),
    ],
)
def test_bad_label_values_are_rejected(array, words):
    with pytest.raises(MedsegError) as err:
        as_label_array(label_image(array))
    text = one_line(err)
    assert words in text
    assert "/data/label.nii.gz" in text


def test_multichannel_label_is_rejected():
    with pytest.raises(MedsegError, match="one channel"):
        as_label_array(label_image(np.zeros((4, 5, 3), np.uint8), channels=3))


def test_nan_count_is_reported():
    array = np.zeros((4, 4))
    array[0, :3] = math.nan
    with pytest.raises(MedsegError, match="3 NaN"):
        as_label_array(label_image(array))
