"""File-level inference for every task: one pipeline driven by the model's own training record.

- :mod:`~medidiff.inference.contract`: what a model takes (recorded in its checkpoint, checked on every input);
- :mod:`~medidiff.inference.pipeline`: the loop: cases, reading and checks, preprocessing as in training, the
  device, outputs back on the scan's grid, atomic writes, provenance;
- :mod:`~medidiff.inference.tasks`: the task adapters (segmentation, restoration, super-resolution, fusion).

Research scripts::

    from medidiff.inference import from_checkpoint, infer
    adapter = from_checkpoint("segmentation", "model.ckpt", ensemble=5)
    infer(adapter, {"image": "scans/"}, "preds/")
"""

from medidiff.inference.pipeline import InputOptions, infer, list_cases, run_case
from medidiff.inference.tasks import Case, Output, SamplingOptions, adapter_for, from_checkpoint

__all__ = ["Case", "InputOptions", "Output", "SamplingOptions", "adapter_for", "from_checkpoint", "infer",
           "list_cases", "run_case"]
