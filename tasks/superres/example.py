"""Super-resolve a thick-slice scan through-plane with a trained medidiff model.

    python tasks/superres/example.py CHECKPOINT THICK_SLICE_SCAN OUTPUT.nii.gz

The output covers the same field of view with the voxel size divided by the model's factors (e.g. 8 mm slices
-> 2 mm); every sampler step keeps the average of each group of output slices equal to the input slice.
"""

import sys

from medidiff import io
from medidiff.checkpoint import load_module
from medidiff.data.cards import load_card
from medidiff.inference import SamplingOptions
from medidiff.inference_image import normalise, super_resolve

checkpoint, scan_path, out = sys.argv[1:4]

model, data_settings = load_module(checkpoint, task="superres")
spec = load_card(data_settings["card"], check_files=False).inputs["image"]

scan = io.read(scan_path)                                               # (1, X, Y, Z) with its affine
image, (low, high) = normalise(scan.as_tensor(), spec.normalise)

options = SamplingOptions(sampler="dpmpp_2m", steps=10, seed=0)
fine = super_resolve(model, image, options, data_settings.get("patch_size"))   # sliding windows if large
spacing = [float(s) / f for s, f in zip(scan.meta["spacing"], model.hparams.factors)]
io.write(fine * (high - low) + low, out, like=scan, spacing=spacing)    # the finer spacing goes into the affine
print("wrote", out, "at spacing", spacing)
