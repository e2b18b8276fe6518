"""TotalSegmentator CT organs at equal training wall time: residual diffusion over a 3D UNet against the UNet and
its test-time-flip ensemble, on the card's test scan (the DICOM series), with Dice, NSD, HD95 and the uncertainty
metrics.

    python tasks/segmentation/totalseg_3d_uncertainty.py --unet CKPT --residual [LABEL=]CKPT [--residual ...]
        [--predictor CKPT] [--out runs/totalseg_3d_uncertainty]

Every row is ``medidiff infer`` + ``medidiff evaluate --card totalseg_ct --uncertainty`` (one rater, and the
labels are TotalSegmentator's own predictions, not manual). The DICOM series is written once as NIfTI (its
geometry kept) so that the rows share one input folder; the label map is copied beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from medidiff import io
from medidiff.data.cards import load_card

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import machine, run_uncertainty_rows, uncertainty_table, unet_and_residual_plan  # noqa: E402


def test_case(out: Path) -> tuple[Path, Path]:
    """``(image_dir, label_dir)`` holding the card's test scan as ``ct_dicom.nii.gz`` and its label map."""
    case = load_card("totalseg_ct").splits["test"].cases[0]
    images, labels = out / "cases" / "image", out / "cases" / "label"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    if not (images / "ct_dicom.nii.gz").exists():
        io.write(io.read(case["image"]), images / "ct_dicom.nii.gz")
    shutil.copyfile(case["label"], labels / "ct_dicom.nii.gz")
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=Path, required=True)
    parser.add_argument("--residual", action="append", required=True, metavar="[LABEL=]CKPT")
    parser.add_argument("--predictor", type=Path, help="the residual model's stage-1 UNet, scored alone")
    parser.add_argument("--out", type=Path, default=Path("runs/totalseg_3d_uncertainty"))
    args = parser.parse_args()
    images, labels = test_case(args.out)
    plan = unet_and_residual_plan(args.unet, args.predictor, args.residual, (1, 2, 5), (1,))
    # 30 % of the series is air at -1024..-1001 HU (7.6 % in training): clipped to the window's -1000, nothing lost
    plan = [(name, ckpt, [*infer_args, "--allow", "clipping"]) for name, ckpt, infer_args in plan]
    rows = run_uncertainty_rows(plan, images, labels, args.out, "totalseg_ct")
    print("\n" + uncertainty_table(rows, machine(), "infer time"))
    (args.out / "rows.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
