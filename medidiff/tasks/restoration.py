"""Restoration: denoising, artifact removal and undersampled-MRI reconstruction on the input's own voxel grid.

The clean image is diffused, the degraded (zero-filled) image is the condition. With the k-space sampling mask
of the input, every sampler step is made consistent with the measured k-space (a projection, or a soft one with
``consistency_weight`` < 1). A model trained on k-space undersampling needs that mask at inference: without the
measurement it has nothing to stay consistent with and invents structure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medidiff import io
from medidiff.core.guidance import Hook, KSpaceConsistency
from medidiff.core.operators import to_kspace
from medidiff.errors import MedidiffError
from medidiff.tasks.base import Case, Option
from medidiff.tasks.image import NO_CONSISTENCY, ImageTask

DEFAULT_DEGRADATION = {"noise": {"std": [0.02, 0.1]}}


class Restoration(ImageTask):
    """Restoration; with a ``kspace_mask`` in the batch, every step is made consistent with the measured k-space.
    Settings: see :class:`medidiff.tasks.image.ImageTask`."""

    name = "restoration"
    options = (
        Option(("--mask",), {"type": Path, "default": None, "help": "restoration: k-space sampling mask "
                             "(NIfTI/PNG, 0/1 over the last two axes) of the input"}),
        NO_CONSISTENCY,
    )

    @classmethod
    def default_degradation(cls, spatial_dims: int) -> dict[str, Any]:
        return DEFAULT_DEGRADATION

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        mask = batch.get("kspace_mask")
        if mask is None or not self.consistency:
            return None
        dims = mask.ndim - 2
        # the zero-filled condition is the inverse FFT of the measurement, so its k-space *is* the measurement
        measured = to_kspace(self.condition(batch), dims) * mask
        return KSpaceConsistency(measured, mask, self.consistency_weight, dims)

    # --------------------------------------------------------------------------------- inference

    def prepare(self, system: Any, contract: dict[str, Any], options: dict[str, Any], where: Any) -> None:
        """A k-space model needs the sampling mask, always; a mask means nothing to a model trained on other
        degradations (``--allow degradation`` runs it anyway)."""
        super().prepare(system, contract, options, where)
        trained, mask = contract.get("degradation") or {}, options.get("mask")
        if "kspace" in trained and mask is None:
            raise MedidiffError(f"the model reconstructs k-space-undersampled images (trained on {trained}) and "
                                "needs the input's sampling mask: give it with --mask (no override: without the "
                                "measurement the model invents structure)", where)
        if "kspace" not in trained and mask is not None and "degradation" not in options.get("allow", ()):
            raise MedidiffError(f"--mask is for models trained on k-space undersampling; this one was trained on "
                                f"{trained or 'an unrecorded degradation'} (run it anyway with --allow degradation)",
                                where)
        options["kspace_mask"] = None if mask is None else read_kspace_mask(Path(mask))

    def extras(self, case: Case, options: dict[str, Any]) -> dict[str, Tensor]:
        """The mask on the scan's grid ``(1, *spatial)``: an in-plane ``(H, W)`` mask serves every slice."""
        mask = options.get("kspace_mask")
        if mask is None:
            return {}
        shape, stored = tuple(case.images["image"].shape[1:]), mask
        if mask.ndim == len(shape) - 1 and tuple(mask.shape) == shape[:-1]:
            mask = mask[..., None].expand(*mask.shape, shape[-1])
        if tuple(mask.shape) != shape:
            raise MedidiffError(f"k-space mask of shape {tuple(stored.shape)} does not fit the scan {shape} "
                                f"({case.sources['image']})", options["mask"])
        return {"kspace_mask": mask[None].float()}

    def model_inputs(self, tensors: dict[str, Tensor], case: Case, options: dict[str, Any]) -> dict[str, Tensor]:
        inputs = {"condition": tensors["image"].float()[None]}
        if "kspace_mask" in tensors:
            inputs["kspace_mask"] = tensors["kspace_mask"][None]
        return inputs

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        mask = options.get("mask")
        # what is applied: k-space consistency needs the mask
        return {"mask": None if mask is None else str(mask), "consistency": mask is not None and self.consistency}


def read_kspace_mask(path: Path) -> Tensor:
    """A 0/1 sampling mask over the last two axes (or per slice); stored 0/255 (PNG) is read as 0/1."""
    mask = io.read(path)[0].float()
    values = torch.unique(mask)
    if not bool((mask > 0).any()):
        raise MedidiffError("the k-space mask samples nothing (all zeros); expected 1 where k-space was measured",
                            path)
    if values.numel() > 2 or float(values.min()) != 0 and values.numel() == 2:
        raise MedidiffError(f"a k-space mask holds two values, 0 and one other (found {values[:5].tolist()}); "
                            "soft weights are not supported", path)
    return (mask > 0).float()
