"""Picture for tasks/segmentation/README.md: image | prediction | uncertainty | where the two observers disagree,
for one DRIVE test image, from the folders ``drive_uncertainty.py`` wrote.

    python tasks/segmentation/plot_uncertainty.py --run runs/drive_uncertainty --row residual_nfe2_ens4 \
        [--baseline unet_tta4] [--case 01] [--out tasks/segmentation/drive_uncertainty.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medidiff.io import read

DRIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "drive" / "test"


def panel(path: Path, kind: str = "image") -> np.ndarray:
    array = np.asarray(read(path, kind=kind))
    return array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/drive_uncertainty"))
    parser.add_argument("--row", default="residual_nfe2_ens4")
    parser.add_argument("--baseline", default="unet_tta4")
    parser.add_argument("--case", default="01")
    parser.add_argument("--out", type=Path, default=Path("tasks/segmentation/drive_uncertainty.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case = args.case
    image = panel(DRIVE / "images" / f"{case}_test.tif") / 255.0
    first = panel(DRIVE / "1st_manual" / f"{case}_manual1.gif", "label") > 0
    second = panel(DRIVE / "2nd_manual" / f"{case}_manual2.gif", "label") > 0
    fov = panel(DRIVE / "mask" / f"{case}_test_mask.gif", "label") > 0
    pred = panel(args.run / args.row / f"{case}_test.nii.gz", "label") > 0
    entropy = panel(args.run / args.row / "entropy" / f"{case}_test.nii.gz")
    baseline = panel(args.run / args.baseline / "entropy" / f"{case}_test.nii.gz")
    rows, cols = slice(200, 400), slice(330, 530)  # a patch beside the optic disc: thin vessels, where they differ
    error = np.zeros((*pred.shape, 3))
    error[pred & first], error[pred & ~first], error[~pred & first] = (1, 1, 1), (1, 0.2, 0.2), (0.2, 0.6, 1)
    disagree = np.zeros((*pred.shape, 3))
    disagree[first & second], disagree[first ^ second] = (0.6, 0.6, 0.6), (1, 0.8, 0)
    panels = [(image, f"image {case}, rows 200-400, columns 330-530", None),
              (error, f"{args.row}: white hit, red extra, blue missed", None),
              (entropy * fov, f"uncertainty: {args.row}", "magma"),
              (baseline * fov, f"uncertainty: {args.baseline}", "magma"),
              (disagree, "observers: grey agree, yellow disagree", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.3))
    for ax, (array, title, cmap) in zip(axes, panels):
        ax.imshow(array[rows, cols], cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
