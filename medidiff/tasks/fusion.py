"""Multimodal fusion (CT / PET / SPECT with MRI): an unconditional diffusion prior over the images of both
modalities, and fusion at sampling time through the likelihood hook of
:class:`medidiff.core.fusion_likelihood.FusionLikelihood` applied to every x0 estimate (DDFM-style).

Training diffuses single images of either modality (the card's ``source_a`` and ``source_b``, one at a time as
``image``); inference takes the two registered sources ``(B, 1, *spatial)`` in ``[0, 1]`` and fuses their luma;
the colour source's chroma (colour-mapped PET / SPECT) comes back on the fused luma (:func:`restore_colour`).
Classical baselines (average, max-abs, Laplacian pyramid) run through the same command with ``--method``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medidiff.core.fusion_likelihood import FusionLikelihood, GradientTarget, IntensityTarget
from medidiff.data.cards import load_card
from medidiff.data.custom import ycbcr_to_rgb
from medidiff.errors import MedidiffError
from medidiff.fusion_classical import CLASSICAL_FUSION
from medidiff.metrics import evaluate as E
from medidiff.tasks.base import Case, Option, Output, Task, require_inputs


class Fusion(Task):
    """Fusion of two registered sources; the settings are the likelihood's (see :class:`FusionLikelihood`)."""

    name = "fusion"
    roles = ("source_a", "source_b")
    selection_metric = ("fusion_loss", "min")
    png_main = True
    luma = True
    condition_free = True
    options = (
        Option(("--method",), {"default": "diffusion", "choices": ("diffusion", *CLASSICAL_FUSION),
                               "help": "fusion: the diffusion prior (--ckpt) or a classical baseline"}),
    )

    evaluate_options = (
        Option(("--source-a",), {"type": Path, "help": "fusion: first source (file or folder)"}),
        Option(("--source-b",), {"type": Path, "help": "fusion: second source (file or folder)"}),
    )

    def __init__(self, intensity_weight: float = 10.0, gradient_weight: float = 10.0, prior_weight: float = 1.0,
                 prior_error: float = 0.0, intensity_target: IntensityTarget = "max",
                 gradient_target: GradientTarget = "max", em_iterations: int = 1, cg_iterations: int = 10):
        super().__init__(intensity_weight=intensity_weight, gradient_weight=gradient_weight,
                         prior_weight=prior_weight, prior_error=prior_error, intensity_target=intensity_target,
                         gradient_target=gradient_target, em_iterations=em_iterations, cg_iterations=cg_iterations)

    # ------------------------------------------------------------------------------------- data

    @classmethod
    def data_keys(cls, card: Any) -> tuple[list[str], list[str]]:
        return list(cls.roles), []

    @classmethod
    def check_card(cls, card: Any) -> None:
        require_inputs(card, cls.roles, cls.name)

    @classmethod
    def training_sources(cls, card: Any) -> list[str]:
        return list(cls.roles)

    @classmethod
    def channels(cls, card: Any, settings: dict[str, Any]) -> tuple[int, int]:
        return 1, 0  # the luma, unconditional

    def diffused_channels(self) -> int:
        return 1

    # ---------------------------------------------------------------------------------- training

    def target(self, batch: dict[str, Any]) -> Tensor:
        return batch["image"].float() * 2 - 1

    def condition(self, batch: dict[str, Any]) -> None:
        return None

    def sample_shape(self, batch: dict[str, Any]) -> tuple[int, ...]:
        source = batch["source_a"]
        return (source.shape[0], *source.shape[2:])

    def decode(self, samples: Tensor) -> Tensor:
        return ((samples + 1) / 2).clamp(0, 1)

    def scores(self, batch: dict[str, Any]) -> bool:
        return "source_a" in batch  # the data module's validation batches are single images: nothing to fuse

    def likelihood(self, source_a: Tensor, source_b: Tensor) -> FusionLikelihood:
        """The hook for sources ``(B, 1, *spatial)`` in ``[0, 1]``."""
        if source_a.shape != source_b.shape:
            raise ValueError(f"sources differ in shape: {tuple(source_a.shape)} vs {tuple(source_b.shape)}")
        a, b = (s.float() * 2 - 1 for s in (source_a, source_b))
        return FusionLikelihood(a, b, **self.config)

    def measurement_hook(self, batch: dict[str, Any]) -> FusionLikelihood | None:
        if "source_a" not in batch or "source_b" not in batch:
            return None
        return self.likelihood(batch["source_a"], batch["source_b"])

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        """The fusion loss of the ensemble-mean fused image (lower keeps more of both sources)."""
        hook = self.likelihood(batch["source_a"], batch["source_b"])
        return {"fusion_loss": float(hook.loss(prediction.mean(0).to(batch["source_a"].device) * 2 - 1).mean())}

    # -------------------------------------------------------------------------------- evaluation

    @classmethod
    def evaluate(cls, args: Any) -> dict[str, Any]:
        if args.pairs is None and not (args.source_a and args.source_b):
            raise MedidiffError("fusion evaluation needs --source-a and --source-b (or a --pairs file)")
        card = None if args.card is None else load_card(args.card, check_files=False)
        return E.evaluate_fusion(args.pred, args.source_a, args.source_b, out_json=args.out, pairs=args.pairs,
                                 card=card)

    # --------------------------------------------------------------------------------- inference

    def model_inputs(self, tensors: dict[str, Tensor], case: Case, options: dict[str, Any]) -> dict[str, Tensor]:
        return {role: tensors[role].float()[None] for role in self.roles}

    def outputs(self, predictions: Tensor, tensors: dict[str, Tensor], case: Case,
                options: dict[str, Any]) -> dict[str, Output]:
        fused = predictions.mean(0)
        chroma = tensors.get("source_b_chroma", tensors.get("source_a_chroma"))
        if chroma is None:
            return {"fused": Output(fused.clamp(0, 1), "image")}
        return {"fused": Output(restore_colour(fused.clamp(0, 1), chroma, channel_dim=0), "unit")}

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"method": options.get("method", "diffusion")}


def restore_colour(luma: Tensor, chroma: Tensor, channel_dim: int = 1) -> Tensor:
    """Fused luma and the colour source's chroma (Cb, Cr) to RGB in ``[0, 1]``.

    Colour-mapped PET / SPECT keep their hue and saturation; the structure is the fused one.

    Args:
        luma: ``(B, 1, *spatial)`` in ``[0, 1]`` (or ``(1, *spatial)`` with ``channel_dim=0``).
        chroma: ``(B, 2, *spatial)`` as the data module gives ``source_b_chroma``.
    """
    ycbcr = torch.cat([luma.float(), chroma.float().to(luma.device)], dim=channel_dim)
    return ycbcr_to_rgb(ycbcr, channel_dim=channel_dim).clamp(0, 1)


def classical_contract(spatial_dims: int = 2) -> dict[str, Any]:
    """What classical fusion (and a prior built in Python, without a checkpoint) takes: grey or colour images,
    8-bit image files on their 0..255 scale, other files between their 0.5 and 99.5 percentiles."""
    entry = {"channels": ["grey"], "use": ["grey"], "modality": None, "normalise": {"method": "auto"},
             "profile": None}
    return {"version": 1, "task": Fusion.name, "spatial_dims": spatial_dims, "data_dims": 3, "slice_axis": 2,
            "patch_size": None, "inputs": {"source_a": entry, "source_b": dict(entry)}, "labels": {},
            "spacing": None, "orientation": "RAS", "degradation": None, "factors": None, "sampling": None,
            "card": {"name": "none (classical fusion)", "description": "", "modality": ""}}
