"""Segmentation as conditional diffusion: the mask is diffused, the image is the condition.

Binary tasks diffuse one channel (mask scaled to [-1, 1]); K-class tasks diffuse the one-hot map. The
network's x0 estimate also gets a Dice loss (as in Diff-UNet, Xing et al. 2023), which lets a few-step
sampler land on sharp masks.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import compute_dice
from torch import Tensor

from medidiff.errors import MedidiffError
from medidiff.lit.base import DiffusionModule


def flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *spatial)`` tensor, the empty one (no flip) first."""
    axes = range(2, 2 + spatial_dims)
    return [subset for size in range(spatial_dims + 1) for subset in combinations(axes, size)]


def over_flips(image: Tensor, flips: int, members: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Test-time flips: ``members(flipped, i)`` ``(N, B, C, *)`` for ``image`` ``(B, C, *)`` flipped along each
    of the first ``flips`` sets of spatial axes (the image as is first), each flipped back, all stacked:
    ``(flips * N, B, C, *)``."""
    sets = flip_sets(image.ndim - 2)
    if not 1 <= flips <= len(sets):
        raise MedidiffError(f"--flips {flips}: a {image.ndim - 2}D image has {len(sets)} sets of axes to flip "
                            f"(the image as is included); give 1 to {len(sets)}")
    return torch.cat([members(image.flip(axes), i).flip([axis + 1 for axis in axes])
                      for i, axes in enumerate(sets[:flips])])


def mask_channels(num_classes: int) -> int:
    """Channels of the diffused mask: one foreground channel for a binary task, else one-hot of every class."""
    return 1 if num_classes == 2 else num_classes


class SegmentationOutputs:
    """What every segmentation module shares: one-hot targets, label maps and the validation Dice.

    Needs ``self.hparams.num_classes``, ``self.hparams.threshold`` and ``self.net.spatial_dims``.
    """

    selection_metric = ("dice", "max")

    @property
    def mask_channels(self) -> int:
        return mask_channels(self.hparams.num_classes)

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """Softmax ``(B, C, *)``; binary tasks keep the foreground channel only, as the diffused mask does."""
        probability = logits.float().softmax(1)
        return probability[:, 1:] if self.hparams.num_classes == 2 else probability

    def one_hot(self, label: Tensor) -> Tensor:
        """``(B, 1, *spatial)`` class indices to ``(B, mask_channels, *spatial)`` in {0, 1}."""
        label = label.long()
        if self.hparams.num_classes == 2:
            return (label > 0).float()
        return F.one_hot(label[:, 0], self.hparams.num_classes).movedim(-1, 1).float()

    def label_map(self, probability: Tensor) -> Tensor:
        """Per-class probabilities ``(..., C, *spatial)`` to class indices ``(..., 1, *spatial)``."""
        if self.hparams.num_classes == 2:
            return (probability > self.hparams.threshold).long()
        return probability.argmax(-(self.net.spatial_dims + 1), keepdim=True)

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        """Dice (mean over foreground classes, inside ``fov`` when the batch has one) of ``(N, B, C, *)``."""
        labels = self.label_map(prediction.mean(0))
        region = batch.get("fov")
        pred, ref = self.one_hot(labels), self.one_hot(batch["label"])
        if region is not None:
            pred, ref = pred * (region > 0), ref * (region > 0)
        if self.hparams.num_classes == 2:
            pred, ref = torch.cat([1 - pred, pred], 1), torch.cat([1 - ref, ref], 1)
        found = int(ref[:, 1:].sum() > 0)  # patches with foreground this epoch (for the warning below)
        self._validation_foreground = (getattr(self, "_validation_foreground", None) or 0) + found
        dice = compute_dice(pred, ref, include_background=False, ignore_empty=True)
        return {"dice": float(dice.nanmean())}

    def on_validation_epoch_end(self) -> None:
        """Warn when no sampled validation patch held any foreground: val/dice was NaN for the whole epoch."""
        super().on_validation_epoch_end()
        if getattr(self, "_validation_foreground", None) == 0 and not getattr(self._trainer, "sanity_checking", False):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("validation: no sampled validation patch holds any foreground, so val/dice is NaN; the "
                           "card's val cases may have empty label maps (check label_remap / label_threshold), or "
                           "raise model.init_args.val_sampling_batches")
        self._validation_foreground = None


class SegmentationDiffusion(SegmentationOutputs, DiffusionModule):
    """Conditional DDPM for ``p(mask | image)``.

    Args:
        num_classes: classes including background (2 for a binary mask); linked from the data module.
        dice_weight: weight of the Dice loss on the network's estimate of the mask (0 disables it).
        threshold: probability above which a binary voxel is foreground.
        **kwargs: see :class:`medidiff.lit.base.DiffusionModule`.
    """

    task = "segmentation"

    def __init__(self, num_classes: int | None = 2, dice_weight: float = 1.0, threshold: float = 0.5, **kwargs: Any):
        super().__init__(**kwargs)
        if num_classes is None:
            raise ValueError("num_classes is null: medidiff fit fills it from the data card; give a number here")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.save_hyperparameters("num_classes", "dice_weight", "threshold")
        self.dice = DiceLoss(include_background=num_classes == 2, reduction="mean")
        expected = self.mask_channels
        if self.net.in_channels != expected:
            raise ValueError(f"the network diffuses {self.net.in_channels} channels but {num_classes} classes need "
                             f"{expected}; set net.init_args.in_channels={expected}")

    def target_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return self.one_hot(batch["label"]) * 2 - 1, self.condition(batch)

    def condition(self, batch: dict[str, Any]) -> Tensor:
        return batch["image"].float()

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        if self.hparams.dice_weight <= 0:
            return None
        probability = ((x0_hat + 1) / 2).clamp(0, 1)
        return self.hparams.dice_weight * self.dice(probability, (x0 + 1) / 2)

    @torch.no_grad()
    def predict_probabilities(self, cond: Tensor, flips: int = 1, **sampling: Any) -> Tensor:
        """Class probabilities ``(N, B, C, *spatial)`` of ``ensemble`` members for an image ``cond``, drawn for
        each of the first ``flips`` flips of the image (test-time augmentation, flipped back; each flip its own
        seed, the image as is first with ``seed``): N = ensemble * flips."""
        if flips > 1 and sampling.get("hook") is not None:
            raise MedidiffError("test-time flips would flip this model's per-step measurement hook too; use --flips 1")
        seed = sampling.pop("seed", None)
        seed = self.hparams.seed if seed is None else seed
        return over_flips(cond, flips, lambda image, i: self.member_probabilities(image, seed=seed + i, **sampling))

    def member_probabilities(self, cond: Tensor, **sampling: Any) -> Tensor:
        """Decoded samples ``(N, B, C, *spatial)`` of the image as given."""
        return self.decode(self.sample(cond, **sampling))

    def decode(self, samples: Tensor) -> Tensor:
        """Samples ``(N, B, C, *spatial)`` to per-class probabilities of the same shape (summing to 1 over C
        for K classes; the foreground probability for binary masks)."""
        probability = ((samples + 1) / 2).clamp(0, 1)
        if self.hparams.num_classes == 2:
            return probability
        return probability / probability.sum(2, keepdim=True).clamp(min=1e-6)

