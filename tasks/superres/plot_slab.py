"""Through-plane view of the MNI152 x4 results: one coronal plane of the held-aside slab, 1 mm slices stacked
top to bottom, for the reference and each method's output (rows written by ``results.py --out DIR``).

    python tasks/superres/plot_slab.py --results runs/r7/sr_results2 --out tasks/superres/mni152_3d_x4_slab.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff import io

ROWS = {"reference": "cases/reference", "trilinear from the 4 mm input": "cases/trilinear",
        "cubic + DC": "cases/cubic_dc",
        "UNet + DC": "unet_dc", "diffusion + DC, 5 NFE": "diffusion_dc_nfe5"}


def coronal_strip(path: Path, plane: int) -> np.ndarray:
    """``(slices, width)`` of one coronal plane, superior at the top, drawn 2x wide and each slice 6 pixels tall."""
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    strip = volume[:, plane, ::-1].T
    return np.repeat(np.repeat(strip, 6, axis=0), 2, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plane", type=int, default=120, help="coronal index (0..232)")
    args = parser.parse_args()
    strips = []
    for name, folder in ROWS.items():
        strips.append(coronal_strip(next((args.results / folder).glob("*.nii.gz")), args.plane))
        strips.append(np.full((4, strips[-1].shape[1]), 255.0))  # white gap between rows
        print(f"row {len(strips) // 2}: {name}")
    io.write_png(np.concatenate(strips[:-1]), args.out, value_range=(0, 255))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
