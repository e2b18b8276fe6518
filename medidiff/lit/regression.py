"""The deterministic bar for the image tasks: a regression UNet from the degraded to the clean image.

Same data module, checkpoint format and ``medidiff infer`` / ``medidiff evaluate`` commands as the diffusion
modules, so both are compared by identical code paths. The network predicts a residual on top of the condition
(the interpolated or zero-filled image); the task's data-consistency step, when the measurement is known, is
applied once to the output — the same projection diffusion applies at every step, so the comparison isolates
what the generative prior adds.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medidiff.core.guidance import Hook
from medidiff.lit.base import MedidiffModule, crop, pad_to_multiple, stride_multiple
from medidiff.lit.image import ImageConventions, KSpaceMeasurement, LowResMeasurement
from medidiff.sliding import window_inference


class ImageRegressor(ImageConventions, MedidiffModule, L.LightningModule):
    """Supervised image-to-image regression, images in ``[0, 1]`` mapped to ``[-1, 1]``.

    Args:
        net: ``medidiff.nets.PlainUNet`` with as many input as output channels.
        loss: ``l1`` or ``mse`` on the restored image.
        lr, weight_decay: AdamW, constant learning rate (as the segmentation baseline).
        consistency, consistency_weight: apply the task's data-consistency step to the output.
    """

    task = "base"

    def __init__(self, net: nn.Module, loss: Literal["l1", "mse"] = "l1", lr: float = 1e-3,
                 weight_decay: float = 1e-4, consistency: bool = True, consistency_weight: float = 1.0):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
        self.net = net

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        return None

    def forward(self, cond: Tensor) -> Tensor:
        """The clean estimate in ``[-1, 1]``: the condition plus a learnt residual (any input size: padded to
        what the network's down-samplings take, cropped back)."""
        padded, pad = pad_to_multiple(cond, stride_multiple(self.net))
        return cond + crop(self.net(padded), pad)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), batch_size=batch["image"].shape[0])
        prediction = self.estimate(self.condition(batch), hook=self.measurement_hook(batch))
        for name, value in self.sample_metrics(prediction[None], batch).items():
            self.log(f"val/{name}", value, batch_size=prediction.shape[0])

    def _loss(self, batch: dict[str, Any]) -> Tensor:
        estimate, target = self(self.condition(batch)), batch["image"].float() * 2 - 1
        return F.l1_loss(estimate, target) if self.hparams.loss == "l1" else F.mse_loss(estimate, target)

    @torch.no_grad()
    def estimate(self, cond: Tensor, hook: Hook | None = None, patch_size: Sequence[int] | None = None,
                 **ignored_sampling: Any) -> Tensor:
        """The restored images ``(B, C, *spatial)`` in ``[0, 1]``; sampling options are accepted and ignored,
        so file-level inference treats regressors and diffusion models alike."""
        if patch_size and any(s > p for s, p in zip(cond.shape[2:], patch_size)):
            estimate = window_inference(cond, patch_size, 4, self)
        else:
            estimate = self(cond)
        if hook is not None:
            estimate = hook(estimate, torch.zeros(cond.shape[0], device=cond.device), estimate)
        return self.decode(estimate)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.estimate(self.condition(batch), hook=self.measurement_hook(batch))[None]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class RestorationUNet(KSpaceMeasurement, ImageRegressor):
    """Restoration baseline; k-space consistency is applied to the output when the batch carries a mask."""

    task = "restoration"


class SuperResUNet(LowResMeasurement, ImageRegressor):
    """Super-resolution baseline; ``downsample(output) == low_res`` is enforced when the batch carries it.

    Args:
        factors: integer down-sampling factor per spatial axis (e.g. ``[1, 1, 4]``).
        **kwargs: see :class:`ImageRegressor`.
    """

    task = "superres"

    def __init__(self, factors: Sequence[int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters("factors")
