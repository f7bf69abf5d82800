"""Resampling to a spacing and back: exact geometry, exact labels for grid-aligned blocks."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.image import Geometry, Image
from medseg.preprocessing import ResampleRecord, invert_resample, resample_to_spacing


def _rotated_geometry() -> Geometry:
    """ITK spacing (sx, sy, sz) = (1, 1, 3), a shifted origin and a 30 degree rotation with a flip."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    return Geometry((1.0, 1.0, 3.0), (10.0, -5.0, 2.5), tuple(direction.ravel().tolist()))


def test_3d_label_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(4, 5, 6)).astype(np.uint8)  # (z, y, x), z spacing 3 mm
    geometry = _rotated_geometry()
    image = Image(labels, geometry, meta={"path": "seg.nii.gz"})
    assert image.spacing == (3.0, 1.0, 1.0)

    resampled, record = resample_to_spacing(image, (1.0, 1.0, 1.0), is_label=True)
    assert resampled.shape == (12, 5, 6)  # round(4 * 3 / 1)
    assert resampled.array.dtype == np.uint8
    assert resampled.spacing == (1.0, 1.0, 1.0)
    assert resampled.geometry.origin == geometry.origin
    assert resampled.geometry.direction == geometry.direction
    # each slice k becomes slices 3k-1..3k+1 (nearest), clamped at both ends
    expected = labels[np.clip(np.round(np.arange(12) / 3).astype(int), 0, 3)]
    np.testing.assert_array_equal(resampled.array, expected)
    assert record == ResampleRecord(geometry, (4, 5, 6), resampled.geometry, (12, 5, 6))

    back = invert_resample(resampled, record, is_label=True)
    assert back.shape == (4, 5, 6)
    assert back.geometry == geometry  # exactly, not merely within tolerance
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)


def test_linear_image_ramp_and_probability_inverse() -> None:
    ramp = np.broadcast_to((10.0 * np.arange(4))[:, None, None], (4, 3, 2)).astype(np.int16)
    image = Image(ramp, _rotated_geometry())
    resampled, record = resample_to_spacing(image, (1.0, 1.0, 1.0))
    assert resampled.array.dtype == np.float32
    # linear along z: 10 * j / 3, held at 30 past the last slice
    expected = np.minimum(10.0 * np.arange(12) / 3, 30.0)
    np.testing.assert_allclose(resampled.array[:, 1, 1], expected, atol=1e-4)

    back = invert_resample(resampled, record, is_label=False)
    assert back.geometry == image.geometry and back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, ramp, atol=1e-4)


def test_multichannel_probabilities() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random((4, 5, 6, 3)).astype(np.float32)
    image = Image(probs, _rotated_geometry(), channels=3)
    resampled, record = resample_to_spacing(image, (1.0, 1.0, 1.0))
    assert resampled.array.shape == (12, 5, 6, 3) and resampled.channels == 3
    back = invert_resample(resampled, record, is_label=False)
    assert back.array.shape == (4, 5, 6, 3) and back.geometry == image.geometry
    np.testing.assert_allclose(back.array, probs, atol=1e-5)  # the original voxels are grid points


def test_2d_upsample_round_trip_and_downsample_geometry() -> None:
    geometry = Geometry((0.9, 1.5), (-3.0, 7.0), (0.0, 1.0, 1.0, 0.0))  # (sx, sy); axes swapped
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(5, 7)).astype(np.int32)
    image = Image(labels, geometry)
    assert image.spacing == (1.5, 0.9)

    resampled, record = resample_to_spacing(image, (0.5, 0.3), is_label=True)
    assert resampled.shape == (15, 21)
    assert resampled.geometry.spacing == pytest.approx((0.3, 0.5))
    back = invert_resample(resampled, record)
    assert back.geometry == geometry and back.shape == (5, 7)
    np.testing.assert_array_equal(back.array, labels)

    coarse, coarse_record = resample_to_spacing(image, (3.0, 1.8), is_label=True)
    assert coarse.shape == (2, 4)  # round(2.5) = 2 (half to even), round(3.5) = 4
    np.testing.assert_array_equal(coarse.array, labels[::2, ::2][:2, :4])
    assert invert_resample(coarse, coarse_record).shape == (5, 7)


def test_size_at_least_one_and_bool_labels() -> None:
    mask = np.zeros((3, 4), dtype=bool)
    mask[1:, 2:] = True
    out, _ = resample_to_spacing(Image(mask), (10.0, 1.0), is_label=True)
    assert out.shape == (1, 4) and out.array.dtype == np.bool_


def test_reproducible() -> None:
    rng = np.random.default_rng(3)
    image = Image(rng.random((6, 7, 8)).astype(np.float32), _rotated_geometry())
    a, rec_a = resample_to_spacing(image, (1.3, 0.7, 1.1))
    b, rec_b = resample_to_spacing(image, (1.3, 0.7, 1.1))
    np.testing.assert_array_equal(a.array, b.array)
    assert rec_a == rec_b


def test_errors() -> None:
    image = Image(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(MedsegError, match="3D"):
        resample_to_spacing(image, (1.0, 1.0))
    with pytest.raises(MedsegError, match="positive"):
        resample_to_spacing(image, (1.0, 0.0, 1.0))
    with pytest.raises(MedsegError):
        resample_to_spacing(image, "abc")
    _, record = resample_to_spacing(image, (0.5, 1.0, 1.0))
    with pytest.raises(MedsegError, match="does not match"):
        invert_resample(image, record)
