"""Keep only the largest connected component where the support set shows a single object.

nnU-Net's post-processing (Isensee et al., Nature Methods 2021, "nnU-Net: a self-configuring method ..."):
"remove all but the largest connected component", first of the foreground as a whole, then of each label,
each kept only where it helps. nnU-Net decides that on its cross-validation predictions; an in-context task
has no training set to cross-validate on, so here the support set decides, in two steps:

1. what its label maps show (`SingleObjectRule.from_supports`): where every support's foreground (or every
   support's label ``v``, among those that have it) is one object, a query's is taken to be one object too;
2. where the engine's own predictions of the support images are at hand (2D supports), what it does to them
   (`SingleObjectRule.confirmed`): a step that lowers their mean Dice is dropped. One object in the labels
   can still come out in pieces (thin retinal vessels at a coarse feature grid), and then keeping the largest
   piece would throw true foreground away.

What lies apart from the kept component is background. Components connect along faces, edges and corners
(8 neighbours in 2D, 26 in 3D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.metrics.surface import dice

SINGLE_OBJECT_SHARE = 0.95  # the largest component's share of a mask for it to count as one object (specks aside)


@dataclass(frozen=True)
class SingleObjectRule:
    """What the support set shows as one object: the foreground as a whole (``foreground``) and the labels
    of ``values``."""

    foreground: bool
    values: tuple[int, ...]

    @classmethod
    def from_supports(cls, labels: Sequence[np.ndarray], values: Sequence[int]) -> SingleObjectRule:
        """The rule the label maps ``labels`` (2D or 3D, any integer dtype) show for the label ``values``.

        The foreground (or label ``v``) counts as one object when, in every label map that has any of it,
        its largest component holds at least `SINGLE_OBJECT_SHARE` of it (so a stray speck in the annotation
        does not count as a second object)."""
        foreground = _one_object([label > 0 for label in labels])
        single = tuple(v for v in values if _one_object([label == v for label in labels]))
        return cls(foreground, single)

    def confirmed(
        self, predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], values: Sequence[int]
    ) -> SingleObjectRule:
        """This rule less the steps that lower the mean Dice of ``predictions`` against ``truths`` (label maps
        of the same images, pairwise on one grid): the foreground step judged over every label of ``values``,
        then each label's step on what the kept steps leave, as nnU-Net judges its post-processing."""
        current = list(predictions)

        def mean_dice(maps: Sequence[np.ndarray], labels: Sequence[int]) -> float:
            return float(np.mean([dice(m == v, t == v) for v in labels for m, t in zip(maps, truths, strict=True)]))

        foreground = False
        if self.foreground:
            kept = [SingleObjectRule(True, ()).apply(m) for m in current]
            if mean_dice(kept, values) >= mean_dice(current, values):
                foreground, current = True, kept
        single = []
        for value in self.values:
            kept = [SingleObjectRule(False, (value,)).apply(m) for m in current]
            if mean_dice(kept, [value]) >= mean_dice(current, [value]):
                single.append(value)
                current = kept
        return SingleObjectRule(foreground, tuple(single))

    def apply(self, label_map: np.ndarray) -> np.ndarray:
        """``label_map`` with what lies outside the largest component set to 0: of the foreground as a whole
        if `foreground`, then of each label of `values`. A new array of the same shape and dtype."""
        result = label_map.copy()
        if self.foreground:
            result[~largest_component(result > 0)] = 0
        for value in self.values:
            mask = result == value
            result[mask & ~largest_component(mask)] = 0
        return result


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (any dimensionality, full connectivity); the mask
    itself when it has at most one component; ties go to the component found first (scan order)."""
    components, sizes = _components(mask)
    if len(sizes) <= 1:
        return mask.astype(bool)
    return components == int(sizes.argmax()) + 1


def largest_component_share(mask: np.ndarray) -> float | None:
    """The largest connected component's share of the mask's pixels (None for an empty mask)."""
    sizes = _components(mask)[1]
    return float(sizes.max() / sizes.sum()) if len(sizes) else None


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Component numbers (0 = background, full connectivity) and the size of components 1, 2, ..."""
    components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return components, np.bincount(components.ravel(), minlength=count + 1)[1:]


def _one_object(masks: Sequence[np.ndarray]) -> bool:
    shares = [share for share in map(largest_component_share, masks) if share is not None]
    return bool(shares) and min(shares) >= SINGLE_OBJECT_SHARE
