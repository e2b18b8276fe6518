"""Reconstruct an undersampled MRI scan with a trained medidiff model and k-space data consistency.

    python tasks/restoration/example.py CHECKPOINT ZERO_FILLED_SCAN MASK OUTPUT.nii.gz

ZERO_FILLED_SCAN: the inverse FFT of the measured k-space (real image, NIfTI); MASK: the 0/1 sampling mask over
the in-plane axes (NIfTI or PNG). The same as `medidiff infer --task restoration --mask MASK`.
"""

import sys

from medidiff import io
from medidiff.inference import Case, from_checkpoint, run_case

checkpoint, scan, mask, out = sys.argv[1:5]

model = from_checkpoint("restoration", checkpoint, mask=mask, seed=0)   # weights only: no pickled code runs
outputs = run_case(model, Case("scan", {"image": scan}))  # 2D model: slice by slice, k-space projection per step
io.write(outputs["image"].array, out, like=scan)            # same grid, affine and intensity units as the input
print("wrote", out)
