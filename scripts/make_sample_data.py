"""Regenerate medidiff/sample_data/ from its sources (deterministic; a few MB in all).

Sources: ../shared/data/totalseg_ct (TotalSegmentator test files, Apache-2.0) and the MNI152 2009 template
inside the nilearn wheel (redistributable with its copyright notice). DRIVE and the Harvard atlas are *not*
sampled: their licences do not grant redistribution.

    .venv/bin/python scripts/make_sample_data.py [--shared ../shared/data] [--out medidiff/sample_data]
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, Orientation, Spacing

from medidiff import io
from medidiff.data.custom import DeriveTissueLabeld

ROOT = Path(__file__).resolve().parents[1]
# TotalSegmentator v2 ids kept in the sample: spleen, kidney R/L, liver, stomach, aorta.
ORGANS = [1, 2, 3, 5, 6, 52]
MNI = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "medidiff" / "sample_data")
    args = parser.parse_args()
    ct_case_a(args.shared / "totalseg_ct", args.out / "totalseg_ct")
    ct_case_b(args.shared / "totalseg_ct", args.out / "totalseg_ct")
    t1, label, gm, wm = mni_volumes()
    mni_subvolume(t1, label, args.out / "mni152")
    fusion_slices(t1, gm, wm, args.out / "fusion")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"sample data in {args.out}: {total / 1e6:.2f} MB")


def keep_organs(label: MetaTensor) -> MetaTensor:
    """Zero every TotalSegmentator class the sample does not use (smaller files, same remap rule)."""
    return MetaTensor(torch.where(torch.isin(label, torch.tensor(ORGANS)), label, 0), meta=label.meta)


def ct_case_a(src: Path, out: Path) -> None:
    """The 3 mm NIfTI scan, cropped to the body around the kept organs: 100x72x30 voxels."""
    ct, seg = io.read(src / "example_ct_sm.nii.gz"), io.read(src / "example_seg.nii.gz", kind="label")
    box = (slice(None), slice(8, 108), slice(18, 90), slice(None))
    write_crop(ct[box].to(torch.int16), out / "ct_a.nii.gz")
    write_crop(keep_organs(seg)[box], out / "seg_a.nii.gz")


def ct_case_b(src: Path, out: Path) -> None:
    """The DICOM series (0.977x0.977x2 mm) resampled to 2 mm isotropic, cropped around the kept organs."""
    ct, seg = io.read(src / "example_ct_dicom"), io.read(src / "example_seg_dicom.nii.gz", kind="label")
    ct, seg = Orientation("RAS")(ct), Orientation("RAS")(seg)
    ct = Spacing((2.0, 2.0, 2.0), mode="bilinear")(ct)
    seg = Spacing((2.0, 2.0, 2.0), mode="nearest")(seg)
    organs = np.argwhere(keep_organs(seg.round().long())[0].numpy() > 0)
    lo, hi = np.maximum(organs.min(0) - 8, 0), organs.max(0) + 9
    box = (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(None))
    write_crop(ct[box].round().to(torch.int16), out / "ct_b.nii.gz")
    write_crop(keep_organs(seg.round().long())[box], out / "seg_b.nii.gz")


def write_crop(volume: MetaTensor, path: Path) -> None:
    """Write with the crop's own affine (MONAI updates it on slicing)."""
    volume.meta["filename_or_obj"] = ""
    io.write(volume, path)
    print(f"  {path.relative_to(ROOT)}  {tuple(volume.shape[1:])}")


def mni_volumes() -> tuple[MetaTensor, MetaTensor, MetaTensor, MetaTensor]:
    """T1, derived background/GM/WM label and GM/WM probabilities (0..1), all at 1 mm RAS."""
    base = Path(str(importlib.resources.files("nilearn"))) / "datasets" / "data"
    t1, gm, wm = (io.read(base / MNI.format(name)) for name in ("t1", "gm", "wm"))
    label = DeriveTissueLabeld("label", ["gm", "wm"], threshold=0.5, scale=255.0)({"gm": gm, "wm": wm})["label"]
    return t1, label, gm / 255.0, wm / 255.0


def mni_subvolume(t1: MetaTensor, label: MetaTensor, out: Path) -> None:
    """The template at 2 mm, cropped to the head: T1 (uint8) and tissue labels."""
    t1_2mm = Spacing((2.0, 2.0, 2.0), mode="bilinear")(t1)
    label_2mm = Spacing((2.0, 2.0, 2.0), mode="nearest")(label.float())
    head = np.argwhere(t1_2mm[0].numpy() > 10)
    lo, hi = head.min(0), head.max(0) + 1
    box = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
    write_crop(t1_2mm[box].round().clamp(0, 255).to(torch.uint8), out / "t1_2mm.nii.gz")
    write_crop(label_2mm[box].round().to(torch.uint8), out / "tissue_2mm.nii.gz")


def fusion_slices(t1: MetaTensor, gm: MetaTensor, wm: MetaTensor, out: Path) -> None:
    """Axial MRI slices with a *simulated* FDG-PET-like image: smoothed GM (+ some WM) uptake, colour-mapped.

    FDG uptake is roughly 3-4x higher in grey than in white matter; PET resolution is a few mm, so the
    map is smoothed with a 4 mm sigma. Rendered with matplotlib's "hot" map, as atlas PET images are.
    """
    uptake = GaussianSmooth(sigma=4.0)(gm + 0.3 * wm)
    uptake = 0.8 * uptake / uptake.max()  # peak in the orange, not saturated white, of the map
    box = (slice(10, 186), slice(12, 220))  # the head in-plane, 176x208 at 1 mm
    for z in range(60, 140, 8):
        mri = t1[0][box + (z,)].numpy().T[::-1]  # rows anterior->posterior as radiological display
        pet = uptake[0][box + (z,)].numpy().T[::-1]
        io.write_png(mri, out / "mri" / f"{z:03d}.png", value_range=(0, 255))
        rgb = (colormaps["hot"](np.clip(pet, 0, 1))[..., :3] * 255).round().astype(np.uint8)
        io.write_png(np.moveaxis(rgb, -1, 0), out / "pet" / f"{z:03d}.png")
    print(f"  {out.relative_to(ROOT)}/{{mri,pet}}/*.png  10 slices 208x176")


if __name__ == "__main__":
    main()
