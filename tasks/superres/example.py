"""Super-resolve a thick-slice scan through-plane with a trained medidiff model.

    python tasks/superres/example.py CHECKPOINT THICK_SLICE_SCAN OUTPUT.nii.gz

The output covers the same field of view with the voxel size divided by the model's factors (e.g. 8 mm slices
-> 2 mm); every sampler step keeps the average of each group of output slices equal to the input slice.
"""

import sys

from medidiff import io
from medidiff.inference import Case, from_checkpoint, run_case

checkpoint, scan, out = sys.argv[1:4]

model = from_checkpoint("superres", checkpoint, seed=0)      # sampler steps: the checkpoint's validated choice
fine = run_case(model, Case("scan", {"image": scan}))["image"]   # sliding windows when the scan is large
io.write(fine.array, out, like=scan, spacing=fine.spacing)       # the finer spacing goes into the affine
print("wrote", out, "at spacing", fine.spacing)
