"""GenSeg (Zhang, Xie et al., Nature Communications 2025): a segmentation network trained on real pairs and
on pairs a mask-to-image generator makes, the generator steered by the network's loss on validation cases.

Three levels, each training step (after the generator's warm-up, `GENERATOR_WARMUP` of the schedule):

1. the generator's weights and the discriminator: pix2pix's GAN loss + ``L1_WEIGHT`` x L1 on real pairs;
2. synthetic pairs: each real mask of the batch augmented (`augment_masks`: flips, scale 0.8-1.2, translation
   10 %, rotation 15 deg, shear 8 deg) and turned into an image by the generator;
3. every `ARCH_EVERY`-th step, the generator's *architecture* weights (`MixedUpConv.alpha`) on the validation
   loss of the segmentation network after one unrolled SGD step on real + synthetic (DARTS's one-step
   approximation, Liu et al. 2019),
   its hypergradient computed exactly by double back-propagation (`hypergradient`). The synthetic images are
   not detached: the path from the validation loss to the generator is the point of the method (the
   released 2D scripts cut it);
4. the segmentation network's weights on real + synthetic, with the step the plan's optimiser takes.

``separate`` is GenSeg's two-stage ablation: the generator is trained alone during the warm-up, then frozen,
and its pairs join the real ones; no architecture update. Before the warm-up ends both modes train the
segmentation network on real pairs only (pairs from an untrained generator are noise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.engine.run_files import atomic_write
from medseg.engine.supervised.data import PatchSampler, PreparedCase, crop
from medseg.errors import MedsegError
from medseg.models.generative.pix2pix import MaskToImageGenerator, PatchDiscriminator, gan_loss
from medseg.planning import Plan

MODES = ("end-to-end", "separate")
GENERATOR_WARMUP = 0.25  # share of the schedule the generator trains before its pairs are used
L1_WEIGHT = 100.0  # pix2pix
GAN_LR, GAN_BETAS = 2e-4, (0.5, 0.999)  # pix2pix's Adam
ARCH_LR, ARCH_BETAS, ARCH_DECAY = 3e-4, (0.5, 0.999), 1e-3  # DARTS's architecture optimiser
# The architecture (a few mixture weights) is updated every ARCH_EVERY-th step: the double back-propagation
# costs about three plain steps on a CPU, and the other steps train the networks on the same kind of pairs.
ARCH_EVERY = 4
# Double back-propagation through a pretrained encoder (LiteMedSAM's TinyViT: 256 channels at half resolution)
# keeps about 2.7 GB per 256 x 256 image: its architecture steps take one real and one synthetic image, not the
# batch (16 images there exhausted 24 GB). The hypergradient stays exact, on fewer images.
ARCH_IMAGES_PRETRAINED = 1

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validation_share(labelled: int) -> int:
    """Cases of ``labelled`` kept for the architecture's validation loss: a fifth, at least one (40 -> 8,
    9 -> 2, as GenSeg's splits)."""
    return max(1, round(labelled / 5))


def check_strides(plan: Plan) -> None:
    """Refuse a plan the generator cannot mirror: its levels halve an axis (stride 2) or keep it (1).

    Raises:
        MedsegError: a stride other than 1 or 2 (a hand-edited plan).
    """
    if any(s not in (1, 2) for level in plan.network.strides for s in level):
        strides = plan.network.strides
        raise MedsegError(f"GenSeg's generator halves or keeps axes: the plan's strides must be 1 or 2, got {strides}")


