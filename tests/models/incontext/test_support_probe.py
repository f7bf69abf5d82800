"""fit_support_probe(s): learns a separable task, is reproducible, leaves the global RNG alone, works when
the caller is in inference mode; the labels fitted together equal their own fits; the optimiser is Adam's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import medseg.models.incontext.support_probe as module
from medseg.models.incontext.support_probe import SupportProbe, _Adam, fit_support_probe, fit_support_probes


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
    with pytest.raises(ValueError, match="targets"):
        fit_support_probes(torch.zeros(10, 4), torch.zeros(10))
    with pytest.raises(ValueError, match="targets"):
        fit_support_probes(torch.zeros(10, 4), torch.zeros(10, 0))


def test_classify_is_forward_for_unit_features() -> None:
    features, targets = _task(500)
    probe = fit_support_probe(features, targets, steps=5)
    unit = torch.nn.functional.normalize(features, dim=-1)
    torch.testing.assert_close(probe.classify(unit), probe(features))


def test_labels_fitted_together_equal_their_own_fits() -> None:
    features, first = _task(2000)
    second = (features[:, 1] > 0.8).float()
    options = {"steps": 30, "batch_size": 512, "seed": 3}
    together = fit_support_probes(features.half(), torch.stack([first, second], 1), **options)
    assert [p is q for p, q in zip(together[0].parameters(), together[1].parameters(), strict=True)] == [False] * 4
    for probe, targets in zip(together, (first, second), strict=True):
        alone = fit_support_probe(features.half(), targets, **options)
        assert isinstance(probe, SupportProbe) and not probe.training
        assert torch.equal(probe(features), alone(features))  # exactly: rounding would grow over the steps
    assert not torch.allclose(together[0](features), together[1](features))


def test_rows_converted_once_or_per_batch_give_the_same_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    features, targets = _task(2000)
    rows = torch.nn.functional.normalize(features, dim=-1).half()
    options = {"steps": 20, "batch_size": 512, "normalised": True}
    once = fit_support_probe(rows, targets, **options)
    monkeypatch.setattr(module, "FLOAT32_COPY_BYTES", 0)  # every batch converted from float16
    per_batch = fit_support_probe(rows, targets, **options)
    unit = rows.float()
    torch.testing.assert_close(once.classify(unit), per_batch.classify(unit))


def test_the_optimiser_follows_torch_adam() -> None:
    generator = torch.Generator().manual_seed(0)
    ours = [
        torch.randn(5, 3, generator=generator).requires_grad_(),
        torch.randn(3, generator=generator).requires_grad_(),
    ]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    optimiser, reference = _Adam(ours, 0.01), torch.optim.Adam(theirs, lr=0.01)
    for _ in range(25):
        gradients = [torch.randn(p.shape, generator=generator) for p in ours]
        for p, q, g in zip(ours, theirs, gradients, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        optimiser.step()
        reference.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)
        assert p.grad is None  # cleared for the next step


def test_fitting_does_not_import_the_compiler() -> None:
    """torch.optim's first use imports torch._dynamo (over a second of a command that only fits a probe)."""
    script = (
        "import sys, torch\n"
        "from medseg.models.incontext.support_probe import fit_support_probe\n"
        "fit_support_probe(torch.randn(64, 8), (torch.rand(64) > 0.5).float(), steps=2)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
