"""MNI152 through-plane x4 results table: trilinear and cubic interpolation, regression UNet, diffusion with and
without the low-resolution consistency at several NFE — every model row by `medidiff infer` + `medidiff
evaluate`, timed, in one run.

    python tasks/superres/results.py --diffusion CKPT --unet CKPT [--out runs/superres_results]
    python tasks/superres/results.py --out DIR        # the classical rows only (no checkpoints needed)

Held-aside case: the card's test slab (axial slices 125-148 of the 1 mm template, 24 slices; training used
10-109), averaged over 4 slices into a 4 mm volume (the box slice profile the models were trained with).
Train the two checkpoints first (same steps, seed 0):
    medidiff fit --config configs/superres/mni152_3d_x4.yaml
    medidiff fit --config configs/superres/mni152_3d_x4_unet.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import zoom

from medidiff import io
from medidiff.core.guidance import DownsampleConsistency
from medidiff.core.operators import downsample
from medidiff.data.cards import load_card

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/ helpers
from benchmarks.results import Row, image_table, run_image_row  # noqa: E402

DATA_RANGE = 255.0  # the template's intensities span 0..255 (data card)
FACTORS = (1, 1, 4)


def held_aside_case(out: Path) -> tuple[Path, Path, dict[str, Path]]:
    """Write the 1 mm reference, the 4 mm input and the interpolation baselines; returns
    ``(ref_dir, input_dir, {baseline name: dir})``."""
    split = load_card("mni152").splits["test"]
    volume = nib.as_closest_canonical(nib.load(split.cases[0]["image"]))  # RAS, as the data module loads it
    first = split.slices[0]
    last = first + (split.slices[1] - first) // FACTORS[2] * FACTORS[2]
    hr = volume.get_fdata(dtype=np.float32)[..., first:last]
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ [0, 0, first] + volume.affine[:3, 3]
    lr = downsample(torch.from_numpy(hr)[None, None], list(FACTORS))[0, 0].numpy()
    lr_affine = io.respaced_affine(affine, tuple(float(f) for f in FACTORS))
    baselines = {
        "trilinear": torch.nn.functional.interpolate(torch.from_numpy(lr)[None, None], scale_factor=FACTORS,
                                                     mode="trilinear")[0, 0].numpy(),
        "cubic": zoom(lr, FACTORS, order=3, mode="nearest", grid_mode=True),
    }
    # the same low-resolution consistency projection the models get, applied to the interpolations
    consistency = DownsampleConsistency(torch.from_numpy(lr)[None, None], FACTORS)
    baselines.update({f"{name}_dc": consistency(torch.from_numpy(data)[None, None], None, None)[0, 0].numpy()
                      for name, data in list(baselines.items())})
    folders = {name: out / "cases" / name for name in ("reference", "input_4mm", *baselines)}
    for name, (data, grid) in {"reference": (hr, affine), "input_4mm": (lr, lr_affine),
                               **{k: (v, affine) for k, v in baselines.items()}}.items():
        folders[name].mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data.astype(np.float32), grid), folders[name] / "mni152_test_slab.nii.gz")
    return folders["reference"], folders["input_4mm"], {k: folders[k] for k in baselines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion", type=Path, help="without it (and --unet): the classical rows only")
    parser.add_argument("--unet", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/superres_results"))
    parser.add_argument("--nfe", default="5,10,20", help="sampler steps of the diffusion rows with consistency")
    args = parser.parse_args()
    refs, inputs, baselines = held_aside_case(args.out)
    plan = [Row(name, folder, note=f"{name.replace('_dc', ' + DC')} interpolation")
            for name, folder in baselines.items()]
    if args.unet:
        plan += [Row("unet", inputs, args.unet, ["--no-consistency"]), Row("unet_dc", inputs, args.unet)]
    if args.diffusion:
        plan += [Row("diffusion_nfe10", inputs, args.diffusion, ["--steps", "10", "--no-consistency"])]
        plan += [Row(f"diffusion_dc_nfe{n}", inputs, args.diffusion, ["--steps", n]) for n in args.nfe.split(",")]
        plan += [Row("diffusion_dc_nfe5_ens4", inputs, args.diffusion, ["--steps", "5", "--ensemble", "4"])]
    rows = [run_image_row("superres", row, args.out, refs, DATA_RANGE) for row in plan]
    print("\n" + image_table(rows))
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
