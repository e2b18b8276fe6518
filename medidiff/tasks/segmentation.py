"""Segmentation: the mask is diffused, the image is the condition.

Binary tasks diffuse one channel (the mask scaled to [-1, 1]); K-class tasks diffuse the one-hot map. The
network's x0 estimate also gets a Dice loss (as in Diff-UNet, Xing et al. 2023), which lets a few-step sampler
land on sharp masks. The supervised baseline is a UNet with Dice + cross-entropy. Inference writes the label map
(the model's class ids), the ensemble-mean probability, entropy and variance, and every member's label map;
``--flips`` draws the ensemble for each flip of the image (test-time augmentation, flipped back).
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice
from torch import Tensor

from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.metrics import evaluate as E
from medidiff.metrics.segmentation import (
    ensemble_variance,
    fuse_majority_vote,
    fuse_mean_threshold,
    fuse_staple,
    predictive_entropy,
    with_background,
)
from medidiff.sliding import network_logits
from medidiff.tasks.base import Case, Option, Output, Task, require_inputs, require_reference


def mask_channels(num_classes: int) -> int:
    """Channels of the diffused mask: one foreground channel for a binary task, else one-hot of every class."""
    return 1 if num_classes == 2 else num_classes


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


class Segmentation(Task):
    """Segmentation of ``num_classes`` classes (background included).

    Args:
        num_classes: classes including background (2 for a binary mask); filled from the data card.
        dice_weight: weight of the Dice loss on the estimate (diffusion) or beside cross-entropy (the UNet
            baseline, MONAI ``DiceCELoss``; 0 trains on cross-entropy alone, a proper scoring rule).
        threshold: probability above which a binary voxel is foreground.
    """

    name = "segmentation"
    structural = ("num_classes",)
    selection_metric = ("dice", "max")
    resample = True
    window_dims = (3,)
    options = (
        Option(("--fusion",), {"default": "mean", "choices": ("mean", "vote", "staple"),
                               "help": "segmentation: how ensemble members become one label map"}),
        Option(("--flips",), {"type": int, "default": 1, "help": "segmentation: draw the ensemble for each of N "
                              "flips of the image (test-time augmentation, flipped back; up to 4 in 2D, 8 in 3D)"}),
    )

    evaluate_options = (
        Option(("--by-value",), {"action": "store_true", "help": "segmentation: compare the stored integers as they "
                                 "are, even where the predictions' labels.json names their classes (recorded)"}),
        Option(("--region",), {"type": Path, "help": "region mask(s) (e.g. DRIVE field of view): file or folder"}),
        Option(("--uncertainty",), {"action": "store_true", "help": "segmentation: also score prob/, entropy/ (and "
                                    "members/) beside the predictions: ECE, Brier, NLL, error AUROC, AURC, UEO (GED "
                                    "with members/)"}),
        Option(("--rater",), {"type": Path, "action": "append", "default": [], "help": "segmentation: another "
                              "observer's references (repeatable): GED and the AUROC of the uncertainty where "
                              "observers disagree"}),
        Option(("--nsd-tolerance",), {"type": float, "default": 1.0, "help": "segmentation: tolerance of the "
                                      "normalised surface Dice, in mm (pixels for 2D images)"}),
    )

    def __init__(self, num_classes: int | None = 2, dice_weight: float = 1.0, threshold: float = 0.5):
        if num_classes is None:
            raise ValueError("num_classes is null: medidiff fit fills it from the data card; give a number here")
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        super().__init__(num_classes=num_classes, dice_weight=dice_weight, threshold=threshold)
        self.num_classes, self.dice_weight, self.threshold = num_classes, dice_weight, threshold
        self.dice = DiceLoss(include_background=num_classes == 2, reduction="mean")
        self._validation_foreground: int | None = None

    # ------------------------------------------------------------------------------------- data

    @classmethod
    def data_keys(cls, card: Any) -> tuple[list[str], list[str]]:
        return ["image"], ["label"]

    @classmethod
    def check_card(cls, card: Any) -> None:
        require_inputs(card, cls.roles, cls.name)
        if not card.labels:
            raise MedidiffError("segmentation needs 'labels' in the card", card.path)

    @classmethod
    def contract_labels(cls, card: Any) -> dict[str, int]:
        return dict(card.labels)

    @classmethod
    def card_settings(cls, card: Any) -> dict[str, Any]:
        return {"num_classes": card.num_classes}

    @classmethod
    def channels(cls, card: Any, settings: dict[str, Any]) -> tuple[int, int]:
        return mask_channels(settings.get("num_classes") or card.num_classes), len(card.inputs["image"].use)

    # ------------------------------------------------------------------------------------- masks

    @property
    def mask_channels(self) -> int:
        return mask_channels(self.num_classes)

    def diffused_channels(self) -> int:
        return self.mask_channels

    def supervised_channels(self) -> int:
        return self.num_classes  # class logits

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """Softmax ``(B, C, *)``; binary tasks keep the foreground channel only, as the diffused mask does."""
        probability = logits.float().softmax(1)
        return probability[:, 1:] if self.num_classes == 2 else probability

    def one_hot(self, label: Tensor) -> Tensor:
        """``(B, 1, *spatial)`` class indices to ``(B, mask_channels, *spatial)`` in {0, 1}."""
        label = label.long()
        if self.num_classes == 2:
            return (label > 0).float()
        return F.one_hot(label[:, 0], self.num_classes).movedim(-1, 1).float()

    def label_map(self, probability: Tensor, spatial_dims: int) -> Tensor:
        """Per-class probabilities ``(..., C, *spatial)`` to class indices ``(..., 1, *spatial)``."""
        if self.num_classes == 2:
            return (probability > self.threshold).long()
        return probability.argmax(-(spatial_dims + 1), keepdim=True)

    # ---------------------------------------------------------------------------------- training

    def target(self, batch: dict[str, Any]) -> Tensor:
        return self.one_hot(batch["label"]) * 2 - 1

    def condition(self, batch: dict[str, Any]) -> Tensor:
        return batch["image"].float()

    def decode(self, samples: Tensor) -> Tensor:
        """Samples ``(N, B, C, *spatial)`` to per-class probabilities of the same shape (summing to 1 over C
        for K classes; the foreground probability for binary masks)."""
        probability = ((samples + 1) / 2).clamp(0, 1)
        if self.num_classes == 2:
            return probability
        return probability / probability.sum(2, keepdim=True).clamp(min=1e-6)

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        if self.dice_weight <= 0:
            return None
        probability = ((x0_hat + 1) / 2).clamp(0, 1)
        return self.dice_weight * self.dice(probability, (x0 + 1) / 2)

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        """Dice (mean over foreground classes, inside ``fov`` when the batch has one) of ``(N, B, C, *)``."""
        labels = self.label_map(prediction.mean(0), prediction.ndim - 3)
        region = batch.get("fov")
        pred, ref = self.one_hot(labels), self.one_hot(batch["label"])
        if region is not None:
            pred, ref = pred * (region > 0), ref * (region > 0)
        if self.num_classes == 2:
            pred, ref = with_background(pred, axis=1), with_background(ref, axis=1)
        found = int(ref[:, 1:].sum() > 0)  # patches with foreground this epoch (for the warning below)
        self._validation_foreground = (self._validation_foreground or 0) + found
        dice = compute_dice(pred, ref, include_background=False, ignore_empty=True)
        return {"dice": float(dice.nanmean())}

    def end_validation(self, sanity_checking: bool) -> None:
        """Warn when no sampled validation patch held any foreground: val/dice was NaN for the whole epoch."""
        if self._validation_foreground == 0 and not sanity_checking:
            rank_zero_warn("validation: no sampled validation patch holds any foreground, so val/dice is NaN; the "
                           "card's val cases may have empty label maps (check label_remap / label_threshold), or "
                           "raise the number of sampled validation batches")
        self._validation_foreground = None

    # ---------------------------------------------------------------------------- supervised UNet

    def supervised_output(self, net: torch.nn.Module, cond: Tensor, roi: Sequence[int] | None) -> Tensor:
        return network_logits(net, cond, roi)

    def supervised_output_loss(self, output: Tensor, cond: Tensor, batch: dict[str, Any]) -> Tensor:
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=self.dice_weight)(output, batch["label"])

    def supervised_estimate(self, output: Tensor, cond: Tensor) -> Tensor:
        return self.class_probabilities(output) * 2 - 1

    def supervised_validation(self, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        cond = self.condition(batch)
        logits = self.supervised_output(net, cond, None)
        return self.supervised_output_loss(logits, cond, batch), self.class_probabilities(logits)[None]

    def supervised_prediction(self, net: torch.nn.Module, inputs: dict[str, Any], window: Sequence[int] | None,
                              roi: Sequence[int] | None) -> Tensor:
        """Class probabilities ``(B, C, *)``; the UNet windows itself with its own ``roi_size``."""
        return self.class_probabilities(self.supervised_output(net, self.condition(inputs), roi))

    # -------------------------------------------------------------------------------- evaluation

    @classmethod
    def evaluate(cls, args: Any) -> dict[str, Any]:
        E.check_nsd_tolerance(args.nsd_tolerance)  # options first: before the card or any file is read
        require_reference(args, cls.name)
        return E.evaluate_segmentation(args.pred, args.ref, card=_reference_card(args.card), region_dir=args.region,
                                       pred_labels=E.prediction_labels(args.pred), by_value=args.by_value,
                                       uncertainty=args.uncertainty, raters=args.rater,
                                       nsd_tolerance=args.nsd_tolerance, pairs=args.pairs, out_json=args.out)

    # --------------------------------------------------------------------------------- inference

    def calls(self, options: dict[str, Any]) -> int:
        return int(options.get("flips", 1))

    def predict(self, system: Any, inputs: dict[str, Tensor], sampling: dict[str, Any],
                options: dict[str, Any]) -> Tensor:
        """Class probabilities ``(N, B, C, *spatial)`` of ``ensemble`` members, drawn for each of the first
        ``flips`` flips of the image (each flip its own seed, the image as is first with ``seed``): N = ensemble
        * flips. A network without randomness draws its ensemble members from flips instead."""
        flips, sampling = int(options.get("flips", 1)), dict(sampling)
        if not system.stochastic and sampling.get("ensemble", 1) > 1:
            flips, sampling["ensemble"] = self._deterministic_flips(sampling["ensemble"], flips,
                                                                    inputs["image"].ndim - 2), 1
        seed = sampling.pop("seed")
        image = inputs["image"]
        return over_flips(image, flips, lambda flipped, i: system.predict({**inputs, "image": flipped},
                                                                          seed=seed + i, **sampling))

    def _deterministic_flips(self, ensemble: int, flips: int, spatial_dims: int) -> int:
        if flips > 1:
            raise MedidiffError("a UNet without dropout draws its --ensemble members from flips of the image; "
                                "give --ensemble or --flips, not both")
        available = len(flip_sets(spatial_dims))
        if ensemble > available:
            raise MedidiffError(f"a UNet without dropout draws its ensemble members from the {available} flips "
                                f"of a {spatial_dims}D image; --ensemble {ensemble} asks for more (train with "
                                "net.init_args.dropout above 0 for MC dropout)")
        return ensemble

    def outputs(self, predictions: Tensor, tensors: dict[str, Tensor], case: Case,
                options: dict[str, Any]) -> dict[str, Output]:
        """Label map (the model's class ids), ensemble-mean probability and uncertainty maps from ``(N, C, *)``."""
        p = predictions.float().cpu().numpy()
        binary, fusion = self.num_classes == 2, options.get("fusion", "mean")
        members = self.label_map(predictions, predictions.ndim - 2).cpu().numpy()[:, 0]  # (N, *spatial)
        labels = {"mean": lambda: fuse_mean_threshold(p, self.threshold) if binary else p.mean(0).argmax(0),
                  "vote": lambda: fuse_majority_vote(members, self.num_classes),
                  "staple": lambda: fuse_staple(members, self.num_classes)}[fusion]()
        class_probs = with_background(p, axis=1) if binary else p
        maps = {"seg": np.asarray(labels)[None].astype(np.int16), "prob": p.mean(0),
                "entropy": predictive_entropy(class_probs)[None],
                "variance": ensemble_variance(class_probs).sum(0, keepdims=True)}
        if len(members) > 1:  # every member's label map (N channels): the sample set, for GED against raters
            maps["members"] = members.astype(np.int16)
        return {name: Output(torch.from_numpy(np.ascontiguousarray(array)), "label" if name in ("seg", "members")
                             else "map") for name, array in maps.items()}

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"fusion": options.get("fusion", "mean"), "flips": int(options.get("flips", 1))}

    def prepare(self, system: Any, contract: dict[str, Any], options: dict[str, Any], where: Any) -> None:
        flips, dims = int(options.get("flips", 1)), contract["spatial_dims"]
        if not 1 <= flips <= 2 ** dims:
            raise MedidiffError(f"--flips {flips}: a {dims}D model's images have {2 ** dims} sets of axes to flip "
                                "(the image as is included)", where)


def _reference_card(card_name: str | None) -> Any:
    """The references' card (a name or a card file; its data need not be present), which names their classes and
    says how their files are read; None without --card."""
    if card_name is None:
        return None

    card = load_card(card_name, check_files=False)
    if not card.labels:
        raise MedidiffError("names no labels, so it cannot say what the references' values are; segmentation "
                            "evaluation needs a card with labels", card.path)
    return card
