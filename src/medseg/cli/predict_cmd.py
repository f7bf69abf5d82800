"""``medseg predict MODEL_DIR INPUT -o OUT``: segment a file or a folder with a trained supervised model."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from medseg.cli.common import out, progress_bar, user_errors
from medseg.errors import MedsegError


@user_errors
def predict(
    model_dir: Path = typer.Argument(..., help="Folder written by 'medseg train'."),
    input_path: Path = typer.Argument(..., metavar="INPUT", help="An image, a DICOM series folder, or a folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder (label maps named by case)."),
    mirror: bool = typer.Option(False, "--mirror", help="Mirroring test-time augmentation (2^n passes)."),
    save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write probabilities/<case>.npz."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Segment a file or a folder with a model from 'medseg train'.

    Label maps in each input's geometry and format (NIfTI for DICOM/MRC input, PNG for JPEG); a folder's
    files are grouped into cases by their _0000, _0001 channel suffixes."""
    import numpy as np

    from medseg.data.cases import load_channels
    from medseg.inference.supervised_predictor import SupervisedPredictor
    from medseg.io import format_of, label_path_for, save

    if device not in ("cpu", "cuda"):
        raise MedsegError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MedsegError("--device cuda asked for, but this torch build sees no CUDA device")
    if output.exists() and not output.is_dir():
        raise MedsegError("is a file; -o needs a folder", output)
    if save_probabilities and (output / "probabilities").exists() and not (output / "probabilities").is_dir():
        raise MedsegError("is a file; --save-probabilities writes a folder there", output / "probabilities")
    predictor = SupervisedPredictor(model_dir, device)
    cases = _cases(input_path)
    targets = {case: label_path_for(files[0], output, case) for case, files in cases.items()}
    inputs = tuple(p for files in cases.values() for p in files)
    resolved_inputs = {p.resolve() for p in inputs}
    for case, files in cases.items():  # every input and output is checked before anything is written
        format_of(targets[case])
        if targets[case].is_dir():
            raise MedsegError("is a folder; the label map for this case would go there", targets[case])
        if targets[case].resolve() in resolved_inputs:
            raise MedsegError("refusing to overwrite an input file (choose another -o)", targets[case])
        predictor.check(load_channels(files))
    started = time.perf_counter()
    with progress_bar("predicting", len(cases)) as advance:
        for case, files in cases.items():
            image = load_channels(files)
            prediction = predictor.predict(image, mirror=mirror)
            save(image.with_array(prediction.labels), targets[case], protect=inputs)
            if save_probabilities:
                names = {v: k for k, v in predictor.plan.labels.items()}
                path = output / "probabilities" / f"{case}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(
                    path,
                    probabilities=prediction.probabilities.astype(np.float16),
                    labels=np.array([names.get(v, str(v)) for v in range(prediction.probabilities.shape[0])]),
                )
            advance()
    seconds = time.perf_counter() - started
    out.print(f"{len(cases)} label map(s) in {output} ({seconds / max(len(cases), 1):.2f} s per case)", soft_wrap=True)


def _cases(input_path: Path) -> dict[str, list[Path]]:
    """Cases of an input: one file; one DICOM series folder; or a folder of files (channels grouped by their
    ``_0000`` suffixes) and of DICOM series sub-folders."""
    from medseg.io import case_of
    from medseg.io.formats import is_image_file, split_channel, split_extension

    if not input_path.exists():
        raise MedsegError("no such file or folder", input_path)
    if input_path.is_file():
        return {case_of(input_path): [input_path]}
    entries = sorted(p for p in input_path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and is_image_file(p) and not p.name.lower().endswith(".dcm")]
    series = [p for p in entries if p.is_dir()]
    if not files and not series:
        return {case_of(input_path): [input_path]}  # a DICOM series (load names the problem if it is not one)
    cases: dict[str, list[Path]] = {}
    for path in files:
        stem = split_extension(path)[0]
        split = split_channel(stem)
        cases.setdefault(split[0] if split else stem, []).append(path)
    for folder in series:
        cases.setdefault(folder.name, []).append(folder)
    return cases
