"""Fuse the shipped MRI / simulated-PET pair with the Python API: a classical baseline, or diffusion fusion
with a trained prior; colour comes back from the PET chroma.

    .venv/bin/python tasks/fusion/example.py                       # Laplacian pyramid
    .venv/bin/python tasks/fusion/example.py runs/fusion/.../last.ckpt   # diffusion fusion, 10 steps
"""

import sys
from pathlib import Path

import medidiff
from medidiff import io
from medidiff.checkpoint import load_module
from medidiff.data.custom import rgb_to_ycbcr
from medidiff.fusion_classical import fuse_laplacian
from medidiff.lit.fusion import restore_colour
from medidiff.metrics.fusion import fusion_metrics

pair = Path(medidiff.__file__).parent / "sample_data/fusion"
mri = io.read(pair / "mri/124.png").as_tensor()[None] / 255  # (1, 1, H, W) in [0, 1]
pet = rgb_to_ycbcr(io.read(pair / "pet/124.png").as_tensor() / 255)  # (3, H, W): luma, Cb, Cr
pet_luma, pet_chroma = pet[None, :1], pet[None, 1:]

if len(sys.argv) > 1:  # a prior trained with: medidiff fit --config configs/fusion/sample_fusion_2d.yaml
    module, _ = load_module(sys.argv[1], task="fusion")
    fused = module.fuse(mri, pet_luma, sampler="dpmpp_2m", steps=10, seed=0).mean(0)  # (B, 1, H, W)
else:
    fused = fuse_laplacian(mri, pet_luma).clamp(0, 1)

rgb = restore_colour(fused, pet_chroma)  # (1, 3, H, W): fused structure, PET colours
print("wrote", io.write_png(rgb[0], "fused_124.png", value_range=(0.0, 1.0)))
scores = fusion_metrics(fused[0, 0].numpy() * 255, mri[0, 0].numpy() * 255, pet_luma[0, 0].numpy() * 255)
print({name: round(value, 3) for name, value in scores.items()})
