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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import machine, run_uncertainty_rows, uncertainty_table, unet_and_residual_plan  # noqa: E402


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
    plan = unet_and_residual_plan(args.unet, args.predictor, args.residual, (1, 2, 5), (1,))
    rows = run_uncertainty_rows(plan, images, labels, args.out, "mni152")
    print("\n" + uncertainty_table(rows, machine(), "infer time"))
    (args.out / "rows.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
