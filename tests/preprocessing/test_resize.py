"""Resize-longest-side-and-pad (SAM convention) and its inverse."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.preprocessing import ResizeRecord, resize_and_pad, undo_resize_and_pad
from medseg.preprocessing.resize import area_resize, area_weights


def test_tall_image_resized_region_and_zero_padding() -> None:
    image = np.full((100, 50), 7, dtype=np.uint8)
    out, record = resize_and_pad(image, 256)
    assert record == ResizeRecord((100, 50), (256, 128))
    assert out.shape == (256, 256) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :128], 7.0, rtol=1e-6)  # a constant stays constant
    assert not out[:, 128:].any()


def test_wide_rgb_image() -> None:
    image = np.zeros((30, 120, 3), dtype=np.uint8)
    image[..., 1] = 200
    out, record = resize_and_pad(image, 64)
    assert record.resized_shape == (16, 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_allclose(out[:16, :, 1], 200.0, rtol=1e-6)
    assert not out[16:].any() and not out[..., [0, 2]].any()


def test_rounding_of_short_side() -> None:
    _, record = resize_and_pad(np.ones((3, 2)), 4)
    assert record.resized_shape == (4, 3)  # 2 * 4 / 3 = 2.67 -> 3
    _, record = resize_and_pad(np.ones((1000, 1)), 8)
    assert record.resized_shape == (8, 1)  # never 0


def test_blocky_label_upscaled_by_integer_factor_is_exact() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(64, 32)).astype(np.uint8)
    out, record = resize_and_pad(labels, 256, is_label=True)
    assert out.dtype == np.uint8 and record.resized_shape == (256, 128)
    np.testing.assert_array_equal(out[:, :128], np.kron(labels, np.ones((4, 4), np.uint8)))
    assert not out[:, 128:].any()
    np.testing.assert_array_equal(undo_resize_and_pad(out, record, is_label=True), labels)


def test_blocky_label_downscaled_by_integer_factor_is_exact() -> None:
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 3, size=(128, 64)).astype(np.int64)
    labels = np.kron(coarse, np.ones((2, 2), np.int64))  # 256 x 128 of 2 x 2 blocks
    out, record = resize_and_pad(labels, 128, is_label=True)
    np.testing.assert_array_equal(out[:, :64], coarse)
    back = undo_resize_and_pad(out, record, is_label=True)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, labels)


def test_undo_probabilities_with_class_axis() -> None:
    _, record = resize_and_pad(np.zeros((100, 50)), 256)
    probs = np.zeros((3, 256, 256), dtype=np.float32)
    probs[0], probs[1], probs[2] = 0.2, 0.3, 0.5
    back = undo_resize_and_pad(probs, record)
    assert back.shape == (3, 100, 50) and back.dtype == np.float32
    np.testing.assert_allclose(back[:, 0, 0], [0.2, 0.3, 0.5], rtol=1e-5)
    np.testing.assert_allclose(back.sum(axis=0), 1.0, rtol=1e-5)  # padding was cropped, not blended
    assert undo_resize_and_pad(probs[0], record).shape == (100, 50)


def test_label_round_trip_non_integer_factor_restores_shape() -> None:
    mask = np.zeros((100, 50), dtype=bool)
    mask[20:60, 10:40] = True
    out, record = resize_and_pad(mask, 256, is_label=True)
    back = undo_resize_and_pad(out, record, is_label=True)
    assert back.shape == (100, 50) and back.dtype == np.bool_
    assert (back != mask).mean() < 0.02


def test_reproducible() -> None:
    rng = np.random.default_rng(2)
    image = rng.random((37, 53)).astype(np.float32)
    a, rec_a = resize_and_pad(image, 64)
    b, rec_b = resize_and_pad(image, 64)
    np.testing.assert_array_equal(a, b)
    assert rec_a == rec_b


def test_errors() -> None:
    with pytest.raises(MedsegError):
        resize_and_pad(np.zeros((2, 3, 4, 5)))
    with pytest.raises(MedsegError):
        resize_and_pad(np.zeros((0, 3)))
    with pytest.raises(MedsegError, match="label"):
        resize_and_pad(np.zeros((4, 4, 2), np.uint8), is_label=True)
    with pytest.raises(MedsegError, match="target"):
        resize_and_pad(np.zeros((4, 4)), 0)
    record = ResizeRecord((100, 50), (256, 128))
    with pytest.raises(MedsegError, match="smaller"):
        undo_resize_and_pad(np.zeros((128, 128)), record)
    with pytest.raises(MedsegError):
        undo_resize_and_pad(np.zeros((2, 256, 256), np.uint8), record, is_label=True)


@pytest.mark.parametrize(
    "shape",
    [
        (224, 224),
        (215, 256),
        (512, 512),
        (512, 600),
        (50, 37),
        (300, 199),
        (37, 50, 3),
        (600, 512, 3),
        (2, 300),
        (256, 256),
        (256, 100, 3),
    ],
)
def test_area_resize_equals_opencv_inter_area(shape: tuple[int, ...]) -> None:
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.uint8)
    scale = 256 / max(shape[:2])
    size = (max(1, int(shape[0] * scale + 0.5)), max(1, int(shape[1] * scale + 0.5)))
    expected = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    ours = area_resize(image, size)
    assert ours.shape == expected.shape
    # 8-bit: OpenCV's own rounding (a rare tie may round the other way when shrinking by a non-integer factor)
    assert np.abs(ours - expected).max() <= 1 and (ours != expected).mean() < 1e-3
    floats = cv2.resize(image.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(area_resize(image.astype(np.float32), size), floats, atol=1e-3)


def test_area_weights_average_what_each_output_pixel_covers() -> None:
    np.testing.assert_allclose(area_weights(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    assert np.allclose(area_weights(5, 9).sum(axis=1), 1.0)
    with pytest.raises(MedsegError, match="sizes must be"):
        area_weights(0, 3)
