"""Diffusion of the residual over a deterministic predictor (CARD, Han et al. 2022; HiDiff, Chen et al. 2024).

A supervised UNet learns most of a segmentation cheaply; what it gets wrong is a small, structured residual.
Here a conditional DDPM models ``p(mask - f(image) | image, f(image))``: the predictor's estimate ``f(image)``
(probabilities scaled to [-1, 1]) is both the sampler's start point — pure noise in residual space is noise
centred on the predictor's answer — and a condition beside the image. Everything else is the segmentation
diffusion module unchanged: the same denoiser, shared samplers, hooks, Dice loss (on the combined mask),
recycling and validated step count.

The predictor is either trained first (``predictor_ckpt``: a :class:`medidiff.lit.UNetSegmenter` checkpoint,
frozen) or jointly (``predictor``: a network config; its Dice + CE loss is added to the diffusion loss, and the
residual network sees its output detached). Its weights are stored in this module's checkpoints, so a trained
model is one self-contained file.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

from medidiff.errors import MedidiffError
from medidiff.lit.baseline import network_logits
from medidiff.lit.segmentation import SegmentationDiffusion

PREDICTOR_BASE = "_predictor_base"  # batch keys the loss terms share within one step
PREDICTOR_LOGITS = "_predictor_logits"


class ResidualSegmentationDiffusion(SegmentationDiffusion):
    """Conditional DDPM of the residual between the mask and a deterministic predictor's estimate.

    Args:
        predictor: ``{"class_path", "init_args"}`` of the predictor network (e.g. ``medidiff.nets.PlainUNet``
            with ``out_channels = num_classes``); filled in from ``predictor_ckpt`` when that is given.
        predictor_ckpt: a trained :class:`medidiff.lit.UNetSegmenter` checkpoint whose network becomes the
            predictor (read weights-only).
        train_predictor: train the predictor jointly (default: only when it does not come from a checkpoint).
        predictor_weight: weight of the predictor's Dice + CE loss when it is trained jointly.
        predictor_roi: sliding-window size of the predictor on images larger than it (None: whole image).
        predictor_source: where the predictor came from (recorded; set from ``predictor_ckpt``).
        **kwargs: see :class:`medidiff.lit.SegmentationDiffusion`; the network's ``cond_channels`` are the
            image channels plus the mask channels.
    """

    def __init__(self, predictor: dict[str, Any] | None = None, predictor_ckpt: str | None = None,
                 train_predictor: bool | None = None, predictor_weight: float = 1.0,
                 predictor_roi: Sequence[int] | None = None, predictor_source: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters("predictor", "predictor_ckpt", "train_predictor", "predictor_weight",
                                  "predictor_roi", "predictor_source")
        if predictor_ckpt is not None:
            predictor, weights, roi = _predictor_from_checkpoint(predictor_ckpt, self.hparams.num_classes)
            # the checkpoint is read once: later loads rebuild the network from its config and this module's weights;
            # the predictor sees images as it did when it was scored alone (its own windows)
            self.hparams.update(predictor=predictor, predictor_ckpt=None, predictor_source=str(predictor_ckpt),
                                train_predictor=bool(train_predictor),
                                predictor_roi=predictor_roi if predictor_roi is not None else roi)
        elif predictor is None:
            raise ValueError("give the predictor: predictor_ckpt (a trained UNetSegmenter checkpoint) or predictor "
                             "(a network config to train jointly)")
        else:
            weights = None
            self.hparams.train_predictor = True if train_predictor is None else bool(train_predictor)
        self.predictor = _build(predictor, predictor_ckpt)
        if weights is not None:
            self.predictor.load_state_dict(weights)
        self._check_channels()
        self.predictor.requires_grad_(self.hparams.train_predictor)
        self.predictor_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def _check_channels(self) -> None:
        classes, image = self.hparams.num_classes, getattr(self.predictor, "in_channels", None)
        if getattr(self.predictor, "out_channels", classes) != classes:
            raise ValueError(f"the predictor outputs {self.predictor.out_channels} classes but num_classes is "
                             f"{classes}")
        expected = (image or 0) + self.mask_channels
        if image is not None and self.net.cond_channels != expected:
            raise ValueError(f"the network's cond_channels is {self.net.cond_channels} but the image "
                             f"({image} channel(s)) and the predictor's estimate ({self.mask_channels}) make "
                             f"{expected}; set net.init_args.cond_channels={expected}")

    def train(self, mode: bool = True) -> ResidualSegmentationDiffusion:
        super().train(mode)
        if not self.hparams.train_predictor:
            self.predictor.eval()  # a frozen predictor keeps its normalisation statistics and no dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = list(self.predictor.parameters()) if self.hparams.train_predictor else []
        return [*self.net.parameters(), *extra]

    # ------------------------------------------------------------------------------ the residual

    def predictor_estimate(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, base)``: the predictor's class logits and its estimate of the diffused mask in [-1, 1]."""
        logits = network_logits(self.predictor, image, self.hparams.predictor_roi)
        return logits, self.class_probabilities(logits) * 2 - 1

    def target_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        image = batch["image"].float()
        with torch.set_grad_enabled(self.hparams.train_predictor and torch.is_grad_enabled()):
            logits, base = self.predictor_estimate(image)
        base = base.detach()
        batch[PREDICTOR_BASE], batch[PREDICTOR_LOGITS] = base, logits
        # mask and base both lie in [-1, 1]: half their difference does too
        return (self.one_hot(batch["label"]) * 2 - 1 - base) / 2, torch.cat([image, base], 1)

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        base = batch[PREDICTOR_BASE]
        loss = super().extra_loss(base + 2 * x0_hat, base + 2 * x0, batch)
        if self.hparams.train_predictor:
            joint = self.hparams.predictor_weight * self.predictor_loss(batch[PREDICTOR_LOGITS], batch["label"])
            loss = joint if loss is None else loss + joint
        return loss

    def member_probabilities(self, cond: Tensor, **sampling: Any) -> Tensor:
        """Samples of the mask ``(N, B, C, *spatial)`` for an image ``cond``: the predictor's estimate plus
        sampled residuals, decoded to probabilities."""
        _, base = self.predictor_estimate(cond.float())
        residual = self.sample(torch.cat([cond.float(), base], 1), **sampling)
        return self.decode(base[None] + 2 * residual)


def _predictor_from_checkpoint(path: str, num_classes: int) -> tuple[dict[str, Any], dict[str, Tensor],
                                                                     list[int] | None]:
    from medidiff.checkpoint import checkpoint_record, read_checkpoint

    content = read_checkpoint(path)
    record = checkpoint_record(content, path)
    if record.get("module") != "UNetSegmenter":
        raise MedidiffError(f"is a {record.get('module')} checkpoint; the predictor must be a UNetSegmenter",
                            path)
    hparams = content.get("hyper_parameters", {})
    classes = hparams.get("num_classes")
    if classes != num_classes:
        raise MedidiffError(f"predicts {classes} classes but this model has num_classes {num_classes}", path)
    weights = {k[len("net."):]: v for k, v in content["state_dict"].items() if k.startswith("net.")}
    roi = hparams.get("roi_size")
    return record["net_config"], weights, list(roi) if roi else None


def _build(config: dict[str, Any], path: str | None) -> nn.Module:
    from medidiff.checkpoint import build_network

    return build_network(config, path or "predictor")
