"""MNI152 3D tissue results table (grey / white matter): diffusion at several NFE and the UNet baseline — every row
by `medidiff infer` + `medidiff evaluate`, timed, in one run.

    python tasks/segmentation/mni152_3d_results.py --diffusion CKPT --unet CKPT [--out runs/mni152_3d_results]

Held-aside case: the card's test slab (axial slices 125-149 of the 1 mm template; training used 10-109), with the
label map derived as the card derives it (argmax of the GM/WM probability maps where it reaches 0.5). Train the
two checkpoints first (seed 0):
    medidiff fit --config configs/segmentation/mni152_3d.yaml
    medidiff fit --config configs/segmentation/mni152_3d_unet.yaml --trainer.max_steps STEPS_OF_THE_DIFFUSION_RUN
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.cli import main as medidiff
from medidiff.data.cards import load_card

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import infer_unless_complete, machine  # noqa: E402


def held_aside_case(out: Path) -> tuple[Path, Path]:
    """Write the test slab and its derived label map; returns ``(image_dir, label_dir)``."""
    card = load_card("mni152")
    split = card.splits["test"]
    case = split.cases[0]
    first, last = split.slices
    derive = card.derive["label"]

    def slab(key: str) -> tuple[np.ndarray, np.ndarray]:
        image = nib.as_closest_canonical(nib.load(case[key]))  # RAS, as the data module loads it
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ [0, 0, first] + image.affine[:3, 3]
        return image.get_fdata(dtype=np.float32)[..., first:last], affine

    (image, affine), maps = slab("image"), np.stack([slab(k)[0] for k in derive["from"]]) / derive["scale"]
    label = np.where(maps.max(0) >= derive["threshold"], maps.argmax(0) + 1, 0).astype(np.uint8)
    folders = {"image": out / "cases" / "image", "label": out / "cases" / "label"}
    for name, data in (("image", image), ("label", label)):
        folders[name].mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), folders[name] / "mni152_test_slab.nii.gz")
    return folders["image"], folders["label"]


def run_row(name: str, ckpt: Path, images: Path, labels: Path, out: Path, infer_args: list[str]) -> dict:
    pred = out / name
    seconds = infer_unless_complete("segmentation", ckpt, images, pred, infer_args)
    metrics = out / f"{name}.json"
    medidiff(["evaluate", "--task", "segmentation", "--pred", str(pred), "--ref", str(labels), "--card", "mni152",
              "--out", str(metrics)])
    summary = json.loads(metrics.read_text())["summary"]
    per_class = {k: v["mean"] for k, v in summary.items() if k.startswith(("dice_", "hd95_"))}
    return {"row": name, "args": " ".join(infer_args), "seconds": seconds, **per_class}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion", type=Path, required=True)
    parser.add_argument("--unet", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/mni152_3d_results"))
    parser.add_argument("--unet-equal-time", type=Path, help="a UNet trained for the diffusion run's wall time")
    args = parser.parse_args()
    images, labels = held_aside_case(args.out)
    plan = [("unet", args.unet, [])]
    plan += [("unet_equal_time", args.unet_equal_time, [])] if args.unet_equal_time else []
    plan += [(f"diffusion_nfe{n}", args.diffusion, ["--steps", str(n)]) for n in (1, 5, 10)]
    plan += [("diffusion_nfe5_ens3", args.diffusion, ["--steps", "5", "--ensemble", "3"])]
    rows = [run_row(name, ckpt, images, labels, args.out, infer_args) for name, ckpt, infer_args in plan]
    print("\n| row | infer arguments | Dice GM | Dice WM | Dice mean | HD95 mean (mm) | wall time | machine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | `{r['args'] or '(checkpoint defaults)'}` | "
              f"{r.get('dice_grey_matter', float('nan')):.3f} | "
              f"{r.get('dice_white_matter', float('nan')):.3f} | {r['dice_mean']:.3f} | {r['hd95_mean']:.2f} | "
              f"{r['seconds']:.0f} s | {machine()} |")
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
