"""MNI152 3D grey / white matter at equal training wall time: residual diffusion over a 3D UNet against the UNet
and its test-time-flip ensemble, on the card's held-aside slab, with Dice, NSD, HD95 and the uncertainty metrics.

    python tasks/segmentation/mni152_3d_uncertainty.py --unet CKPT --residual [LABEL=]CKPT [--residual ...]
        [--predictor CKPT] [--out runs/mni152_3d_uncertainty]

Every row is ``medidiff infer`` + ``medidiff evaluate --card mni152 --uncertainty`` (one observer: no GED or
disagreement columns). The slab and its label map are written as ``mni152_3d_results.py`` writes them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from medidiff.results import evaluate_segmentation, infer_unless_complete, machine, uncertainty_table


def held_aside_case(out: Path) -> tuple[Path, Path]:
    spec = importlib.util.spec_from_file_location("mni152_3d_results", Path(__file__).with_name(
        "mni152_3d_results.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.held_aside_case(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", type=Path, required=True)
    parser.add_argument("--residual", action="append", required=True, metavar="[LABEL=]CKPT")
    parser.add_argument("--predictor", type=Path, help="the residual model's stage-1 UNet, scored alone")
    parser.add_argument("--out", type=Path, default=Path("runs/mni152_3d_uncertainty"))
    args = parser.parse_args()
    images, labels = held_aside_case(args.out)
    plan = [("unet", args.unet, []), ("unet_tta4", args.unet, ["--ensemble", "4"])]
    plan += [("predictor_unet", args.predictor, [])] if args.predictor else []
    for entry in args.residual:
        label, _, path = entry.rpartition("=")
        label, ckpt = label or "residual", Path(path)
        plan += [(f"{label}_nfe{n}", ckpt, ["--steps", str(n)]) for n in (1, 2, 5)]
        plan += [(f"{label}_nfe1_ens4", ckpt, ["--steps", "1", "--ensemble", "4"])]
    rows = []
    for name, ckpt, infer_args in plan:
        seconds = infer_unless_complete("segmentation", ckpt, images, args.out / name, infer_args)
        rows.append({"row": name, "args": " ".join(infer_args), "seconds": seconds,
                     **evaluate_segmentation(args.out / name, labels, args.out / f"{name}.json", "mni152")})
    print("\n" + uncertainty_table(rows, machine(), "infer time"))
    (args.out / "rows.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
