"""Supervised training on a tiny synthetic dataset: files written, learning, resume (also after kill -9),
splits, and two-process DDP with torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dataset_builders import make_nnunet_2d_shapes
from medseg.data import open_dataset
from medseg.engine.supervised import TrainOptions, train
from medseg.engine.supervised.split import make_split
from medseg.errors import MedsegError
from medseg.planning import Plan, fingerprint_dataset, make_plan, write_plan


def _small_plan(dataset: Path, model: str = "unet", iterations: int = 4) -> Plan:
    plan = make_plan(fingerprint_dataset(open_dataset(dataset)), model, memory_gb=4, profile="cpu")
    plan.training.iterations_per_epoch = iterations
    plan.training.batch_size = 4
    plan.training.val_cases_per_epoch = 2
    plan.training.learning_rate = 3e-3
    return plan


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_nnunet_2d_shapes(tmp_path_factory.mktemp("data") / "Shapes", cases=8)


def test_training_writes_a_run_and_learns(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(TrainOptions(dataset, out, plan=_small_plan(dataset, iterations=15), epochs=4))
    assert {p.name for p in out.iterdir()} >= {"plan.json", "split.json", "checkpoint.pt", "model.pt", "train.json"}
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    record = json.loads((out / "train.json").read_text())
    assert record["epochs"] == 4 and len(record["history"]) == 4
    losses = [r["loss"] for r in record["history"]]
    assert losses[-1] < losses[0]
    assert result.val_dice["disc"] > 0.5  # a bright disc on a flat background is easy


def test_resume_continues_the_same_run(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(TrainOptions(dataset, out, plan=_small_plan(dataset), epochs=2))
    first = json.loads((out / "train.json").read_text())["history"]
    with pytest.raises(MedsegError, match="--resume"):
        train(TrainOptions(dataset, out, plan=_small_plan(dataset), epochs=2))
    train(TrainOptions(dataset, out, epochs=3, resume=True))
    history = json.loads((out / "train.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[:2] == first
    with pytest.raises(MedsegError, match="already trained 3 epochs"):
        train(TrainOptions(dataset, out, epochs=3, resume=True))  # nothing left to do: no epoch at learning rate 0
    with pytest.raises(MedsegError, match=r"memory budget is 0\.01 GB"):  # the run's batch is kept: checked, refused
        train(TrainOptions(dataset, out, epochs=4, resume=True, memory_gb=0.01))
    assert json.loads((out / "train.json").read_text())["history"] == history


def test_a_time_budget_ends_the_epoch_it_runs_out_in_and_a_spent_budget_trains_no_more(
    dataset: Path, tmp_path: Path
) -> None:
    """Issue 19: one process uses its whole --minutes (the epoch where it runs out is cut short, validated and
    saved); --resume of a spent budget trains nothing more, one with budget left trains on."""
    out = tmp_path / "run"
    plan = _small_plan(dataset, iterations=400)  # an epoch far longer than the budget
    started = time.perf_counter()
    result = train(TrainOptions(dataset, out, plan=plan, epochs=5, minutes=0.1))
    assert time.perf_counter() - started < 60
    history = json.loads((out / "train.json").read_text())["history"]
    assert len(history) == 1 and 1 <= history[0]["iterations"] < 400
    assert result.training_seconds >= 6.0
    with pytest.raises(MedsegError, match="already trained 1 epochs"):
        train(TrainOptions(dataset, out, epochs=50, minutes=0.1, resume=True))
    train(TrainOptions(dataset, out, epochs=50, minutes=0.2, resume=True))
    history = json.loads((out / "train.json").read_text())["history"]
    assert len(history) == 2 and history[1]["iterations"] < 400


@pytest.mark.parametrize("model", ["vnet", "transunet"])
def test_other_models_train(dataset: Path, tmp_path: Path, model: str) -> None:
    result = train(TrainOptions(dataset, tmp_path / model, plan=_small_plan(dataset, model, iterations=2), epochs=1))
    assert result.epochs == 1 and set(result.val_dice) == {"disc", "bar"}


def test_kill_9_loses_at_most_the_running_epoch(dataset: Path, tmp_path: Path) -> None:
    plan_path = write_plan(_small_plan(dataset, iterations=2), tmp_path / "plan.json")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "medseg.cli", "train", str(dataset), "-o", str(out), "--plan", str(plan_path)]
    process = subprocess.Popen([*command, "--epochs", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    saved = 0
    while time.time() < deadline and saved < 2:
        time.sleep(0.5)
        if (out / "checkpoint.pt").exists():
            saved = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["epoch"]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert saved >= 2, process.stderr.read().decode() if process.stderr else ""
    kept = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["epoch"]
    assert kept >= saved
    done = subprocess.run(
        [*command[:-2], "--resume", "--epochs", str(kept + 1)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "train.json").read_text())["history"]
    assert [r["epoch"] for r in history] == list(range(1, kept + 2))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_torchrun_two_processes_stay_in_sync(dataset: Path, tmp_path: Path) -> None:
    plan_path = write_plan(_small_plan(dataset, iterations=3), tmp_path / "plan.json")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "medseg.cli", "train", str(dataset), "-o", str(out), "--plan", str(plan_path), "--epochs", "1000",
            "--minutes", "0.3",  # stops by time: the learning rate follows the clock, rank 0's for every rank
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "train.json").read_text())
    assert record["processes"] == 2
    hashes = record["rank_parameter_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    # Each rank drew its own patches: 2 ranks x 3 iterations x batch 4 per epoch.
    assert record["epochs"] >= 2  # at least one epoch with a learning rate set by the clock
    from medseg.inference.supervised_predictor import SupervisedPredictor
    from medseg.io import load

    image = load(next((dataset / "imagesTr").iterdir()))
    prediction = SupervisedPredictor(out).predict(image)
    assert prediction.labels.shape == image.shape


def test_split_is_seeded_and_checked() -> None:
    names = [f"c{i}" for i in range(10)]
    a, b = make_split(names, fold=1, seed=3), make_split(names, fold=1, seed=3)
    assert a == b and len(a["val"]) == 2 and not set(a["val"]) & set(a["train"])
    folds = [set(make_split(names, fold=f)["val"]) for f in range(5)]
    assert set().union(*folds) == set(names)
    low = make_split(names, num_labelled=3)
    assert len(low["train"]) == 3 and low["val"] == make_split(names)["val"]
    assert make_split(names, val_cases=["c1", "c2"])["val"] == ["c1", "c2"]
    for bad in ({"val_cases": ["nope"]}, {"num_labelled": 9}, {"fold": 5}, {"folds": 1}):
        with pytest.raises(MedsegError):
            make_split(names, **bad)  # type: ignore[arg-type]


def test_mps_is_refused_where_there_is_none_and_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg.engine.supervised.train import _start_distributed

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MedsegError, match="no MPS device"):
        _start_distributed("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MedsegError, match="under torchrun use cuda or cpu"):
        _start_distributed("mps")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _start_distributed("mps").device == torch.device("mps")
