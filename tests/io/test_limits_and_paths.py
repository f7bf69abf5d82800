"""`medseg.io.limits` (the voxel limit) and `medseg.io.paths` (inputs that must exist, outputs that must be
writable); the corpus (tests/corpus) holds the hostile files themselves."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import Image, load, save
from medseg.io.limits import ENV_MAX_VOXELS, check_voxels, default_max_voxels, max_voxels
from medseg.io.paths import check_exists, check_output, link_problem


def test_default_limit_follows_the_machines_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_MAX_VOXELS, raising=False)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert max_voxels() == default_max_voxels() == memory // 32


@pytest.mark.parametrize(("text", "value"), [("1e9", 10**9), ("2_000_000", 2_000_000), (" 123 ", 123)])
def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch, text: str, value: int) -> None:
    monkeypatch.setenv(ENV_MAX_VOXELS, text)
    assert max_voxels() == value


@pytest.mark.parametrize("text", ["lots", "0", "-5"])
def test_a_bad_limit_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(ENV_MAX_VOXELS, text)
    with pytest.raises(MedsegError, match=f"{ENV_MAX_VOXELS}=.* is not a positive number"):
        max_voxels()


def test_check_voxels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_MAX_VOXELS, "1000")
    assert check_voxels((10, 10, 10), tmp_path) == 1000
    with pytest.raises(MedsegError, match=r"declares 10 x 10 x 11 = 1.1e\+03 voxels, more than the limit of 1e\+03"):
        check_voxels((10, 10, 11), tmp_path)


def test_a_file_just_over_the_limit_is_refused_and_one_within_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    save(Image(np.zeros((4, 5, 6), np.int16)), tmp_path / "v.nii.gz")
    save(Image(np.zeros((5, 6), np.uint8)), tmp_path / "p.png")
    np.save(tmp_path / "a.npy", np.zeros((4, 5, 6), np.int16))
    monkeypatch.setenv(ENV_MAX_VOXELS, "120")
    assert load(tmp_path / "v.nii.gz").shape == (4, 5, 6)
    monkeypatch.setenv(ENV_MAX_VOXELS, "119")
    for name in ("v.nii.gz", "a.npy"):
        with pytest.raises(MedsegError, match="more than the limit of 119"):
            load(tmp_path / name)
    monkeypatch.setenv(ENV_MAX_VOXELS, "29")
    with pytest.raises(MedsegError, match="more than the limit of 29"):
        load(tmp_path / "p.png")


def test_symbolic_links(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert link_problem(tmp_path / "loop") is not None and "loop" in str(link_problem(tmp_path / "loop"))
    assert link_problem(tmp_path / "loop" / "below") is not None
    assert "dangling symbolic link to" in str(link_problem(tmp_path / "dangling"))
    assert link_problem(tmp_path) is None and link_problem(tmp_path / "absent") is None
    with pytest.raises(MedsegError, match="symbolic link loop"):
        check_exists(tmp_path / "loop")
    with pytest.raises(MedsegError, match="no such file"):
        check_exists(tmp_path / "absent")


def test_check_output(tmp_path: Path) -> None:
    check_output(tmp_path / "new" / "deeper")  # created later by the command; nothing made now
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".medseg-probe")]  # the probe is gone
    (tmp_path / "file.txt").write_text("x")
    check_output(tmp_path / "file.txt", folder=False)  # a file target may exist (save refuses inputs)
    with pytest.raises(MedsegError, match="is a file; -o needs a folder"):
        check_output(tmp_path / "file.txt")
    with pytest.raises(MedsegError, match="is a file, not a folder"):
        check_output(tmp_path / "file.txt" / "out")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(MedsegError, match="symbolic link loop"):
        check_output(tmp_path / "loop" / "out")
    for kernel in ("/proc/medseg", "/sys/medseg/out"):
        with pytest.raises(MedsegError, match="kernel file system"):
            check_output(Path(kernel))
    for device in ("/dev/full", "/dev/null"):  # devices: not a file system's folder, not a file a result stays in
        for folder in (True, False):
            with pytest.raises(MedsegError, match=f"{device} is a character device, not a file or folder to hold"):
                check_output(Path(device), folder=folder)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(MedsegError, match="is a named pipe"):
        check_output(tmp_path / "pipe", folder=False)


def test_complex_valued_images_are_refused(tmp_path: Path) -> None:
    import nibabel as nib

    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.complex64), np.eye(4)), path)
    with pytest.raises(MedsegError, match="complex-valued voxels"):
        load(path)
