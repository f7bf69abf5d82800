"""fit_support_probe: learns a separable task, is reproducible, leaves the global RNG alone, and works
when the caller is in inference mode."""

from __future__ import annotations

import pytest
import torch

from medseg.models.incontext.support_probe import SupportProbe, fit_support_probe


def _task(count: int = 3000, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clusters in 16 dimensions; 10% foreground (so the class balancing matters)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, 16, generator=generator)
    targets = (torch.rand(count, generator=generator) < 0.1).float()
    features[:, 0] += 2.5 * targets  # foreground sits along the first axis
    return features, targets


def test_probe_separates_the_classes_of_a_small_foreground() -> None:
    features, targets = _task()
    probe = fit_support_probe(features, targets, steps=150, batch_size=512)
    test_features, test_targets = _task(seed=2)
    predicted = probe(test_features) > 0
    recall = (predicted & (test_targets > 0.5)).sum() / (test_targets > 0.5).sum()
    specificity = (~predicted & (test_targets < 0.5)).sum() / (test_targets < 0.5).sum()
    assert isinstance(probe, SupportProbe) and not probe.training
    assert recall > 0.8 and specificity > 0.8


def test_fit_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    features, targets = _task(500)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = fit_support_probe(features, targets, steps=20, batch_size=128, seed=5)
    after = torch.rand(1)
    second = fit_support_probe(features, targets, steps=20, batch_size=128, seed=5)
    assert torch.equal(before, after)
    assert torch.equal(first(features), second(features))
    other = fit_support_probe(features, targets, steps=20, batch_size=128, seed=6)
    assert not torch.equal(first(features), other(features))


def test_fit_inside_inference_mode() -> None:
    features, targets = _task(500)
    with torch.inference_mode():
        probe = fit_support_probe(features, targets, steps=5)
        assert probe(features).shape == (500,)


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="features"):
        fit_support_probe(torch.zeros(10, 4), torch.zeros(9))
    with pytest.raises(ValueError, match="features"):
        fit_support_probe(torch.zeros(0, 4), torch.zeros(0))


def test_classify_is_forward_for_unit_features() -> None:
    features, targets = _task(500)
    probe = fit_support_probe(features, targets, steps=5)
    unit = torch.nn.functional.normalize(features, dim=-1)
    torch.testing.assert_close(probe.classify(unit), probe(features))
