"""Super-resolution: the high-resolution image is diffused, the low-resolution image interpolated onto the fine
grid is the condition; with the low-resolution image in the batch, ``downsample(estimate) == low_res`` holds at
every step. At inference the output covers the input's field of view at its voxel size divided by ``factors``.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from medidiff.core.guidance import DownsampleConsistency, Hook
from medidiff.data.degrade import interpolate_back
from medidiff.errors import MedidiffError
from medidiff.tasks.base import Case, Output
from medidiff.tasks.image import NO_CONSISTENCY, ImageTask


class SuperRes(ImageTask):
    """Super-resolution.

    Args:
        factors: integer down-sampling factor per spatial axis of the acquisition (e.g. ``[1, 1, 4]``).
        **settings: see :class:`medidiff.tasks.image.ImageTask`.
    """

    name = "superres"
    window_dims = (2, 3)
    slice_batch = 8
    options = (NO_CONSISTENCY,)

    def __init__(self, factors: Sequence[int] | None = None, **settings: Any):
        super().__init__(factors=None if factors is None else [int(f) for f in factors], **settings)
        self.factors = self.config["factors"]

    @classmethod
    def default_degradation(cls, spatial_dims: int) -> dict[str, Any]:
        return {"downsample": {"factor": 4 if spatial_dims == 2 else [1, 1, 4]}}

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        lowres = batch.get("low_res")
        if lowres is None or not self.consistency or not self.factors:
            return None
        return DownsampleConsistency(lowres.float() * 2 - 1, self.factors, self.consistency_weight)

    # --------------------------------------------------------------------------------- inference

    def model_inputs(self, tensors: dict[str, Tensor], case: Case, options: dict[str, Any]) -> dict[str, Tensor]:
        """The condition is built from the low-resolution input exactly as the trained degradation built it; the
        consistency step holds the box-average forward model, the one ``model: average`` trains with."""
        low, factors = tensors["image"].float(), [int(f) for f in self.factors]
        if len(factors) != low.ndim - 1:
            raise MedidiffError(f"the model up-samples {len(factors)}D images but this input is {low.ndim - 1}D",
                                case.sources["image"])
        trained = (options["contract"].get("degradation") or {}).get("downsample", {})
        inputs = {"condition": interpolate_back(low, factors, trained.get("interpolation", "linear"))[None]}
        if _exact(options["contract"]):
            inputs["low_res"] = low[None]
        return inputs

    def outputs(self, predictions: Tensor, tensors: dict[str, Tensor], case: Case,
                options: dict[str, Any]) -> dict[str, Output]:
        spacing = tuple(float(s) / f for s, f in zip(case.record["spacing"], self.factors))
        return {"image": Output(predictions.mean(0), "image", spacing=spacing)}

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"consistency": self.consistency and _exact(options["contract"])}


def _exact(contract: dict[str, Any]) -> bool:
    """Whether the trained degradation is the box average the consistency step inverts."""
    return (contract.get("degradation") or {}).get("downsample", {}).get("model", "average") == "average"
