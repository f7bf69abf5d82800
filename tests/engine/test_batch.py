"""``medseg predict --batch`` (`medseg.engine.batch` in this process) and its manifest: the same label maps as a plain
``medseg predict``, a bad file a failed row that does not stop the run, a second run that skips what is done, every
input listed as the run starts, the lock that keeps a second run out, and the one-line refusals. The model is planned
on a tiny dataset and given seeded untrained weights (no training)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from batch_helpers import assert_same_label_maps, make_model, manifest_rows
from cli_helpers import assert_one_error_line, run_cli
from medseg.engine.batch import run_batch
from medseg.engine.batch_runners import SpecialistRunner
from medseg.engine.manifest import COLUMNS, Row, case_hash, model_hash, read_manifest, write_manifest
from medseg.errors import MedsegError
from medseg.inference.engines import SpecialistEngine
from medseg.inference.folders import cases_of, predict_folder
from medseg.io import Image, save

HOST = socket.gethostname().replace(".", "_")


def copied_inputs(given: Path, folder: Path, count: int) -> Path:
    """``folder`` holding copies of the first ``count`` images of ``given``."""
    folder.mkdir()
    for path in sorted(given.glob("*_0000.png"))[:count]:
        shutil.copyfile(path, folder / path.name)
    return folder


def ended_pid() -> int:
    """The id of a process of this machine that has ended."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(inputs: the 6 cases, a broken PNG and a 3D volume; the model; label maps of a plain ``medseg predict``
    of the 6 good cases)."""
    root = tmp_path_factory.mktemp("batch")
    images, model_dir = make_model(root)
    assert run_cli("predict", model_dir, images, "-o", root / "plain").exit_code == 0
    inputs = root / "inputs"
    inputs.mkdir()
    for path in images.iterdir():
        (inputs / path.name).write_bytes(path.read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    save(Image(np.zeros((4, 8, 8), np.int16)), inputs / "volume.nii.gz")
    return inputs, model_dir, root / "plain"


def test_batch_writes_the_same_label_maps_and_records_a_bad_file_as_a_failed_row(
    model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    inputs, model_dir, plain = model
    result = run_cli("predict", model_dir, inputs, "-o", tmp_path / "out", "--batch")
    assert result.exit_code == 1, result.output
    assert "2 of 8 case(s) failed" in result.stderr
    assert_same_label_maps(plain, tmp_path / "out")
    rows = manifest_rows(tmp_path / "out")
    assert list(rows[0]) == list(COLUMNS)
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in inputs.iterdir())
    failed = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "failed"}
    assert set(failed) == {"broken.png", "volume.nii.gz"}
    assert "broken.png: cannot read image" in failed["broken.png"]
    assert "3D image" in failed["volume.nii.gz"] and "\n" not in failed["volume.nii.gz"]
    weights = model_hash(model_dir, mirror=False, save_probabilities=False, output_format="auto")
    assert {r["model"] for r in rows} == {case_hash(weights, r["path"].split(";")) for r in rows}
    assert all(Path(r["output"]).is_file() for r in rows if r["status"] == "done")


def test_a_second_run_skips_what_is_done_and_redoes_the_rest(model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    inputs, model_dir, plain = model
    cases = {c: f for c, f in cases_of(inputs).items() if c in ("case_000", "case_001", "case_002")}
    options = SpecialistRunner(str(model_dir))
    first = run_batch(options, cases, tmp_path / "out")
    assert (first.done, first.failed, first.skipped) == (3, 0, 0)
    (tmp_path / "out" / "case_002.png").unlink()  # as if the first run had been killed before this case
    again = run_batch(options, cases, tmp_path / "out")
    assert (again.done, again.failed, again.skipped) == (1, 0, 2)
    for name in ("case_000.png", "case_001.png", "case_002.png"):
        assert (tmp_path / "out" / name).read_bytes() == (plain / name).read_bytes()
    assert len(manifest_rows(tmp_path / "out")) == 3
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    (other / "plan.json").write_text((other / "plan.json").read_text() + "\n")  # another plan: another hash
    redone = run_batch(SpecialistRunner(str(other)), cases, tmp_path / "out")
    assert (redone.done, redone.skipped) == (3, 0)
    weights = SpecialistRunner(str(other)).model()
    assert all(r["model"] == case_hash(weights, [r["path"]]) for r in manifest_rows(tmp_path / "out"))
    assert SpecialistRunner(str(other), mirror=True).model() != SpecialistRunner(str(other)).model()


def test_a_glob_and_a_list_of_paths_are_inputs(model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    inputs, model_dir, plain = model
    listing = tmp_path / "cases.csv"
    listing.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(sorted(inputs.glob("case_*")))))
    assert run_cli("predict", model_dir, listing, "-o", tmp_path / "listed", "--batch").exit_code == 0
    assert_same_label_maps(plain, tmp_path / "listed")
    assert run_cli("predict", model_dir, str(inputs / "case_*.png"), "-o", tmp_path / "globbed").exit_code == 0
    assert_same_label_maps(plain, tmp_path / "globbed")


def test_refusals_are_one_line_before_any_work(
    model: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs, model_dir, _ = model
    out = tmp_path / "out"
    assert_one_error_line(run_cli("predict", model_dir, inputs, "-o", out, "--workers", "2"), "--ray")
    out.mkdir()
    (out / "manifest.csv").write_text("a,b\n1,2\n")
    assert_one_error_line(run_cli("predict", model_dir, inputs, "-o", out, "--batch"), "not a medseg manifest")
    assert_one_error_line(run_cli("predict", model_dir, str(tmp_path / "*.png"), "-o", out), "matches no file")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert_one_error_line(run_cli("predict", model_dir, inputs, "-o", tmp_path / "r", "--ray"), "medseg[ray]")
    assert not (tmp_path / "r").exists()


def test_an_input_replaced_after_its_label_map_is_done_again(model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    given, model_dir, _ = model
    inputs = copied_inputs(given, tmp_path / "in", 3)
    options = SpecialistRunner(str(model_dir))
    first = run_batch(options, cases_of(inputs), tmp_path / "out")
    assert first.done == len(cases_of(inputs))
    replaced = sorted(inputs.iterdir())[0]
    shutil.copyfile(sorted(inputs.iterdir())[1], replaced)  # same name, new content, newer than its label map
    again = run_batch(options, cases_of(inputs), tmp_path / "out")
    assert (again.done, again.skipped) == (1, first.done - 1)


def test_an_input_replaced_by_an_older_file_is_done_again(model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Issue: only modification times were compared, so an input replaced by an older copy (cp -p, touch -d 2020)
    kept the label map of the file it replaced."""
    given, model_dir, _ = model
    inputs = copied_inputs(given, tmp_path / "in", 3)
    options = SpecialistRunner(str(model_dir))
    assert run_batch(options, cases_of(inputs), tmp_path / "out").done == 3
    first, second = sorted(inputs.iterdir())[:2]
    copy = tmp_path / "copy.png"
    shutil.copyfile(second, copy)
    os.utime(copy, (1577836800, 1577836800))  # 2020: older than the label map
    os.replace(copy, first)
    again = run_batch(options, cases_of(inputs), tmp_path / "out")
    assert (again.done, again.skipped) == (1, 2)
    out = tmp_path / "out"
    assert (out / "case_000.png").read_bytes() == (out / "case_001.png").read_bytes()
    os.utime(first, (1262304000, 1262304000))  # the same bytes, another time (touch -d 2010): done again too
    assert run_batch(options, cases_of(inputs), tmp_path / "out").done == 1


