"""Reconstruct an undersampled MRI scan with a trained medidiff model and k-space data consistency.

    python tasks/restoration/example.py CHECKPOINT ZERO_FILLED_SCAN MASK OUTPUT.nii.gz

ZERO_FILLED_SCAN: the inverse FFT of the measured k-space (real image, NIfTI); MASK: the 0/1 sampling mask over
the in-plane axes (NIfTI or PNG). The same as `medidiff infer --task restoration --mask MASK`.
"""

import sys

from medidiff import io
from medidiff.checkpoint import load_module
from medidiff.data.cards import load_card
from medidiff.inference import SamplingOptions
from medidiff.inference_image import normalise, restore

checkpoint, scan_path, mask_path, out = sys.argv[1:5]

model, data_settings = load_module(checkpoint, task="restoration")      # weights_only: no pickled code runs
spec = load_card(data_settings["card"], check_files=False).inputs["image"]

scan = io.read(scan_path)                                               # MetaTensor (1, H, W, D), affine kept
image, (low, high) = normalise(scan.as_tensor(), spec.normalise)        # the training card's intensity scale
mask = io.read(mask_path)[0].float()                                    # (H, W)

options = SamplingOptions(sampler="dpmpp_2m", steps=10, seed=0)
restored = restore(model, image, options, mask)                         # 2D model: slice by slice, hook per step
io.write(restored * (high - low) + low, out, like=scan)                 # same grid and affine as the input
print("wrote", out)
