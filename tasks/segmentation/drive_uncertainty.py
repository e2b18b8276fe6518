"""DRIVE at equal training wall time: the residual diffusion segmenter against the UNet and the UNet's own
uncertainty baselines (softmax entropy, test-time flips, MC dropout), scored against both human observers.

    python tasks/segmentation/drive_uncertainty.py --unet CKPT --residual CKPT [--mc-dropout CKPT]
        [--out runs/drive_uncertainty]

Every row is ``medidiff infer`` + ``medidiff evaluate --uncertainty --rater <2nd observer>`` on the 20 test
images inside the field-of-view mask (the commands a user runs; see tasks/segmentation/README.md for how the
checkpoints were trained). Uncertainty is the predictive entropy of the (ensemble-mean) probability.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medidiff.cli import main as medidiff
from medidiff.errors import MedidiffError
from medidiff.results import infer_unless_complete, machine

DRIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "drive" / "test"
METRICS = ("dice_mean", "nsd_mean", "hd95_mean", "ece", "brier", "nll", "error_auroc", "aurc", "ueo", "ged",
           "disagreement_auroc")


def evaluate(pred: Path, out: Path, uncertainty: bool = True) -> dict:
    argv = ["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(DRIVE / "1st_manual"),
            "--region", str(DRIVE / "mask"), "--card", "drive", "--out", str(out)]
    if uncertainty:
        argv += ["--uncertainty", "--rater", str(DRIVE / "2nd_manual")]
    if medidiff(argv):
        raise MedidiffError(f"evaluate failed for {pred}")
    summary = json.loads(out.read_text())["summary"]
    return {k: summary[k]["mean"] for k in METRICS if k in summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=Path, required=True)
    parser.add_argument("--residual", type=Path, required=True)
    parser.add_argument("--mc-dropout", type=Path)
    parser.add_argument("--predictor", type=Path, help="the residual model's stage-1 UNet, scored alone")
    parser.add_argument("--out", type=Path, default=Path("runs/drive_uncertainty"))
    args = parser.parse_args()
    plan = [("unet", args.unet, []), ("unet_tta4", args.unet, ["--ensemble", "4"])]
    if args.predictor:
        plan.append(("predictor_unet", args.predictor, []))
    if args.mc_dropout:
        plan += [("mc_dropout_unet", args.mc_dropout, []), ("mc_dropout_unet_8", args.mc_dropout,
                                                            ["--ensemble", "8"])]
    plan += [(f"residual_nfe{n}", args.residual, ["--steps", str(n)]) for n in (1, 2, 5, 10)]
    plan += [(f"residual_nfe{n}_ens4", args.residual, ["--steps", str(n), "--ensemble", "4"]) for n in (1, 2)]
    rows = []
    for name, ckpt, infer_args in plan:
        seconds = infer_unless_complete("segmentation", ckpt, DRIVE / "images", args.out / name, infer_args)
        rows.append({"row": name, "args": " ".join(infer_args), "seconds": seconds,
                     **evaluate(args.out / name, args.out / f"{name}.json")})
    observer = {"row": "2nd_observer", "args": "", "seconds": 0.0,
                **evaluate(DRIVE / "2nd_manual", args.out / "2nd_observer.json", uncertainty=False)}
    print_table([*rows, observer], machine())
    (args.out / "rows.json").write_text(json.dumps({"machine": machine(), "rows": [*rows, observer]}, indent=1))


def print_table(rows: list[dict], where: str) -> None:
    header = ["Dice", "NSD@1px", "HD95 px", "ECE", "Brier", "NLL", "err AUROC", "AURC", "UEO", "GED",
              "disagree AUROC"]
    print("\n| row | infer arguments | " + " | ".join(header) + " | infer time (20 images) | machine |")
    print("|---|---|" + "---|" * len(header) + "---|---|")
    for r in rows:
        cells = [f"{r[k]:.3f}" if k in r and r[k] == r[k] else "–" for k in METRICS]
        print(f"| {r['row']} | `{r['args'] or '(defaults)'}` | " + " | ".join(cells) +
              f" | {r['seconds']:.0f} s | {where} |")


if __name__ == "__main__":
    main()
