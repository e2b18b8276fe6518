"""Image-to-image tasks: restoration (denoising, artifact removal, undersampled MRI) and super-resolution.

The clean / high-resolution image is diffused, the degraded image (interpolated onto the target grid) is the
condition. Where the degradation is known, a data-consistency hook runs at every sampler step: a k-space
projection for undersampled MRI, a low-frequency projection for super-resolution.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from medidiff.core.guidance import DownsampleConsistency, Hook, KSpaceConsistency
from medidiff.core.operators import to_kspace
from medidiff.lit.base import DiffusionModule
from medidiff.sliding import SlidingWindowDenoiser


class ImageConventions:
    """Batch conventions of the image tasks, shared by the diffusion modules and the regression baselines:
    images in ``[0, 1]`` are modelled in ``[-1, 1]``; the degraded image is the condition."""

    selection_metric = ("psnr", "max")

    def condition(self, batch: dict[str, Any]) -> Tensor:
        return batch["condition"].float() * 2 - 1

    def decode(self, samples: Tensor) -> Tensor:
        return ((samples + 1) / 2).clamp(0, 1)

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        error = (prediction.mean(0) - batch["image"].float()).pow(2).flatten(1).mean(1)
        return {"psnr": float((-10 * error.clamp(min=1e-10).log10()).mean())}


class KSpaceMeasurement:
    """Restoration's data consistency: with a ``kspace_mask`` in the batch, the estimate is projected onto the
    measured k-space (needs ``hparams.consistency`` / ``consistency_weight`` and :class:`ImageConventions`)."""

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        mask = batch.get("kspace_mask")
        if mask is None or not self.hparams.consistency:
            return None
        dims = mask.ndim - 2
        # the zero-filled condition is the inverse FFT of the measurement, so its k-space *is* the measurement
        measured = to_kspace(self.condition(batch), dims) * mask
        return KSpaceConsistency(measured, mask, self.hparams.consistency_weight, dims)


class LowResMeasurement:
    """Super-resolution's data consistency: with ``low_res`` in the batch, ``downsample(estimate)`` is held
    equal to it (needs ``hparams.factors``, ``consistency`` and ``consistency_weight``)."""

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        lowres = batch.get("low_res")
        if lowres is None or not self.hparams.consistency or not self.hparams.factors:
            return None
        return DownsampleConsistency(lowres.float() * 2 - 1, self.hparams.factors, self.hparams.consistency_weight)


class ImageDiffusion(ImageConventions, DiffusionModule):
    """Shared by restoration and super-resolution diffusion.

    Args:
        consistency: apply the task's data-consistency hook when the batch carries the measurement.
        consistency_weight: 1 for a hard projection, less for a soft one (noisy measurements).
        residual_scale: when > 0, diffuse ``(image - condition) * residual_scale`` instead of the image, so the
            network models only what the condition misses, as the regression baselines do; the scale brings
            that small residual to the data's usual spread. Sampling adds the condition back: outputs, hooks
            and metrics stay in image space. 0 (default) diffuses the image.
        **kwargs: see :class:`medidiff.lit.base.DiffusionModule`.
    """

    def __init__(self, consistency: bool = True, consistency_weight: float = 1.0, residual_scale: float = 0.0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters("consistency", "consistency_weight", "residual_scale")

    def target_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        image, cond = batch["image"].float() * 2 - 1, self.condition(batch)
        scale = self.hparams.residual_scale
        return (image if not scale else (image - cond) * scale), cond

    def sample(self, cond: Tensor | None, *, hook: Hook | None = None, **kwargs: Any) -> Tensor:
        """:meth:`DiffusionModule.sample` in image space, whichever space is diffused (``residual_scale``).
        A hook sees image-space estimates ``x0_hat``; its ``x`` argument is the sampler's state."""
        scale = self.hparams.residual_scale
        if not scale or cond is None:
            return super().sample(cond, hook=hook, **kwargs)
        return cond.float() + super().sample(cond, hook=self.diffused_hook(hook, cond), **kwargs) / scale

    def diffused_hook(self, hook: Hook | None, cond: Tensor | None) -> Hook | None:
        """With ``residual_scale`` the diffused variable is ``(image - cond) * scale``: the hook is moved there."""
        scale = self.hparams.residual_scale
        if hook is None or not scale or cond is None:
            return hook
        base = cond.float()
        return lambda x0_hat, sigma, x: (hook(base + x0_hat / scale, sigma, x) - base) * scale

    @torch.no_grad()
    def estimate(self, cond: Tensor, hook: Hook | None = None, patch_size: Sequence[int] | None = None,
                 **sampling: Any) -> Tensor:
        """The ensemble-mean restored images ``(B, C, *spatial)`` in ``[0, 1]``; inputs larger than
        ``patch_size`` are denoised in sliding windows at every step."""
        denoiser = None
        if patch_size and any(s > p for s, p in zip(cond.shape[2:], patch_size)):
            denoiser = SlidingWindowDenoiser(self.denoiser, patch_size)
        return self.decode(self.sample(cond, hook=hook, denoiser=denoiser, **sampling)).mean(0)


class RestorationDiffusion(KSpaceMeasurement, ImageDiffusion):
    """Restoration; with a ``kspace_mask`` in the batch, every step is made consistent with the measured k-space."""

    task = "restoration"


class SuperResDiffusion(LowResMeasurement, ImageDiffusion):
    """Super-resolution; with ``low_res`` in the batch, ``downsample(estimate)`` is held equal to it.

    Args:
        factors: integer down-sampling factor per spatial axis of the acquisition (e.g. ``[1, 1, 4]``).
        **kwargs: see :class:`ImageDiffusion`.
    """

    task = "superres"

    def __init__(self, factors: Sequence[int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.save_hyperparameters("factors")
