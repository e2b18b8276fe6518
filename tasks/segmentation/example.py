"""Segment a scan with a trained medidiff model from a research script, and save mask + uncertainty.

    python tasks/segmentation/example.py CHECKPOINT SCAN OUTPUT_DIR

The same as `medidiff infer --task segmentation --ensemble 5`, spelled out with the Python API.
"""

import sys
from pathlib import Path

from medidiff import io
from medidiff.checkpoint import load_module
from medidiff.data import transforms as T
from medidiff.inference import SamplingOptions, preprocess_case, sample_probabilities, segmentation_outputs

checkpoint, scan, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

model, data_settings = load_module(checkpoint, task="segmentation")   # weights_only, no pickled code runs
case, pipeline = preprocess_case(data_settings["card"], scan)         # the training card's normalisation
options = SamplingOptions(sampler="dpmpp_2m", steps=10, ensemble=5, seed=0)

probabilities = sample_probabilities(model, case["image"], options, data_settings.get("patch_size"))
maps = segmentation_outputs(model, probabilities, fusion="staple")     # seg, prob, entropy, variance

for name, array in maps.items():
    # back onto the scan's own grid (orientation, spacing) and written with its affine
    restored = T.invert(array, case["image"], pipeline, nearest=name == "seg")
    io.write(restored, out / f"{scan.name.split('.')[0]}_{name}.nii.gz", like=scan)
print("wrote", sorted(p.name for p in out.iterdir()))
