"""`medseg.preprocessing.statistics`: numpy's statistics, chunk by chunk and without numpy's copies."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.preprocessing import statistics
from medseg.preprocessing.statistics import count_distinct, distinct, percentiles, summarize


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    floats = rng.normal(40.0, 300.0, (7, 9, 11))
    holes = floats.copy()
    holes[0, 0, :3] = np.nan
    holes[3, 2, 1] = np.inf
    holes[6, 8, 10] = -np.inf
    return [
        floats,
        holes,
        floats.astype(np.float32)[:, ::2, 1:],  # not contiguous
        rng.integers(-1024, 3000, (5, 13, 6)).astype(np.int16),
        rng.integers(0, 4, (12, 16)).astype(np.uint8),
        rng.integers(0, 2, (6, 6)).astype(bool),
        np.full((4, 5), 7.0),
        np.array([1.0, 2.0, np.nan]),
    ]


@pytest.mark.parametrize("chunk", [1 << 20, 5, 1])
def test_summary_matches_numpy(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Whole arrays and chunks of 5 or 1 voxels (every chunk boundary) give numpy's numbers."""
    monkeypatch.setattr(statistics, "CHUNK_VOXELS", chunk)
    for array in _arrays():
        values = array.astype(np.uint8) if array.dtype == np.bool_ else array
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
        summary = summarize(array)
        assert summary.count == finite.size
        assert summary.nan == int(np.isnan(values).sum()) if values.dtype.kind == "f" else summary.nan == 0
        assert summary.nan + summary.inf == values.size - finite.size
        assert summary.minimum == finite.min() and summary.maximum == finite.max()
        assert summary.mean == pytest.approx(float(finite.mean(dtype=np.float64)), rel=1e-12, abs=1e-12)
        assert summary.std == pytest.approx(float(finite.std(dtype=np.float64)), rel=1e-9, abs=1e-12)
        assert summary.integral == bool(np.all(finite == np.round(finite)))
        assert summary.ordered.dtype == finite.dtype  # the file's own dtype, not a float64 copy
        qs = (0.0, 0.5, 37.0, 99.5, 100.0)
        np.testing.assert_allclose(percentiles(summary.ordered, qs), np.percentile(finite, qs), rtol=1e-12)
        uniques, counts = np.unique(finite, return_counts=True)
        assert count_distinct(summary.ordered) == uniques.size
        got_values, got_counts = distinct(summary.ordered)
        np.testing.assert_array_equal(got_values, uniques)
        np.testing.assert_array_equal(got_counts, counts)


def test_no_finite_values() -> None:
    summary = summarize(np.full((2, 3), np.nan, np.float32))
    assert (summary.count, summary.nan, summary.inf) == (0, 6, 0)
    assert count_distinct(summary.ordered) == 0 and distinct(summary.ordered)[0].size == 0
