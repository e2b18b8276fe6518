"""MNI152 4x k-space results table: zero-filled input, regression UNet, diffusion with and without k-space
consistency at several NFE — every row by `medidiff infer` + `medidiff evaluate`, timed, in one run.

    python tasks/restoration/results.py --diffusion CKPT --unet CKPT [--out runs/restoration_results]

Held-aside cases: the 25 axial slices of the card's test slab (slices 125-149; training used 10-109), each
written as a 2D NIfTI with its place in the volume, undersampled with one 4x random-line mask (8 % centre,
seed 0) — the acquisition the models were trained on. Train the two checkpoints first (same steps, seed 0):
    medidiff fit --config configs/restoration/mni152_2d_kspace4x.yaml
    medidiff fit --config configs/restoration/mni152_2d_kspace4x_unet.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medidiff.core.operators import kspace_mask, undersample
from medidiff.data.cards import load_card

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import Row, image_table, run_image_row  # noqa: E402

DATA_RANGE = 255.0  # the template's intensities span 0..255 (data card)


def held_aside_cases(out: Path) -> tuple[Path, Path, Path]:
    """Write reference and zero-filled slices and the mask; returns ``(ref_dir, input_dir, mask_path)``."""
    card = load_card("mni152")
    split = card.splits["test"]
    volume_path = split.cases[0]["image"]
    volume = nib.as_closest_canonical(nib.load(volume_path))  # RAS, as the data module loads it
    data = volume.get_fdata(dtype=np.float32)
    refs, inputs = out / "cases" / "reference", out / "cases" / "zero_filled"
    refs.mkdir(parents=True, exist_ok=True)
    inputs.mkdir(parents=True, exist_ok=True)
    mask = kspace_mask(data.shape[:2], 4, 0.08, "random", torch.Generator().manual_seed(0))
    for k in range(*split.slices):
        affine = volume.affine.copy()
        affine[:3, 3] = volume.affine[:3, :3] @ [0, 0, k] + volume.affine[:3, 3]
        clean = data[..., k]
        zero_filled = undersample(torch.from_numpy(clean)[None, None], mask)[0][0, 0].numpy()
        nib.save(nib.Nifti1Image(clean, affine), refs / f"slice{k:03d}.nii.gz")
        nib.save(nib.Nifti1Image(zero_filled.astype(np.float32), affine), inputs / f"slice{k:03d}.nii.gz")
    mask_path = out / "cases" / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.numpy().astype(np.uint8), np.eye(4)), mask_path)
    return refs, inputs, mask_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion", type=Path, required=True)
    parser.add_argument("--unet", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/restoration_results"))
    parser.add_argument("--nfe", default="5,10,20", help="sampler steps of the diffusion rows with consistency")
    args = parser.parse_args()
    refs, inputs, mask = held_aside_cases(args.out)
    dc = ["--mask", str(mask)]
    no_dc = ["--mask", str(mask), "--no-consistency"]  # the network alone: what consistency adds
    plan = [Row("zero_filled", inputs, note="the input itself"),
            Row("unet", inputs, args.unet, no_dc, note="no consistency"),
            Row("unet_dc", inputs, args.unet, dc),
            Row("diffusion_nfe10", inputs, args.diffusion, ["--steps", "10", *no_dc])]
    plan += [Row(f"diffusion_dc_nfe{n}", inputs, args.diffusion, ["--steps", n, *dc]) for n in args.nfe.split(",")]
    plan += [Row("diffusion_dc_nfe10_ens4", inputs, args.diffusion, ["--steps", "10", "--ensemble", "4", *dc])]
    rows = [run_image_row("restoration", row, args.out, refs, DATA_RANGE) for row in plan]
    for r in rows:  # the mask path is the script's own; show what matters
        r["args"] = r["args"].replace(str(mask), "MASK")
    print("\n" + image_table(rows))
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    picture(args.out, refs, inputs, Path(__file__).with_name("mni152_kspace4x.png"))


def picture(out: Path, refs: Path, inputs: Path, path: Path, case: str = "slice137") -> None:
    """Zero-filled | UNet + DC | diffusion + DC | reference, with the diffusion error, for one held-aside slice."""
    from medidiff.report import panel

    def load(folder: Path) -> np.ndarray:
        return nib.load(folder / f"{case}.nii.gz").get_fdata()

    ref, diffusion = load(refs), load(out / "diffusion_dc_nfe10")
    panel([("zero-filled 4x", load(inputs), "image"), ("UNet + DC", load(out / "unet_dc"), "image"),
           ("diffusion + DC, 10 NFE", diffusion, "image"), ("|diffusion - ref|", np.abs(diffusion - ref),
                                                            "uncertainty"), ("reference", ref, "image")],
          path, f"MNI152 T1, held-aside {case}, 4x random-line k-space")


if __name__ == "__main__":
    main()
