"""The deterministic bar diffusion must meet: MONAI's UNet with Dice + cross-entropy.

Same data module, same checkpoint format, same ``medidiff infer`` / ``medidiff evaluate`` commands as the
diffusion segmenter, so the two are compared by identical code paths (BASELINES.md: 0.807 Dice on DRIVE
after 8 CPU minutes).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

from medidiff.lit.base import MedidiffModule, crop, pad_to_multiple, stride_multiple
from medidiff.lit.segmentation import SegmentationOutputs
from medidiff.sliding import window_inference


class UNetSegmenter(SegmentationOutputs, MedidiffModule, L.LightningModule):
    """Supervised segmentation with a plain network predicting class logits.

    Args:
        net: ``medidiff.nets.PlainUNet`` (or any network with ``spatial_dims`` and a ``config``).
        num_classes: classes including background.
        lr, weight_decay: AdamW, constant learning rate (as the baseline in BASELINES.md).
        roi_size: sliding-window size for whole-image inference (None: whole image in one pass).
        threshold: foreground probability threshold for binary tasks.
    """

    task = "segmentation"

    def __init__(self, net: nn.Module, num_classes: int | None = 2, lr: float = 1e-3, weight_decay: float = 1e-4,
                 roi_size: Sequence[int] | None = None, threshold: float = 0.5):
        super().__init__()
        if num_classes is None:
            raise ValueError("num_classes is null: medidiff fit fills it from the data card; give a number here")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(self.net(batch["image"].float()), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.net(batch["image"].float())
        self.log("val/loss", self.loss(logits, batch["label"]), batch_size=logits.shape[0])
        for name, value in self.sample_metrics(self._probabilities(logits)[None], batch).items():
            self.log(f"val/{name}", value, batch_size=logits.shape[0])

    @torch.no_grad()
    def predict_probabilities(self, cond: Tensor, **ignored: Any) -> Tensor:
        """Class probabilities ``(1, B, C, *spatial)``, shaped like one diffusion ensemble member."""
        roi = self.hparams.roi_size
        if not roi:
            return self._probabilities(self.net(cond))[None]
        # windows no larger than the volume (as the diffusion models'), whose sizes the network must divide
        padded, pad = pad_to_multiple(cond, stride_multiple(self.net))
        logits = window_inference(padded, roi, 8, self.net, mode="constant")
        return self._probabilities(crop(logits, pad))[None]

    def _probabilities(self, logits: Tensor) -> Tensor:
        probability = logits.float().softmax(1)
        return probability[:, 1:] if self.hparams.num_classes == 2 else probability

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
