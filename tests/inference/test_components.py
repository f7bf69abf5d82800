"""The largest-component post-processing and the rule a support set shows for it."""

from __future__ import annotations

import numpy as np

from medseg.inference.components import SingleObjectRule, largest_component, largest_component_share


def _blobs(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (40, 40), value: int = 1) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for top, left, bottom, right in boxes:
        label[top:bottom, left:right] = value
    return label


def test_one_object_per_support_turns_the_rule_on_and_a_second_object_turns_it_off() -> None:
    one = _blobs((5, 5, 20, 20))
    two = _blobs((5, 5, 20, 20), (25, 25, 38, 38))
    assert SingleObjectRule.from_supports([one, one], [1]) == SingleObjectRule(True, (1,))
    assert SingleObjectRule.from_supports([one, two], [1]) == SingleObjectRule(False, ())


def test_a_speck_in_an_annotation_does_not_count_as_a_second_object() -> None:
    label = _blobs((5, 5, 25, 25))
    label[35, 35] = 1  # 1 pixel against 400
    assert largest_component_share(label > 0) > 0.99
    assert SingleObjectRule.from_supports([label], [1]).foreground


def test_labels_are_judged_apart_from_the_foreground_and_only_where_present() -> None:
    # label 1 is one object, label 2 two (a lobed nucleus), the foreground one cell; label 3 absent from one
    cell = _blobs((5, 5, 35, 35))
    cell[10:15, 10:15] = 2
    cell[20:25, 20:25] = 2
    other = cell.copy()
    other[30:33, 30:33] = 3
    rule = SingleObjectRule.from_supports([cell, other], [1, 2, 3])
    assert rule == SingleObjectRule(True, (1, 3))
    assert SingleObjectRule.from_supports([np.zeros((8, 8), np.uint8)], [1]) == SingleObjectRule(False, ())


def test_apply_clears_what_lies_apart_from_the_largest_component() -> None:
    prediction = _blobs((5, 5, 20, 20)) + _blobs((30, 30, 33, 33), value=2) + _blobs((0, 36, 2, 40))
    kept = SingleObjectRule(True, ()).apply(prediction)
    assert kept.dtype == prediction.dtype and prediction[31, 31] == 2  # the input untouched
    assert np.array_equal(kept, _blobs((5, 5, 20, 20)))
    only_label_2 = SingleObjectRule(False, (2,)).apply(prediction)
    assert np.array_equal(only_label_2, prediction)  # one component of label 2: nothing to clear
    nothing = SingleObjectRule(False, ()).apply(prediction)
    assert np.array_equal(nothing, prediction)


def test_components_connect_through_corners_in_3d() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal line: one object with 26-connectivity
    assert largest_component_share(mask) == 1.0
    mask[4, 4, 0] = True
    assert largest_component(mask).sum() == 3 and largest_component_share(np.zeros((2, 2), bool)) is None


def test_confirmed_drops_a_step_that_lowers_dice_on_the_supports_and_keeps_one_that_does_not() -> None:
    truth = _blobs((5, 5, 35, 15))  # one long object
    in_pieces = truth.copy()
    in_pieces[18:22] = 0  # predicted in two halves: keeping one loses the other
    with_stray = truth + _blobs((36, 36, 39, 39))
    rule = SingleObjectRule(True, (1,))
    assert rule.confirmed([in_pieces, in_pieces], [truth, truth], [1]) == SingleObjectRule(False, ())
    assert rule.confirmed([with_stray, truth], [truth, truth], [1]) == rule
    assert SingleObjectRule(False, ()).confirmed([with_stray], [truth], [1]) == SingleObjectRule(False, ())
