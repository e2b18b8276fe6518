"""DRIVE at equal training wall time: the residual diffusion segmenter against the UNet and the UNet's own
uncertainty baselines (softmax entropy, test-time flips, MC dropout), scored against both human observers.

    python tasks/segmentation/drive_uncertainty.py --unet CKPT --residual [LABEL=]CKPT [--residual ...]
        [--predictor CKPT] [--mc-dropout CKPT] [--ce-unet CKPT] [--row NAME CKPT ARGS ...]
        [--out runs/drive_uncertainty]
    python tasks/segmentation/drive_uncertainty.py --ce-unet CKPT --out DIR    # one baseline's rows alone

Every row is ``medidiff infer`` + ``medidiff evaluate --uncertainty --rater <2nd observer>`` on the 20 test
images inside the field-of-view mask (the commands a user runs; see tasks/segmentation/README.md for how the
checkpoints were trained). Uncertainty is the predictive entropy of the (ensemble-mean) probability.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import (
    evaluate_segmentation,
    machine,
    run_uncertainty_rows,
    uncertainty_table,
    unet_and_residual_plan,
)  # noqa: E402

DRIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "drive" / "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=Path)
    parser.add_argument("--residual", action="append", default=[], metavar="[LABEL=]CKPT",
                        help="a residual diffusion checkpoint; rows are named LABEL_nfe<N> (default label: residual)")
    parser.add_argument("--mc-dropout", type=Path)
    parser.add_argument("--predictor", type=Path, help="the residual model's stage-1 UNet, scored alone")
    parser.add_argument("--ce-unet", type=Path, help="a UNet trained on cross-entropy alone (dice_weight 0): the "
                        "calibration baseline, alone and with 4 flips")
    parser.add_argument("--row", action="append", nargs=3, default=[], metavar=("NAME", "CKPT", "ARGS"),
                        help="a further row: CKPT through medidiff infer with ARGS (one quoted string, e.g. "
                             "'--steps 1 --flips 4')")
    parser.add_argument("--out", type=Path, default=Path("runs/drive_uncertainty"))
    args = parser.parse_args()
    if not (args.unet or args.residual or args.mc_dropout or args.ce_unet or args.row):
        parser.error("give at least one checkpoint")
    baselines = []
    if args.mc_dropout:
        baselines += [("mc_dropout_unet", args.mc_dropout, []),
                      ("mc_dropout_unet_8", args.mc_dropout, ["--ensemble", "8"])]
    if args.ce_unet:
        baselines += [("unet_ce", args.ce_unet, []), ("unet_ce_tta4", args.ce_unet, ["--ensemble", "4"])]
    baselines += [(name, Path(ckpt), shlex.split(infer_args)) for name, ckpt, infer_args in args.row]
    plan = unet_and_residual_plan(args.unet, args.predictor, args.residual, (1, 2, 5, 10), (1, 2),
                                  baselines=baselines)
    rows = run_uncertainty_rows(plan, DRIVE / "images", DRIVE / "1st_manual", args.out, "drive",
                                region=DRIVE / "mask", raters=(DRIVE / "2nd_manual",))
    observer = {"row": "2nd_observer", "args": "", "seconds": 0.0,
                **evaluate_segmentation(DRIVE / "2nd_manual", DRIVE / "1st_manual", args.out / "2nd_observer.json",
                                        "drive", region=DRIVE / "mask", uncertainty=False)}
    print("\n" + uncertainty_table([*rows, observer], machine(), "infer time (20 images)"))
    (args.out / "rows.json").write_text(json.dumps({"machine": machine(), "rows": [*rows, observer]}, indent=1))


if __name__ == "__main__":
    main()
