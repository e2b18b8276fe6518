"""Segment a scan with a trained medidiff model from a research script, and save mask + uncertainty.

    python tasks/segmentation/example.py CHECKPOINT SCAN OUTPUT_DIR

The same as `medidiff infer --task segmentation --ensemble 5 --fusion staple`, spelled out with the Python API:
the checkpoint's contract checks the scan and preprocesses it as in training, and the outputs come back on the
scan's own grid (orientation, spacing), ready to write with its affine.
"""

import sys
from pathlib import Path

from medidiff import io
from medidiff.inference import Case, from_checkpoint, run_case
from medidiff.inference.contract import describe

checkpoint, scan, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

# weights only (no pickled code runs); steps: the count that scored best on validation
model = from_checkpoint("segmentation", checkpoint, ensemble=5, fusion="staple", seed=0)
print("model", describe(model.contract))

outputs = run_case(model, Case("scan", {"image": scan}))  # seg (the model's class ids), prob, entropy, variance
for name, output in outputs.items():
    io.write(output.array, out / f"{scan.name.split('.')[0]}_{name}.nii.gz", like=scan)
print("labels", model.contract["labels"], "->", sorted(p.name for p in out.iterdir()))
