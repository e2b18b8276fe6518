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

from medidiff.errors import MedidiffError
from medidiff.lit.base import MedidiffModule, crop, pad_to_multiple, stride_multiple
from medidiff.lit.segmentation import SegmentationOutputs, flip_sets, over_flips
from medidiff.sliding import window_inference


class UNetSegmenter(SegmentationOutputs, MedidiffModule, L.LightningModule):
    """Supervised segmentation with a plain network predicting class logits.

    Args:
        net: ``medidiff.nets.PlainUNet`` (or any network with ``spatial_dims`` and a ``config``).
        num_classes: classes including background.
        lr, weight_decay: AdamW, constant learning rate (as the baseline in BASELINES.md).
        roi_size: sliding-window size for whole-image inference (None: whole image in one pass).
        threshold: foreground probability threshold for binary tasks.
        dice_weight: weight of the Dice term beside cross-entropy (MONAI ``DiceCELoss``); 0 trains on
            cross-entropy alone, a proper scoring rule, so its probabilities are not pushed to 0 and 1.
    """

    task = "segmentation"

    def __init__(self, net: nn.Module, num_classes: int | None = 2, lr: float = 1e-3, weight_decay: float = 1e-4,
                 roi_size: Sequence[int] | None = None, threshold: float = 0.5, dice_weight: float = 1.0):
        super().__init__()
        if num_classes is None:
            raise ValueError("num_classes is null: medidiff fit fills it from the data card; give a number here")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=dice_weight)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(self.net(batch["image"].float()), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.net(batch["image"].float())
        self.log("val/loss", self.loss(logits, batch["label"]), batch_size=logits.shape[0])
        for name, value in self.sample_metrics(self.class_probabilities(logits)[None], batch).items():
            self.log(f"val/{name}", value, batch_size=logits.shape[0])

    @torch.no_grad()
    def predict_probabilities(self, cond: Tensor, ensemble: int | None = None, seed: int | None = None,
                              flips: int = 1, **ignored: Any) -> Tensor:
        """Class probabilities ``(N, B, C, *spatial)``, shaped like N diffusion ensemble members.

        ``ensemble`` N > 1 draws N test-time members: with dropout on (MC dropout) when the network was built
        with dropout, else the image flipped along a different set of spatial axes for each member (test-time
        augmentation; member 0 is the image as is), each prediction flipped back. ``flips`` F flips the image
        as diffusion segmenters do: N MC-dropout members (or one pass) for each of F flips.
        """
        members = ensemble or 1
        if members > 1 and getattr(self.net, "config", {}).get("dropout", 0) == 0:
            if flips > 1:
                raise MedidiffError("a UNet without dropout draws its --ensemble members from flips of the image; "
                                    "give --ensemble or --flips, not both")
            available = len(flip_sets(cond.ndim - 2))
            if members > available:
                raise MedidiffError(f"a UNet without dropout draws its ensemble members from the {available} flips "
                                    f"of a {cond.ndim - 2}D image; --ensemble {members} asks for more (train with "
                                    "net.init_args.dropout above 0 for MC dropout)")
            flips, members = members, 1
        return over_flips(cond, flips, lambda image, _: self._members(image, members, seed))

    def _members(self, image: Tensor, members: int, seed: int | None) -> Tensor:
        if members == 1:
            return self.class_probabilities(self._logits(image))[None]
        return torch.stack([self.class_probabilities(logits) for logits in self._dropout_logits(image, members, seed)])

    def _logits(self, cond: Tensor) -> Tensor:
        return network_logits(self.net, cond, self.hparams.roi_size)

    def _dropout_logits(self, cond: Tensor, members: int, seed: int | None) -> list[Tensor]:
        dropouts = [m for m in self.net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        devices = [cond.device] if cond.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seeded members that leave the global generator alone
            torch.manual_seed(self.hparams.get("seed", 0) if seed is None else seed)
            for module in dropouts:
                module.train()
            try:
                return [self._logits(cond) for _ in range(members)]
            finally:
                for module in dropouts:
                    module.eval()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def network_logits(net: nn.Module, image: Tensor, roi: Sequence[int] | None) -> Tensor:
    """``net(image)`` over the whole image, or with sliding windows of ``roi`` (no larger than the image)."""
    # sizes the network's strides must divide, for the whole image as for each window
    padded, pad = pad_to_multiple(image, stride_multiple(net))
    logits = net(padded) if not roi else window_inference(padded, roi, 8, net, mode="constant")
    return crop(logits, pad)
