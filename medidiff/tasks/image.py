"""What the image-to-image tasks share (restoration, super-resolution, synthesis): the target image is diffused
and the source image (degraded, interpolated, or of another modality) on the same grid is the condition, both
in ``[0, 1]`` modelled in ``[-1, 1]``; PSNR chooses the step count; the supervised baseline is a regression UNet
that predicts a residual on the condition; outputs are images in the input's units.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medidiff.core.guidance import Hook
from medidiff.core.padding import crop, pad_to_multiple, stride_multiple
from medidiff.data.cards import load_card
from medidiff.errors import MedidiffError
from medidiff.metrics import evaluate as E
from medidiff.sliding import window_inference
from medidiff.tasks.base import Case, Option, Output, Task, require_reference

NO_CONSISTENCY = Option(("--no-consistency",), {"action": "store_true", "help": "restoration, superres: skip the "
                                                "data-consistency step (to measure what it adds)"})


class ImageTask(Task):
    """Base of the image-to-image tasks.

    Args:
        consistency: apply the task's data-consistency hook when the batch carries the measurement.
        consistency_weight: 1 for a hard projection, less for a soft one (noisy measurements).
        residual_scale: when > 0, diffuse ``(image - condition) * residual_scale`` instead of the image, so the
            network models only what the condition misses, as the regression baselines do; the scale brings
            that small residual to the data's usual spread. Sampling adds the condition back: outputs, hooks
            and metrics stay in image space. 0 (default) diffuses the image.
        loss: the supervised baseline's loss on the restored image, ``l1`` or ``mse``.
    """

    selection_metric = ("psnr", "max")
    structural = ("residual_scale",)
    keeps_units = True
    degrades = True
    slice_batch: ClassVar[int | None] = None  # all slices of a volume at once

    evaluate_options = (
        Option(("--data-range",), {"type": float, "default": None, "help": "image tasks: intensity range (default: "
                                   "the card's window, else each reference's range)"}),
    )

    def __init__(self, consistency: bool = True, consistency_weight: float = 1.0, residual_scale: float = 0.0,
                 loss: Literal["l1", "mse"] = "l1", **more: Any):
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
        super().__init__(consistency=consistency, consistency_weight=consistency_weight,
                         residual_scale=residual_scale, loss=loss, **more)
        self.consistency, self.consistency_weight = consistency, consistency_weight
        self.residual_scale, self.loss = residual_scale, loss

    # ---------------------------------------------------------------------------------- training

    def target(self, batch: dict[str, Any]) -> Tensor:
        image = batch["image"].float() * 2 - 1
        return image if not self.residual_scale else (image - self.condition(batch)) * self.residual_scale

    def condition(self, batch: dict[str, Any]) -> Tensor:
        return batch["condition"].float() * 2 - 1

    def decode(self, samples: Tensor) -> Tensor:
        return ((samples + 1) / 2).clamp(0, 1)

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        error = (prediction.mean(0) - batch["image"].float()).pow(2).flatten(1).mean(1)
        return {"psnr": float((-10 * error.clamp(min=1e-10).log10()).mean())}

    def diffused_hook(self, hook: Hook | None, cond: Tensor | None) -> Hook | None:
        """With ``residual_scale`` the diffused variable is ``(image - cond) * scale``: the hook is moved there."""
        scale = self.residual_scale
        if hook is None or not scale or cond is None:
            return hook
        base = cond.float()
        return lambda x0_hat, sigma, x: (hook(base + x0_hat / scale, sigma, x) - base) * scale

    def undiffuse(self, samples: Tensor, cond: Tensor | None) -> Tensor:
        if not self.residual_scale or cond is None:
            return samples
        return cond.float() + samples / self.residual_scale

    # ------------------------------------------------------------------------- supervised regression

    def supervised_output(self, net: torch.nn.Module, cond: Tensor, roi: Sequence[int] | None) -> Tensor:
        """The network's residual on the condition (any input size: padded to what its down-samplings take)."""
        padded, pad = pad_to_multiple(cond, stride_multiple(net))
        return crop(net(padded), pad)

    def supervised_output_loss(self, output: Tensor, cond: Tensor, batch: dict[str, Any]) -> Tensor:
        estimate, target = self.supervised_estimate(output, cond), batch["image"].float() * 2 - 1
        return F.l1_loss(estimate, target) if self.loss == "l1" else F.mse_loss(estimate, target)

    def supervised_estimate(self, output: Tensor, cond: Tensor) -> Tensor:
        return cond + output

    def supervised_prediction(self, net: torch.nn.Module, inputs: dict[str, Any], window: Sequence[int] | None,
                              roi: Sequence[int] | None) -> Tensor:
        """The restored images ``(B, C, *spatial)`` in ``[0, 1]``: the condition plus the network's residual (in
        windows of ``window`` where the image is larger), then the data-consistency step once."""
        cond = self.condition(inputs)

        def forward(c: Tensor) -> Tensor:
            return self.supervised_estimate(self.supervised_output(net, c, None), c)

        if window and any(s > p for s, p in zip(cond.shape[2:], window)):
            estimate = window_inference(cond, window, 4, forward)
        else:
            estimate = forward(cond)
        hook = self.measurement_hook(inputs)
        if hook is not None:
            estimate = hook(estimate, torch.zeros(cond.shape[0], device=cond.device), estimate)
        return self.decode(estimate)

    # -------------------------------------------------------------------------------- evaluation

    @classmethod
    def evaluate(cls, args: Any) -> dict[str, Any]:
        card = None if args.card is None else load_card(args.card, check_files=False)
        data_range = args.data_range if args.data_range is not None else _card_range(card)
        require_reference(args, cls.name)
        return E.evaluate_image(args.pred, args.ref, data_range=data_range, pairs=args.pairs, out_json=args.out,
                                card=card)

    # --------------------------------------------------------------------------------- inference

    def outputs(self, predictions: Tensor, tensors: dict[str, Tensor], case: Case,
                options: dict[str, Any]) -> dict[str, Output]:
        return {"image": Output(predictions.mean(0), "image")}

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"consistency": self.consistency}

    def prepare(self, system: Any, contract: dict[str, Any], options: dict[str, Any], where: Any) -> None:
        if options.get("no_consistency"):
            self.consistency = False



def _card_range(card: Any) -> float | None:
    """The intensity range of the card's image scale: its window's width (None for percentile cards)."""
    if card is None:
        return None
    if "image" not in card.inputs:  # a card of two sources names source_a / source_b: no single image scale
        raise MedidiffError(f"has no 'image' input (its inputs: {', '.join(card.inputs)}), so it gives no intensity "
                            "range; give --data-range", card.path)
    norm = card.inputs["image"].normalise
    return float(norm["high"]) - float(norm["low"]) if norm["method"] == "window" else None
