"""Benchmark of medseg's in-context engines on datasets they never saw, with two baselines.

Engines and baselines (``--engines``):

- ``probe`` (medseg's default): `FeatureMatchingPredictor` fitting a `SupportProbe` (a one-hidden-layer
  classifier) to the support set's frozen LiteMedSAM features (the first three encoder stages of a 128 x 128
  frame) at inference (nothing trained beforehand, so every dataset is unseen by it);
- ``match``: `FeatureMatchingPredictor` with the trained `MatchingHead` of ``--head`` (default: the one
  medseg ships, trained by ``medseg train-matching-head`` without the held-out datasets);
- ``knn``: the same frozen LiteMedSAM image features with the fixed nearest-neighbour rule (nothing trained
  for in-context use, so every dataset is unseen by it);
- ``universeg``: medseg's UniverSeg-style network with the weights of ``--universeg-weights`` (trained by
  ``medseg train-incontext`` without the held-out datasets);
- ``prototype``: the prototype baseline (masked average pooling of the same LiteMedSAM features, cosine);
- ``unet``: the supervised baseline, a MONAI 2D U-Net trained on the support set only (``--unet-steps``
  Adam steps of DiceCE on the 128 x 128 grey frames, flips and 90-degree rotations), for each support size;
- ``unet-lcc``: the same U-Net (same seed, same training) with the in-context engines' post-processing
  (confirmed, as theirs, on its predictions of up to 8 of its supports).

The in-context engines keep only the largest connected component where the support set shows one object
(`medseg.inference.components`, their default); ``--no-largest-component`` turns that off (cached apart).

Protocols (``--protocol``): ``sorted`` (the default, issue 18's): each dataset's cases in name order, the
queries the last ``--queries`` (40; a third of the cases at most) and the support set of size ``n`` the first
``n`` (nested sets; a size larger than the rest is reported as "-"): supports are not a random sample of the
queries. ``random``: the cases shuffled with ``--seed`` first. ``--datasets all`` (the default) takes the eight
datasets of ``../shared/data``; a 3D dataset (Hippocampus) gives each volume's middle slice along its first axis.
Nothing here trains on a dataset (probe, knn, prototype, the decoder engines); ``match`` and ``universeg`` were
trained on some of them (their weights' configs say which). Every label of the dataset is segmented in one call;
Dice per label is computed on the query's own grid and averaged over queries (a query where both prediction and
ground truth are empty for a label scores 1).

Decoder engines: ``probe+decoder`` is medseg's default (`DecoderRefinedEngine`, ``auto``: labels redrawn by the
LiteMedSAM decoder where that predicts held-out supports better), ``probe+decoder-on`` redraws every label,
``probe-embedding`` / ``probe-embedding+decoder`` fit the probe to the 256 x 256 embedding instead of the
stages, ``prototype+box`` is issue 18's baseline (the prototype's largest component per label -> its box -> the
decoder). ``benchmarks/incontext_lodo.py`` compares variants leaving each dataset out.

``--latency``: seconds per query at 128 x 128 (a real image of the first dataset resized), 2 threads, for
support sizes 1, 16 and 64, after one warm-up; the supports' embeddings are computed once per support set
(as when a folder of queries is segmented) and not counted; the query's own encoding is. So is probe's
fit, done once per support set: it is timed apart (seconds per support set, every label).

``--prototype-share P``: the probe's probabilities mixed with this share of the prototype rule's on the same
features (medseg's default otherwise; cached apart).

``--frame-size S``: the probe's encoder input side instead of its default, which follows the supports (their
larger side from 128 to 256, `plane_frame_size`; its Dice cached apart).

``--hippocampus N``: 3D Dice on N Hippocampus volumes held out from a support set of 3 labelled volumes, with
the seconds of the first volume (the supports' work included) and of each later one. The probe runs as
``--volume-fits`` says: ``positional`` (its default, one position-aware fit per label) and/or ``matched``
(a fit per query slice from the support slices at its relative depth; ``--slice-bins B``: query slices of
one of B position bins share that bin's, cached apart); the other engines match slices.

Results are cached per (dataset, engine, size) under ``--work``; run from the repository root::

    python benchmarks/incontext.py --datasets WBC --queries 4 --support-sizes 1 4 --engines knn prototype  # smoke
    python benchmarks/incontext.py --support-sizes 1 4 16 --engines probe probe+decoder prototype prototype+box unet
    python benchmarks/incontext.py --protocol random --datasets WBC ISBI-EM --latency --hippocampus 5
    python benchmarks/incontext.py --datasets --engines probe --hippocampus 5 --volume-fits positional matched
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ENGINES = (
    "probe", "probe+decoder", "probe+decoder-on", "probe-embedding", "probe-embedding+decoder", "match", "knn",
    "universeg", "prototype", "prototype+box", "unet", "unet-lcc",
)  # fmt: skip
ALL_DATASETS = ("BUSI", "DRIVE", "Hippocampus", "ISBI-EM", "JSRT", "Kvasir-SEG", "MoNuSeg", "WBC")
# the engines that run the LiteMedSAM decoder
DECODED = ("probe+decoder", "probe+decoder-on", "probe-embedding+decoder", "prototype+box")
UNET_STEPS = 100  # the support-only U-Net's default training budget (Adam steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["all"], help="2D sets, 'all' for the eight (none: 3D only)")
    parser.add_argument(
        "--protocol",
        choices=("sorted", "random"),
        default="sorted",
        help="sorted: supports the first cases in name order, queries the last; random: a seeded shuffle first",
    )
    parser.add_argument("--support-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--universeg-weights", type=Path, default=None)
    parser.add_argument("--head", type=Path, default=None, help="matching_head.pt (default: the shipped one)")
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument(
        "--frame-size", type=int, default=None, help="probe: the encoder's input side (default: the supports')"
    )
    parser.add_argument(
        "--prototype-share", type=float, default=None, help="probe: the prototype rule's share (default: medseg's)"
    )
    parser.add_argument("--no-largest-component", action="store_true", help="in-context engines: no post-processing")
    parser.add_argument(
        "--slice-bins", type=int, default=0, help="3D: relative-position bins (0: each slice matched on its own)"
    )
    parser.add_argument(
        "--support-scales", choices=("off", "on"), default=None, help="in-context engines: supports zoomed in and out"
    )
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--hippocampus", type=int, default=0, help="held-out query volumes for the 3D test")
    parser.add_argument(
        "--volume-fits",
        nargs="+",
        choices=("positional", "matched"),
        default=["positional"],
        help="3D test, probe: one position-aware fit per label (the default) and/or a fit per matched slice",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/medseg_incontext_bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.datasets == ["all"]:
        args.datasets = list(ALL_DATASETS)
    if args.latency and not args.datasets:
        parser.error("--latency times queries of the first of --datasets: give one")
    torch.set_num_threads(args.threads)
    engines = [e for e in args.engines if e != "universeg" or args.universeg_weights is not None]
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"dice": {}, "latency": {}, "hippocampus": {}}
    for name in args.datasets:
        results["dice"][name] = {e: _dataset_scores(name, e, args) for e in engines}
    if args.latency:
        results["latency"] = {e: _latency(args.datasets[0], e, args) for e in engines}
    if args.hippocampus:
        volume_engines = [e for e in engines if not e.startswith("unet") and e not in DECODED]
        for e in volume_engines:
            for fit in args.volume_fits if e == "probe" else [None]:
                results["hippocampus"][e if fit is None else f"{e} ({fit})"] = _volumes(e, args, fit)
    _print_tables(results, args, engines)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


_FEATURE_PREDICTORS: dict[str, Any] = {}  # per feature kind, so that knn, match and prototype share a cache


def _predictor(engine: str, args: argparse.Namespace) -> Any:
    if engine in ("probe", "probe-embedding", "match", "knn", "prototype"):
        from medseg.inference.feature_incontext import SHIPPED_HEAD, FeatureMatchingPredictor, load_head

        features = "stages" if engine == "probe" else "embedding"  # each engine's default; probe-embedding's too
        engine = "probe" if engine == "probe-embedding" else engine
        if features not in _FEATURE_PREDICTORS:
            size = args.frame_size if features == "stages" else None
            _FEATURE_PREDICTORS[features] = FeatureMatchingPredictor.from_checkpoint(
                method=engine, features=features, frame_size=size
            )
            _FEATURE_PREDICTORS[features].cache_size = 1024  # every slice of the 3D test
        predictor = _FEATURE_PREDICTORS[features]
        if args.support_scales is not None:
            predictor.support_scales = args.support_scales == "on"
        predictor.method = engine
        if args.prototype_share is not None:
            predictor.prototype_share = args.prototype_share
        predictor.head = load_head(args.head or SHIPPED_HEAD) if engine == "match" else None
        return predictor
    from medseg.inference.incontext_predictor import InContextPredictor

    return InContextPredictor.from_weights(args.universeg_weights)


def _split(name: str, args: argparse.Namespace) -> tuple[list[tuple[Any, np.ndarray]], list[Any], list[int]]:
    """(support pool, queries, label values): `Image` and label array pairs. Sorted protocol: cases in name
    order, the queries the last ones; random: shuffled with ``--seed`` first. Hippocampus volumes give their
    middle slice along array axis 0 (a 2D task like the others)."""
    from medseg.data import open_dataset
    from medseg.data.cases import load_case
    from medseg.io import Image

    dataset = open_dataset(DATA / name)
    cases = sorted((c for c in dataset.cases if c.label is not None), key=lambda c: c.name)
    if args.protocol == "random":
        cases = [cases[int(i)] for i in np.random.default_rng(args.seed).permutation(len(cases))]
    count = _query_count(len(cases), args)
    pool_size = min(max(args.support_sizes), len(cases) - count)
    loaded = []
    for case in cases[:pool_size] + cases[-count:]:  # only what is used is read
        image, label = load_case(case)
        assert label is not None
        if image.ndim == 3:
            middle = image.array.shape[0] // 2
            image, label = Image(np.ascontiguousarray(image.array[middle])), label[middle]
        loaded.append((image, label))
    queries, pool = loaded[-count:], loaded[:-count]
    values = sorted(int(v) for v in dataset.labels.values() if int(v) != 0) or [1]
    return pool, queries, values


def _dataset_scores(name: str, engine: str, args: argparse.Namespace) -> dict[str, dict[str, float | None]]:
    """{str(size): {str(label): mean Dice or None}}, cached per size."""
    suffix = f"_f{args.frame_size}" if engine.startswith("probe") and args.frame_size else ""
    if engine.startswith("probe") and args.prototype_share is not None:
        suffix += f"_ps{args.prototype_share:g}"
    if engine.startswith("unet") and args.unet_steps != UNET_STEPS:  # another training budget, another result
        suffix = f"_steps{args.unet_steps}"
    if not engine.startswith("unet") and not args.no_largest_component:
        suffix += "_lcc"
    if not engine.startswith("unet") and args.support_scales is not None:
        suffix += f"_scales{args.support_scales}"
    protocol = "" if args.protocol == "random" else "_sorted"
    cache = args.work / f"{name}_{engine}{suffix}_q{args.queries}_s{args.seed}{protocol}.json"
    if engine in ("match", "universeg"):  # trained engines: the cache belongs to one weights file
        weights = args.head if engine == "match" else args.universeg_weights
        cache = cache.with_name(f"{cache.stem}_{_digest(weights)}.json")
    done: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    missing = [n for n in args.support_sizes if str(n) not in done]
    if missing:
        pool, queries, values = _split(name, args)
        names = {int(v): k for k, v in dataset_labels(name).items()}
        for n in missing:
            if n > len(pool):  # more supports than the dataset has outside its queries
                done[str(n)] = {names.get(v, str(v)): None for v in values}
                cache.write_text(json.dumps(done))
                continue
            started = time.perf_counter()
            support = pool[:n]
            if engine.startswith("unet"):
                labels = _unet_labels(engine, [(i.array, lab) for i, lab in support], queries, values, args)
            elif engine in DECODED:
                labels = _decoded_labels(engine, support, queries, args)
            else:
                predictor = _predictor(engine, args)
                images, maps = [s[0].array for s in support], [s[1] for s in support]
                keep = not args.no_largest_component
                labels = [predictor.predict(q.array, images, maps, largest_component=keep).labels for q, _ in queries]
            scores = {names.get(v, str(v)): _mean_dice(labels, [gt for _, gt in queries], v) for v in values}
            done[str(n)] = scores
            cache.write_text(json.dumps(done))
            print(f"{name} {engine} n={n}: {scores} ({time.perf_counter() - started:.0f} s)", flush=True)
    return {str(n): done[str(n)] for n in args.support_sizes}


def _unet_labels(
    engine: str, support: list[tuple[np.ndarray, np.ndarray]], queries: list[Any], values: list[int], args: Any
) -> list[np.ndarray]:
    from medseg.inference.incontext_predictor import CHECKED_SUPPORTS

    # unet-lcc predicts its supports too, to confirm the rule as the engines do
    checked = support[:CHECKED_SUPPORTS] if engine == "unet-lcc" else []
    labels = _unet_baseline(support, [*((q.array, gt) for q, gt in queries), *checked], values, args)
    labels, own = labels[: len(queries)], labels[len(queries) :]
    if engine == "unet-lcc":
        from medseg.inference.components import SingleObjectRule

        rule = SingleObjectRule.from_supports([label for _, label in support], values)
        rule = rule.confirmed(own, [label for _, label in checked], values)
        labels = [rule.apply(label) for label in labels]
    return labels


_DECODER: list[Any] = []  # one LiteMedSAM prompt engine, its embeddings cached across engines and sizes


def _refined_engine(engine: str, images: list[Any], labels: list[np.ndarray], args: Any) -> Any:
    from medseg.inference.draft_refinement import DecoderRefinedEngine
    from medseg.inference.engines import InContextEngine, PromptEngine

    if not _DECODER:
        _DECODER.append(PromptEngine.from_pretrained(None))
        _DECODER[0].predictor.cache_size = 1024  # every query of a dataset, kept across engines and sizes
    method = {"prototype+box": "prototype", "probe-embedding+decoder": "probe-embedding"}.get(engine, "probe")
    mode = "on" if engine in ("probe+decoder-on", "prototype+box") else "auto"
    refined = DecoderRefinedEngine(InContextEngine(_predictor(method, args), method), _DECODER[0], mode)
    refined.set_support(images, labels)
    return refined


def _decoded_labels(engine: str, support: list[tuple[Any, np.ndarray]], queries: list[Any], args: Any) -> list[Any]:
    """probe+decoder (medseg's choice per support set), probe+decoder-on (always refined), prototype+box (the
    baseline: the prototype's largest component per label -> one box -> the decoder)."""
    from medseg.inference.components import largest_component
    from medseg.inference.draft_refinement import decoder_key, refine_with_decoder

    refined = _refined_engine(engine, [image for image, _ in support], [label for _, label in support], args)
    incontext = refined.incontext
    keep = not args.no_largest_component
    if engine == "prototype+box":
        outputs = []
        for query, _ in queries:
            raw = incontext.predict(query, largest_component=False).labels.array
            one = np.zeros_like(raw)
            for value in np.unique(raw[raw > 0]).tolist():
                one[largest_component(raw == value)] = value
            outputs.append(refine_with_decoder(_DECODER[0], query, one, key=decoder_key(query)))
        return outputs
    return [refined.predict(query, largest_component=keep).labels.array for query, _ in queries]


def _query_count(cases: int, args: argparse.Namespace) -> int:
    """``--queries``, but at most a third of the cases (ISBI-EM has 24: 8 queries, supports up to 16)."""
    return max(1, min(args.queries, cases // 3))


def _digest(path: Path | None) -> str:
    import hashlib

    from medseg.inference.feature_incontext import SHIPPED_HEAD

    return hashlib.sha256((path or SHIPPED_HEAD).read_bytes()).hexdigest()[:8]


def dataset_labels(name: str) -> dict[str, int]:
    from medseg.data import open_dataset

    return open_dataset(DATA / name).labels


def _mean_dice(predictions: list[np.ndarray], truths: list[np.ndarray], value: int) -> float:
    from medseg.metrics.surface import dice

    return round(float(np.mean([dice(p == value, t == value) for p, t in zip(predictions, truths, strict=True)])), 4)


def _unet_baseline(
    support: list[tuple[np.ndarray, np.ndarray]], queries: list[Any], values: list[int], args: argparse.Namespace
) -> list[np.ndarray]:
    """A 2D U-Net trained from scratch on the support set alone, applied to the queries."""
    import torch.nn.functional as F
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from medseg.preprocessing.frames import label_masks, model_frame

    size = 128
    torch.manual_seed(args.seed)
    images = torch.from_numpy(np.stack([model_frame(i, size) for i, _ in support]))[:, None]
    masks = torch.from_numpy(np.stack([label_masks(lab, values, size) for _, lab in support]))
    target = torch.cat([1 - masks.sum(1, keepdim=True).clamp(0, 1), masks], 1).argmax(1, keepdim=True)
    network = UNet(2, 1, len(values) + 1, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="instance")
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(args.seed)
    network.train()
    for _ in range(args.unet_steps):
        pick = rng.integers(0, len(images), min(8, len(images)))
        x, y = images[pick], target[pick]
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        x, y = torch.rot90(x, turns, (2, 3)), torch.rot90(y, turns, (2, 3))
        if flip:
            x, y = x.flip(3), y.flip(3)
        optimizer.zero_grad()
        loss_fn(network(x), y).backward()
        optimizer.step()
    network.eval()
    out = []
    with torch.no_grad():
        for image, truth in queries:
            logits = network(torch.from_numpy(model_frame(image, size))[None, None])
            back = F.interpolate(logits, truth.shape[:2], mode="bilinear", align_corners=False)
            out.append(np.array([0, *values], dtype=np.uint8)[back.argmax(1)[0].numpy()])
    return out


def _latency(name: str, engine: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per 128 x 128 query for support sizes 1, 16, 64."""
    from medseg.io import Image

    pool, queries, values = _split(name, args)
    query = _resize(queries[0][0].array)
    times: dict[str, float] = {}
    predictor = None if engine.startswith("unet") or engine in DECODED else _predictor(engine, args)
    for n in (1, 16, 64):
        support = [(_resize(i.array), _resize(lab, label=True)) for i, lab in (pool * 64)[:n]]
        if engine.startswith("unet"):
            started = time.perf_counter()
            _unet_baseline(support, [(query, query[..., 0] if query.ndim == 3 else query)], values, args)
            times[str(n)] = round(time.perf_counter() - started, 3)  # training included: that is its cost
            continue
        images, labels = [s[0] for s in support], [s[1] for s in support]
        if engine in DECODED:  # the engine as medseg incontext runs it: Images in, the decoder's choice made once
            wrapped = [Image(i, channels=3 if i.ndim == 3 else 1) for i in images]
            refined = _refined_engine(engine, wrapped, labels, args)
            run = partial(lambda e, array: e.predict(Image(array, channels=3 if array.ndim == 3 else 1)), refined)
        else:
            run = partial(lambda i, m, array: predictor.predict(array, i, m), images, labels)

        run(query)  # warm-up; fills the embedding cache and makes the one-off choices
        runs = []
        for r in range(3):
            offset = 100 * ENGINES.index(engine) + n + r / 10 + 1  # engines share the feature predictor's cache
            fresh = _unseen(query, int(offset * 10))  # its embedding is not cached
            started = time.perf_counter()
            run(fresh)
            runs.append(time.perf_counter() - started)
        times[str(n)] = round(float(np.median(runs)), 3)
        if engine == "probe" and predictor is not None:  # the one-off fit: the last query again, probes forgotten
            predictor.forget_probes()
            started = time.perf_counter()
            predictor.predict(fresh, images, labels)
            times[f"fit {n}"] = round(time.perf_counter() - started, 3)
        print(f"latency {engine} n={n}: {times}", flush=True)
    return times


def _unseen(image: np.ndarray, index: int) -> np.ndarray:
    """``image`` with one value nudged (flat ``index``) towards the other end of its range: content never seen
    before, in the same dtype and range (an 8-bit RGB image stays 8-bit, as the intensity rules require)."""
    fresh = image.copy()
    flat = fresh.reshape(-1)
    at = index % flat.size
    other_end = flat.min() if flat[at] > flat.min() else flat.max()
    if fresh.dtype.kind in "ui":
        flat[at] = flat[at] + 1 if other_end > flat[at] else flat[at] - 1  # in the dtype: no step past its range
    else:
        flat[at] = np.nextafter(flat[at], other_end)
    return fresh


def _resize(array: np.ndarray, label: bool = False) -> np.ndarray:
    """``(H, W[, C])`` -> ``(128, 128[, C])`` in its own dtype (nearest for label maps)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    chw = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    resized = torch.nn.functional.interpolate(chw[None], (128, 128), mode="nearest" if label else "bilinear")[0]
    out = resized[0] if tensor.ndim == 2 else resized.permute(1, 2, 0)
    return out.numpy().astype(array.dtype)


def _volumes(engine: str, args: argparse.Namespace, fit: str | None = None) -> dict[str, float]:
    """3D Dice per label on Hippocampus volumes held out from a support set of 3 volumes (the probe with
    ``fit``, its ``volume_fit``), the seconds of the first volume (the supports' work included) and per later one."""
    from medseg.data import open_dataset
    from medseg.data.cases import load_case
    from medseg.metrics.surface import dice

    suffix = ("" if args.no_largest_component else "_lcc") + (f"_bins{args.slice_bins}" if args.slice_bins else "")
    suffix += f"_{fit}" if fit is not None else ""
    cache = args.work / f"Hippocampus3D_{engine}_{args.hippocampus}_s{args.seed}{suffix}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    dataset = open_dataset(DATA / "Hippocampus")
    cases = [c for c in dataset.cases if c.label is not None]
    order = np.random.default_rng(args.seed).permutation(len(cases))
    loaded = [load_case(cases[int(i)]) for i in order[: 3 + args.hippocampus]]
    support, queries = loaded[:3], loaded[3:]
    predictor = _predictor(engine, args)
    if fit is not None:
        predictor.volume_fit = fit
        predictor.forget_probes()
    scores: dict[str, list[float]] = {"1": [], "2": []}
    seconds = []
    for image, truth in queries:
        started = time.perf_counter()
        assert truth is not None
        result = predictor.predict(
            image.array, [s[0].array for s in support], [s[1] for s in support],
            query_is_volume=True, support_are_volumes=True, largest_component=not args.no_largest_component,
            slice_bins=args.slice_bins or None,
        )  # fmt: skip
        seconds.append(time.perf_counter() - started)
        for v in scores:
            scores[v].append(dice(result.labels == int(v), truth == int(v)))
    means = {v: round(float(np.mean(s)), 4) for v, s in scores.items()}
    means["first_volume_s"] = round(seconds[0], 1)
    means["later_volume_s"] = round(float(np.mean(seconds[1:])), 1) if len(seconds) > 1 else None
    cache.write_text(json.dumps(means))
    print(f"Hippocampus 3D {engine}: {means}", flush=True)
    return means


def _print_tables(results: dict[str, Any], args: argparse.Namespace, engines: list[str]) -> None:
    if results["dice"]:
        _print_dice(results["dice"], args, engines)
    _print_other_tables(results, args)


def _print_dice(dice: dict[str, Any], args: argparse.Namespace, engines: list[str]) -> None:
    sizes = [str(n) for n in args.support_sizes]
    print(
        f"\nDice on held-out datasets (up to {args.queries} queries each, a third of the cases at most; "
        f"seed {args.seed}); columns: support size"
    )
    print("| dataset | label | engine | " + " | ".join(sizes) + " |")
    print("|---|---|---|" + "---|" * len(sizes))
    means: dict[str, dict[str, list[float]]] = {e: {n: [] for n in sizes} for e in engines}
    for name, by_engine in dice.items():
        for engine, by_size in by_engine.items():
            for label in by_size[sizes[0]]:
                cells = []
                for n in sizes:
                    value = by_size[n][label]
                    cells.append("-" if value is None else f"{value:.3f}")
                    if value is not None:
                        means[engine][n].append(value)
                print(f"| {name} | {label} | {engine} | " + " | ".join(cells) + " |")
    labels = sum(len(next(iter(by_engine.values()))[sizes[0]]) for by_engine in dice.values())
    for engine in engines:  # a mean over every held-out label, or none
        cells = [f"{np.mean(v):.3f}" if len(v) == labels else "-" for v in means[engine].values()]
        print(f"| mean | all | {engine} | " + " | ".join(cells) + " |")


def _print_other_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    if results["latency"]:
        print("\nSeconds per 128 x 128 query, 2 threads (unet: training on the support set included)")
        print("| engine | 1 | 16 | 64 |\n|---|---|---|---|")
        for engine, times in results["latency"].items():
            print(f"| {engine} | " + " | ".join(f"{times[n]:.3f}" for n in ("1", "16", "64")) + " |")
        fits = {e: t for e, t in results["latency"].items() if "fit 1" in t}
        for engine, times in fits.items():
            first = args.datasets[0]
            print(f"\n{engine}: seconds to fit, once per support set (every label of {first}), not per query")
            print("| engine | 1 | 16 | 64 |\n|---|---|---|---|")
            print(f"| {engine} fit | " + " | ".join(f"{times['fit ' + n]:.3f}" for n in ("1", "16", "64")) + " |")
    if results["hippocampus"]:
        print(f"\nHippocampus 3D Dice, {args.hippocampus} held-out volumes, 3 support volumes")
        print("| engine | anterior | posterior | s, first volume (supports' work included) | s, each later one |")
        print("|---|---|---|---|---|")
        for engine, m in results["hippocampus"].items():
            print(f"| {engine} | {m['1']:.3f} | {m['2']:.3f} | {m['first_volume_s']} | {m['later_volume_s']} |")


if __name__ == "__main__":
    main()