def onehot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(B, 1, *S)`` int64 -> ``(B, K, *S)`` float32."""
    return F.one_hot(labels[:, 0], classes).movedim(-1, 1).float()


def augment_masks(labels: torch.Tensor, rng: np.random.Generator, flip_axes: list[int] | None = None) -> torch.Tensor:
    """GenSeg's mask augmentation, one random affine map per mask: flips (p 0.5 along each of ``flip_axes``,
    spatial array axes, e.g. the plan's mirror axes: left and right labels are not swapped where the plan
    does not mirror), scale 0.8-1.2, translation up to 10 % of the side, rotation up to 15 deg and shear up
    to 8 deg in the plane of the last two axes; nearest-neighbour, zeros outside.
    ``(B, 1, *S)`` int64 -> the same."""
    dims = labels.ndim - 2
    thetas = []
    for _ in range(labels.shape[0]):
        angle, shear = np.deg2rad(rng.uniform(-15, 15)), np.deg2rad(rng.uniform(-8, 8))
        scale = rng.uniform(0.8, 1.2)
        # affine_grid's coordinates run (x, y[, z]): the last array axis first
        flips = np.ones(dims)
        for axis in flip_axes or []:
            if rng.random() < 0.5:
                flips[dims - 1 - axis] = -1.0
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        plane = rotation @ np.array([[1.0, np.tan(shear)], [0.0, 1.0]]) / scale
        theta = np.eye(dims, dims + 1)
        theta[:2, :2] = plane
        theta[:dims, :dims] = theta[:dims, :dims] @ np.diag(flips)
        theta[:2, dims] = rng.uniform(-0.2, 0.2, 2)  # 10 % of the side: the grid spans [-1, 1]
        thetas.append(theta)
    matrices = torch.tensor(np.array(thetas), dtype=torch.float32, device=labels.device)
    grid = F.affine_grid(matrices, list(labels.shape), align_corners=False)
    moved = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved.round().long()


def hypergradient(
    network: nn.Module,
    loss_fn: LossFn,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    step: float,
    wrt: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """d L_val(w - step * grad_w L_train(w)) / d ``wrt``: the validation loss after one unrolled SGD step of
    the network's trainable weights ``w`` on the training batch, differentiated through that step (double
    back-propagation; ``train_images`` may depend on ``wrt``, as synthetic images depend on the generator).

    Returns:
        the hypergradients (one per ``wrt``, zeros where unconnected), the training gradients of ``w``
        (detached, for the real step) and the training loss.
    """
    weights = [p for p in network.parameters() if p.requires_grad]
    train_loss = loss_fn(network(train_images), train_labels)
    # allow_unused: a weight the loss does not reach (TransUNet's unused cross-attention norms) gets zeros
    found = torch.autograd.grad(train_loss, weights, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(found, weights, strict=True)]
    with _substituted(network, {id(w): w - step * g for w, g in zip(weights, grads, strict=True)}):
        val_loss = loss_fn(network(val_images), val_labels)
    hyper = torch.autograd.grad(val_loss, wrt, allow_unused=True)
    hyper_grads = [torch.zeros_like(w) if h is None else h for h, w in zip(hyper, wrt, strict=True)]
    return hyper_grads, [g.detach() for g in grads], train_loss.detach()


@contextmanager
def _substituted(network: nn.Module, tensors: dict[int, torch.Tensor]) -> Iterator[None]:
    """Run ``network`` with the parameters whose ``id`` is in ``tensors`` replaced by those tensors (graphs
    attached), and put the parameters back after. Module by module, each once: MONAI's DynUNet reaches the
    same modules by two paths, which ``torch.func.functional_call`` fails to restore (the unrolled tensors
    stay in the network)."""
    slots = [
        (module, name, param)
        for module in network.modules()
        for name, param in module._parameters.items()
        if param is not None and id(param) in tensors
    ]
    try:
        for module, name, param in slots:
            module._parameters[name] = tensors[id(param)]  # type: ignore[assignment]
        yield
    finally:
        for module, name, param in slots:
            module._parameters[name] = param


class GenSeg:
    """The generator, discriminator and their optimisers beside a segmentation network being trained.

    Args:
        plan: the segmentation plan (its strides shape the generator, its labels the one-hot input).
        network: the segmentation network; ``optimizer`` its optimiser (the plan's).
        loss_fn: ``(output, labels) -> loss`` as the training loop computes it (deep supervision included).
        validation: the architecture's validation cases (GenSeg's split), sampled as patches.
        mode: ``end-to-end`` or ``separate`` (`MODES`).
        ngf: the generator's first-level channels.
        arch_images: real images (and as many synthetic ones) in an architecture step, None for the whole batch
            (`ARCH_IMAGES_PRETRAINED` for a pretrained encoder); that step's network update uses them too.
    """

    def __init__(
        self,
        plan: Plan,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        validation: list[PreparedCase],
        mode: str = "end-to-end",
        ngf: int = 16,
        device: torch.device | None = None,
        arch_images: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        check_strides(plan)
        self.plan, self.network, self.optimizer, self.loss_fn, self.mode = plan, network, optimizer, loss_fn, mode
        self.device = device or torch.device("cpu")
        self.classes = plan.network.out_channels  # the largest label value + 1 (values may have gaps)
        dims, strides = plan.spatial_dims, plan.network.strides
        self.generator = MaskToImageGenerator(dims, self.classes, plan.channels, strides, ngf).to(self.device)
        self.discriminator = PatchDiscriminator(dims, self.classes + plan.channels, strides, ngf).to(self.device)
        self.g_optimizer = torch.optim.Adam(self.generator.weight_parameters(), GAN_LR, betas=GAN_BETAS)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), GAN_LR, betas=GAN_BETAS)
        self.arch_optimizer = torch.optim.Adam(
            self.generator.architecture_parameters(), ARCH_LR, betas=ARCH_BETAS, weight_decay=ARCH_DECAY
        )
        self.validation = PatchSampler(validation, plan)
        self.steps = 0  # steps with generated pairs (every ARCH_EVERY-th also updates the architecture)
        self.arch_images = arch_images

    # ---- one training step ---------------------------------------------------------------------------------
    def step(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, progress: float) -> float:
        """One step on a real batch (``(B, C, *S)`` float32, ``(B, 1, *S)`` int64) at ``progress`` (0-1) of
        the schedule; returns the segmentation loss."""
        warm = progress < GENERATOR_WARMUP
        if warm or self.mode == "end-to-end":
            self._generator_step(images, labels)
        if warm:
            return self._network_step(images, labels)
        masks = augment_masks(labels, rng, self.plan.mirror_axes).to(self.device)
        self.steps += 1
        if self.mode == "separate" or self.steps % ARCH_EVERY:
            with torch.no_grad():
                synthetic = self.generator(onehot(masks, self.classes))
            return self._network_step(torch.cat([images, synthetic]), torch.cat([labels, masks]))
        if self.arch_images is not None:
            images, labels, masks = images[: self.arch_images], labels[: self.arch_images], masks[: self.arch_images]
        val_images, val_labels = self.validation.batch(images.shape[0], rng)
        step = float(self.optimizer.param_groups[0]["lr"])
        arch = self.generator.architecture_parameters()
        synthetic = self.generator(onehot(masks, self.classes))
        hyper, grads, loss = hypergradient(
            self.network,
            self.loss_fn,
            torch.cat([images, synthetic]),
            torch.cat([labels, masks]),
            val_images.to(self.device),
            val_labels.to(self.device),
            step,
            list(arch),
        )
        self.arch_optimizer.zero_grad(set_to_none=True)
        for alpha, g in zip(arch, hyper, strict=True):
            alpha.grad = g
        self.arch_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for weight, g in zip([p for p in self.network.parameters() if p.requires_grad], grads, strict=True):
            weight.grad = g
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        return float(loss)

    def _generator_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        condition = onehot(labels, self.classes)
        fake = self.generator(condition)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_real = self.discriminator(torch.cat([condition, images], 1))
        d_fake = self.discriminator(torch.cat([condition, fake.detach()], 1))
        ((gan_loss(d_real, True) + gan_loss(d_fake, False)) / 2).backward()
        self.d_optimizer.step()
        self.g_optimizer.zero_grad(set_to_none=True)
        adversarial = gan_loss(self.discriminator(torch.cat([condition, fake], 1)), True)
        g_loss = adversarial + L1_WEIGHT * F.l1_loss(fake, images)
        g_loss.backward()
        self.g_optimizer.step()
        for alpha in self.generator.architecture_parameters():
            alpha.grad = None  # alpha follows the validation loss alone

    def _network_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.network(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0)
        self.optimizer.step()
        return float(loss.detach())

    # ---- checkpoints and the pairs figure ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        self.steps = int(state.get("steps", 0))

    def summary(self) -> dict[str, Any]:
        """What train.json records: the mode and the kernel mixture each up-convolution reached."""
        return {"mode": self.mode, "kernel_weights": self.generator.kernel_weights()}

    @torch.no_grad()
    def save_pairs_figure(self, cases: list[PreparedCase], path: Path, rng: np.random.Generator, rows: int = 4) -> None:
        """A PNG grid, one row per real case: its image and mask, the generator's image from that mask, an
        augmented mask and the generator's image from it (3D: the slice with the most foreground)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chosen = [cases[int(i)] for i in rng.choice(len(cases), min(rows, len(cases)), replace=False)]
        titles = ["real image", "real mask", "generated from it", "augmented mask", "generated from it"]
        fig, axes = plt.subplots(len(chosen), 5, figsize=(10, 2.1 * len(chosen)), dpi=90, squeeze=False)
        was_training = self.generator.training
        self.generator.train()  # pix2pix keeps dropout at test time: it is the generator's noise
        for row, case in zip(axes, chosen, strict=True):
            image, label = _central_patch(case, self.plan.patch_size)
            labels = torch.from_numpy(label[None, None].astype(np.int64)).to(self.device)
            masks = augment_masks(labels, rng, self.plan.mirror_axes)
            generated = self.generator(onehot(torch.cat([labels, masks]), self.classes)).cpu().numpy()
            panels = [image, label, generated[0], masks[0, 0].cpu().numpy(), generated[1]]
            low, high = np.percentile(image, [1, 99])  # the real image's range, for all three images
            for ax, panel, title in zip(row, panels, titles, strict=True):
                if panel.ndim == label.ndim:  # a mask
                    ax.imshow(_slice_for_display(panel, label), cmap="viridis", vmin=0, vmax=max(1, self.classes - 1),
                              interpolation="nearest")  # fmt: skip
                else:
                    shown = np.clip((panel - low) / max(high - low, 1e-6), 0, 1)
                    shown = np.stack([_slice_for_display(c, label) for c in shown], -1)  # (*plane, C)
                    ax.imshow(shown if shown.shape[-1] == 3 else shown.mean(-1), cmap="gray", vmin=0, vmax=1)
                ax.set_axis_off()
                if ax in axes[0]:
                    ax.set_title(title, fontsize=9)
        self.generator.train(was_training)
        fig.suptitle(f"GenSeg ({self.mode}) pairs on {self.plan.dataset_name}: do the generated images look real?")
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)


def _central_patch(case: PreparedCase, patch: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The patch-sized region around the case's foreground centre (zero-padded), image ``(C, *P)``."""
    points = np.concatenate(list(case.foreground.values())) if case.foreground else None
    centre = points.mean(0).astype(int) if points is not None else np.array(case.label.shape) // 2
    return crop(case.image, case.label, centre, np.array(patch))


def _slice_for_display(panel: np.ndarray, label: np.ndarray) -> np.ndarray:
    if panel.ndim == 2:
        return panel
    z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(1))) if label.any() else label.shape[0] // 2
    return panel[z]