def test_label_maps_another_run_wrote_after_the_manifest_are_done_again(
    model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Issue: a batch run with model A, a plain run with model B into the same OUT, then the batch run with A said
    "done before" and kept B's label maps."""
    inputs, model_dir, plain = model
    cases = {c: f for c, f in cases_of(inputs).items() if c in ("case_000", "case_001")}
    out = tmp_path / "out"
    assert run_batch(SpecialistRunner(str(model_dir)), cases, out).done == 2
    _, other = make_model(tmp_path / "b", seed=1)
    for files in cases.values():
        assert run_cli("predict", other, files[0], "-o", out).exit_code == 0
    assert (out / "case_000.png").read_bytes() != (plain / "case_000.png").read_bytes()
    again = run_batch(SpecialistRunner(str(model_dir)), cases, out)
    assert (again.done, again.skipped) == (2, 0)
    assert (out / "case_000.png").read_bytes() == (plain / "case_000.png").read_bytes()
    assert run_batch(SpecialistRunner(str(model_dir)), cases, out).skipped == 2


def test_a_case_that_fails_on_a_rerun_loses_its_old_label_map(model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Issue: a case failing on a rerun (its input truncated since) kept the label map of the earlier run."""
    given, model_dir, _ = model
    inputs = copied_inputs(given, tmp_path / "in", 2)
    out = tmp_path / "out"
    assert run_batch(SpecialistRunner(str(model_dir)), cases_of(inputs), out).done == 2
    (out / "notes.txt").write_text("mine")
    first = sorted(inputs.iterdir())[0]
    first.write_bytes(first.read_bytes()[:40])  # truncated
    again = run_batch(SpecialistRunner(str(model_dir)), cases_of(inputs), out)
    assert (again.done, again.failed, again.skipped) == (0, 1, 1)
    assert sorted(p.name for p in out.iterdir()) == ["case_001.png", "manifest.csv", "notes.txt"]
    assert [r["status"] for r in manifest_rows(out)] == ["failed", "done"]


def test_an_output_folder_inside_the_inputs_is_not_read_as_inputs(
    model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Issue: ``predict model pin3 -o pin3/out --batch`` was accepted, then refused on resume ("output folder holds
    the inputs"): the label maps' folder was listed as a DICOM series case."""
    given, model_dir, plain = model
    inputs = copied_inputs(given, tmp_path / "pin3", 2)
    for _ in range(2):
        result = run_cli("predict", model_dir, inputs, "-o", inputs / "out", "--batch")
        assert result.exit_code == 0, result.output
    assert "2 done before of 2 case(s)" in result.stdout
    assert len(manifest_rows(inputs / "out")) == 2
    assert run_cli("predict", model_dir, str(inputs / "**" / "*.png"), "-o", inputs / "out").exit_code == 0
    assert (inputs / "out" / "case_000.png").read_bytes() == (plain / "case_000.png").read_bytes()


def test_an_unreachable_ray_address_is_refused_before_anything_is_written(
    model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    given, model_dir, _ = model
    with pytest.raises(MedsegError, match=r"no Ray cluster answers at 127\.0\.0\.1:1"):
        options = SpecialistRunner(str(model_dir))
        run_batch(options, cases_of(given), tmp_path / "out", use_ray=True, ray_address="127.0.0.1:1")
    assert not (tmp_path / "out").exists()


def test_a_ray_address_that_is_not_ray_leaves_nothing_behind(
    model: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue: an address that accepts TCP but is not Ray failed after ~30 s (exit 2) leaving OUT and a manifest
    of pending cases."""
    ray = pytest.importorskip("ray")
    given, model_dir, _ = model
    cases = {c: f for c, f in cases_of(given).items() if c in ("case_000", "case_001")}

    def refused(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Could not find any running Ray instance")  # what ray.init says after its retries

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with socket.socket() as server:  # accepts TCP, is not Ray
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        out = tmp_path / "out"
        result = run_cli("predict", model_dir, given / "case_000_0000.png", "-o", out, "--ray-address", address)
        assert_one_error_line(result, f"cannot start or reach Ray at {address}")
        assert not out.exists()
        assert run_batch(SpecialistRunner(str(model_dir)), {"case_000": cases["case_000"]}, out).done == 1
        before = (out / "manifest.csv").read_bytes()
        with pytest.raises(MedsegError, match="cannot start or reach Ray"):
            run_batch(SpecialistRunner(str(model_dir)), cases, out, use_ray=True, ray_address=address)
    assert (out / "manifest.csv").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["case_000.png", "manifest.csv"]


def test_a_manifest_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Issue 22: a manifest saved by a spreadsheet as "CSV UTF-8" starts with a BOM; its rows are still read."""
    path = tmp_path / "manifest.csv"
    write_manifest(path, [Row("/in/a.png", "/out/a.png", "done", 1.5, "", "abc")])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_manifest(path) == {"/in/a.png": Row("/in/a.png", "/out/a.png", "done", 1.5, "", "abc")}


def test_every_input_is_listed_pending_from_the_start(model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    inputs, model_dir, _ = model
    cases = {c: f for c, f in cases_of(inputs).items() if c.startswith("case_")}
    seen: list[list[dict[str, str]]] = []
    run_batch(
        SpecialistRunner(str(model_dir)),
        cases,
        tmp_path / "out",
        on_row=lambda row: seen.append(manifest_rows(tmp_path / "out")),
    )
    assert len(seen[0]) == len(cases)  # at the first case's row, the manifest written as the run started
    assert {r["status"] for r in seen[0]} == {"pending"}
    assert {r["status"] for r in manifest_rows(tmp_path / "out")} == {"done"}


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_goes_on(
    model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    inputs, model_dir, _ = model
    out = tmp_path / "out"
    out.mkdir()
    (out / ".medseg.lock").write_text(f"{os.getppid()}@{socket.gethostname().replace('.', '_')}\n")
    result = run_cli("predict", model_dir, inputs, "-o", out, "--batch")
    assert_one_error_line(result, "another medseg run", f"process {os.getppid()}")
    assert [p.name for p in out.iterdir()] == [".medseg.lock"]


def test_a_batch_run_keeps_the_staging_folder_of_a_live_run_and_a_plain_run_takes_the_lock(
    model: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Issue: a plain run beside a batch run lost its label maps when the batch run removed every staging folder."""
    inputs, model_dir, plain = model
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".medseg-staging.{os.getppid()}@{HOST}.abc"  # pytest's parent: alive
    dead = out / f".medseg-staging.{ended_pid()}@{HOST}.abc"
    for folder in (live, dead):
        folder.mkdir()
        (folder / "case.png").write_bytes(b"x")
    cases = {c: f for c, f in cases_of(inputs).items() if c in ("case_000", "case_001")}
    assert run_batch(SpecialistRunner(str(model_dir)), cases, out).done == 2
    assert live.is_dir() and not dead.exists()
    shutil.rmtree(live)
    (out / ".medseg.lock").write_text(f"{os.getppid()}@{HOST}\n")  # a live batch run's lock
    result = run_cli("predict", model_dir, inputs / "case_002_0000.png", "-o", out)
    assert_one_error_line(result, "another medseg run", f"process {os.getppid()}")
    assert not (out / "case_002.png").exists()
    (out / ".medseg.lock").unlink()
    seen: list[str] = []
    engine = SpecialistEngine.from_pretrained(model_dir)
    predict_folder(engine.predict, cases, out, on_case=lambda: seen.append((out / ".medseg.lock").read_text()))
    assert seen == [f"{os.getpid()}@{HOST}\n"] * 2 and not (out / ".medseg.lock").exists()
    assert (out / "case_000.png").read_bytes() == (plain / "case_000.png").read_bytes()
