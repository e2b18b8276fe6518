"""Fuse the shipped MRI / simulated-PET pair with the Python API: a classical baseline, or diffusion fusion
with a trained prior; colour comes back from the PET chroma.

    .venv/bin/python tasks/fusion/example.py                       # Laplacian pyramid
    .venv/bin/python tasks/fusion/example.py runs/fusion/.../last.ckpt   # diffusion fusion, 10 steps
"""

import sys
from pathlib import Path

import medidiff
from medidiff import io
from medidiff.data.custom import rgb_to_ycbcr
from medidiff.inference import Case, from_checkpoint, run_case
from medidiff.metrics.fusion import fusion_metrics


def luma(image):  # (1 | 3, H, W) -> (H, W): fusion metrics score the luma of colour images
    return (rgb_to_ycbcr(image.float())[0] if image.shape[0] == 3 else image[0].float()).numpy()


pair = Path(medidiff.__file__).parent / "sample_data/fusion"
case = Case("124", {"source_a": pair / "mri/124.png", "source_b": pair / "pet/124.png"})

if len(sys.argv) > 1:  # a prior trained with: medidiff fit --config configs/fusion/sample_fusion_2d.yaml
    model = from_checkpoint("fusion", sys.argv[1], steps=10, seed=0)
else:
    model = from_checkpoint("fusion", None, method="laplacian")

fused = run_case(model, case)["fused"].array  # (3, H, W) in [0, 1]: fused structure, PET colours
print("wrote", io.write_png(fused, "fused_124.png", value_range=(0.0, 1.0)))
sources = [luma(io.read(path).as_tensor()) for path in case.sources.values()]
scores = fusion_metrics(luma(fused) * 255, *sources)
print({name: round(value, 3) for name, value in scores.items()})
