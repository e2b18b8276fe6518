"""Synthesise a CT slice from a registered MRI slice with a trained medidiff model, and score it if the real CT
is at hand.

    python tasks/synthesis/example.py CHECKPOINT MRI.png OUTPUT.nii.gz [CT.png]

The output is written in the units of the model's target (its card's ``inputs.target`` window), on the MRI's grid.
"""

import sys

from medidiff import io
from medidiff.inference import Case, from_checkpoint, run_case
from medidiff.metrics.image import image_metrics

checkpoint, mri, out = sys.argv[1:4]

model = from_checkpoint("synthesis", checkpoint, ensemble=4, seed=0)  # the mean of 4 samples
ct = run_case(model, Case("slice", {"image": mri}))["image"].array   # (1, H, W) in the target's units
io.write(ct, out, like=mri)
print("wrote", out)
if len(sys.argv) > 4:
    reference = io.read(sys.argv[4])[0].numpy()
    print(image_metrics(ct[0].numpy(), reference, data_range=255.0, metrics=("psnr", "ssim", "mae")))
