"""Image-to-image synthesis: an image of one modality from a registered image of another (MR -> CT, as
radiotherapy planning from MR alone needs a CT's electron densities).

The target modality (the card's input ``target``) is diffused, the source (``image``) is the condition; the
supervised baseline is the regression UNet of the other image tasks. Outputs are written in the target's units:
its card normalisation must therefore be a window (absolute units such as CT Hounsfield units or an 8-bit scale),
which the contract records.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.metrics import evaluate as E
from medidiff.tasks.base import Case, Output, require_inputs, require_reference
from medidiff.tasks.image import ImageTask


class Synthesis(ImageTask):
    """Synthesis of the card's ``target`` image from its ``image``; settings: see
    :class:`~medidiff.tasks.image.ImageTask` (no data consistency: nothing of the target is measured)."""

    name = "synthesis"
    keeps_units = False  # the output is in the target's units, not the input's
    degrades = False  # the condition is a real image of another modality, not a simulated degradation
    slice_batch = 8
    window_dims = (3,)

    @classmethod
    def data_keys(cls, card: Any) -> tuple[list[str], list[str]]:
        return ["image", "target"], []

    @classmethod
    def check_card(cls, card: Any) -> None:
        require_inputs(card, ("image", "target"), cls.name)
        if card.inputs["target"].normalise["method"] != "window":
            raise MedidiffError("synthesis writes images in the target's units, so inputs.target.normalise must be "
                                "a window (e.g. CT -1000..2000 HU, or 0..255 for 8-bit files), not percentiles",
                                card.path)

    @classmethod
    def channels(cls, card: Any, settings: dict[str, Any]) -> tuple[int, int]:
        return len(card.inputs["target"].use), len(card.inputs["image"].use)

    @classmethod
    def contract_extras(cls, card: Any) -> dict[str, Any]:
        spec = card.inputs["target"]
        return {"target": {"channels": list(spec.use), "modality": spec.modality or card.modality,
                           "normalise": dict(spec.normalise)}}

    def target(self, batch: dict[str, Any]) -> Tensor:
        image = batch["target"].float() * 2 - 1
        return image if not self.residual_scale else (image - self.condition(batch)) * self.residual_scale

    def condition(self, batch: dict[str, Any]) -> Tensor:
        return batch["image"].float() * 2 - 1

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        return super().sample_metrics(prediction, {"image": batch["target"]})

    def supervised_output_loss(self, output: Tensor, cond: Tensor, batch: dict[str, Any]) -> Tensor:
        return super().supervised_output_loss(output, cond, {"image": batch["target"]})

    def prepare(self, system: Any, contract: dict[str, Any], options: dict[str, Any], where: Any) -> None:
        if contract.get("target") is None:
            raise MedidiffError("holds no target units in its contract (a synthesis model must be trained by "
                                "medidiff fit on a card with an inputs.target window)", where)

    @classmethod
    def evaluate(cls, args: Any) -> dict[str, Any]:
        """PSNR, SSIM, NMSE and MAE against the references, on the target's scale (the card's target window)."""
        require_reference(args, cls.name)
        card = None if args.card is None else load_card(args.card, check_files=False)
        data_range = args.data_range if args.data_range is not None else _target_range(card)
        return E.evaluate_image(args.pred, args.ref, data_range=data_range, pairs=args.pairs, out_json=args.out,
                                metrics=("psnr", "ssim", "nmse", "mae"), card=card)

    def output_bounds(self, case: Case, contract: dict[str, Any]) -> Tensor:
        norm = contract["target"]["normalise"]
        return torch.tensor([[float(norm["low"]), float(norm["high"])]], dtype=torch.float64)

    def outputs(self, predictions: Tensor, tensors: dict[str, Tensor], case: Case,
                options: dict[str, Any]) -> dict[str, Output]:
        return {"image": Output(predictions.mean(0), "image")}

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        return {}


def _target_range(card: Any) -> float | None:
    """The width of the card's target window (the scale PSNR is taken on), or None without a card."""
    if card is None:
        return None
    require_inputs(card, ("target",), Synthesis.name)
    norm = card.inputs["target"].normalise
    return float(norm["high"]) - float(norm["low"])
