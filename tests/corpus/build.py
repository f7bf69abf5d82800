"""Build the corpus's files into a folder, and measure what reading the hostile ones costs.

    PYTHONPATH=src python tests/corpus/build.py OUT            # every case's file (or folder) in OUT/<maker>/
    PYTHONPATH=src python tests/corpus/build.py OUT --measure  # and a markdown table of the hostile reads

The files are small (the largest, a gzip bomb, about 2 MB); the tests build the same files in pytest's tmp_path.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fixtures, corpus

from corpus import makers
from corpus.probe import LIMIT, read_in_subprocess

# maker -> MEDSEG_MAX_VOXELS for the read
HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nifti_claims_1e9_voxels": (makers.nifti_claims_1e9_voxels, LIMIT),
    "nifti_claims_1e9_voxels (limit 1e10)": (makers.nifti_claims_1e9_voxels, "1e10"),
    "gzip_bomb_nifti": (makers.gzip_bomb_nifti, LIMIT),
    "gzip_bomb_behind_small_nifti": (makers.gzip_bomb_behind_small_nifti, LIMIT),
    "nifti_extension_bomb (limit 1e10)": (makers.nifti_extension_bomb, "1e10"),
    "dicom_rows_60000": (makers.dicom_rows_60000, LIMIT),
    "dicom_100000_frames": (makers.dicom_100000_frames, LIMIT),
    "dicom_series_rows_30000": (makers.dicom_series_rows_30000, LIMIT),
    "png_bomb 12000^2": (partial(makers.png_bomb, side=12000), LIMIT),
    "png_bomb 60000^2 (limit 1e10)": (partial(makers.png_bomb, side=60000), "1e10"),
    "nrrd_header_huge": (makers.nrrd_header_huge, LIMIT),
    "mha_header_huge": (makers.mha_header_huge, LIMIT),
    "npy_header_huge": (makers.npy_header_huge, LIMIT),
}
OTHER = [
    makers.two_series_one_folder,
    makers.series_missing_slice,
    makers.series_per_slice_rescale,
    makers.series_gantry_tilt,
    makers.series_text_position,
    makers.series_two_echoes,
    makers.ct_series_few_values,
    makers.float_labels_near_integers,
    makers.float_labels_fractional,
    makers.mask_0_255_png,
    makers.mask_jpeg,
    makers.label_one_slice_volume,
    makers.npy_mask_h_w_1,
    makers.nifti_4d_cine,
    makers.nifti_with_nan,
    makers.nifti_sform_qform_disagree,
    makers.truncated_nifti,
    makers.nifti_vox_offset_zero,
    makers.png_image_12x16,
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--measure", action="store_true", help="read each hostile file in a subprocess")
    args = parser.parse_args()
    rows = []
    for name, (make, limit) in HOSTILE.items():
        folder = args.out / name.split(" ")[0].replace("^", "_") / limit
        folder.mkdir(parents=True, exist_ok=True)
        path = make(folder)
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
        if args.measure:
            result = read_in_subprocess(path, limit)
            growth = float(result["peak_mb"]) - float(result["before_mb"])  # type: ignore[arg-type]
            outcome = str(result["outcome"]).replace(str(path), path.name).replace("|", "/")
            peak = f"{result['peak_mb']:.0f} MB"
            rows.append(f"| {name} | {size / 1024:.1f} KB | {limit} | {peak} | {growth:.1f} MB | {outcome} |")
    for make in OTHER:
        folder = args.out / make.__name__
        folder.mkdir(parents=True, exist_ok=True)
        make(folder)
    (args.out / "rgba").mkdir(exist_ok=True)
    makers.rgba_png(args.out / "rgba", opaque=True)
    makers.rgba_png(args.out / "rgba", opaque=False)
    if rows:
        print("| hostile file | on disk | MEDSEG_MAX_VOXELS | peak RSS | added by the read | outcome |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
