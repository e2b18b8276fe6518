"""File-level inference for every task: one pipeline driven by the model's own training record.

- :mod:`~medidiff.inference.contract`: what a model takes (recorded in its checkpoint, checked on every input);
- :mod:`~medidiff.inference.model`: a model ready for inference (system, task, contract, sampler settings) and
  the prediction of one case;
- :mod:`~medidiff.inference.pipeline`: the loop: cases, reading and checks, preprocessing as in training, the
  device, outputs back on the scan's grid, atomic writes, provenance;
- :mod:`~medidiff.inference.run_folder`: the output folder's lock and content-keyed resumption.

Research scripts::

    from medidiff.inference import from_checkpoint, infer
    model = from_checkpoint("segmentation", "model.ckpt", ensemble=5)
    infer(model, {"image": "scans/"}, "preds/")
"""

from typing import Any

__all__ = ["Case", "InputOptions", "Model", "Output", "SamplingOptions", "from_checkpoint", "infer", "list_cases",
           "run_case"]

_WHERE = {"InputOptions": "reading", "infer": "pipeline", "list_cases": "pipeline", "run_case": "pipeline",
          "Model": "model", "SamplingOptions": "model", "from_checkpoint": "model"}


def __getattr__(name: str) -> Any:
    """Imported on first use: the checkpoint layer imports the contract module of this package, and this package's
    pipeline imports the checkpoint layer."""
    import importlib

    if name in ("Case", "Output"):
        return getattr(importlib.import_module("medidiff.tasks"), name)
    if name in _WHERE:
        return getattr(importlib.import_module(f"medidiff.inference.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medidiff.inference' has no attribute {name!r}")
