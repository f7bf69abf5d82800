import pytest

from medseg.preprocessing.frames import frame_side


@pytest.mark.parametrize(("side", "expected"), [(35, 128), (128, 128), (129, 144), (200, 208), (256, 256), (2048, 256)])
def test_frame_side_rounds_up_to_16_within_its_range(side: int, expected: int) -> None:
    assert frame_side(side, 128, 256) == expected
