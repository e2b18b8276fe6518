"""Guidance and per-step hooks: what tasks plug into the shared samplers.

A hook has the signature ``hook(x0_hat, sigma, x) -> x0_hat`` and is applied by every sampler to every
denoiser output (``x0_hat``: ``(B, C, *spatial)``; ``sigma``: ``(B,)``; ``x``: the current noisy state).
Hooks here are dimension-agnostic and stateless apart from the measurement they hold.

- :class:`KSpaceConsistency`: project onto the measured k-space (hard) or move toward it (soft), as in
  score-based MRI reconstruction (Chung & Ye, 2022) and DDNM's range-null-space projection (Wang et al., 2023).
- :class:`DownsampleConsistency`: make ``downsample(x0_hat)`` equal the low-resolution input.
- :class:`GradientStep`: a likelihood step ``x0 -= step * grad ||A(x0) - y||^2`` for any differentiable
  operator ``A`` (the DPS idea of Chung et al., 2023, taken in x0-space so it needs no network gradient).
- :class:`ClassifierFreeGuidance`: a denoiser wrapper (Ho & Salimans, 2022).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from medidiff.core.denoiser import append_dims
from medidiff.core.operators import downsample, from_kspace, to_kspace, upsample_nearest

Hook = Callable[[Tensor, Tensor, Tensor], Tensor]


def compose_hooks(*hooks: Hook | None) -> Hook | None:
    """Apply hooks left to right; ``None`` entries are skipped, and no hooks at all gives ``None``."""
    active = [h for h in hooks if h is not None]
    if not active:
        return None

    def composed(x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        for hook in active:
            x0_hat = hook(x0_hat, sigma, x)
        return x0_hat

    return composed


def clamp_hook(low: float = -1.0, high: float = 1.0) -> Hook:
    """Clip ``x0_hat`` to the data range, as MONAI's and diffusers' ``clip_sample`` do."""
    return lambda x0_hat, sigma, x: x0_hat.clamp(low, high)


class KSpaceConsistency:
    """Data consistency with an undersampled k-space measurement.

    Args:
        measured: measured k-space ``(B, C, *spatial)`` (complex), zero where not sampled, as returned by
            :func:`medidiff.core.operators.undersample`.
        mask: 0/1 sampling mask broadcastable to ``measured``.
        weight: 1 replaces the sampled k-space by the measurement (hard projection); ``0 < weight < 1``
            moves toward it (soft consistency for noisy data, ``weight = 1 / (1 + noise_var / prior_var)``).
        dims: number of trailing axes the FFT covers (2 for slice-wise 2D acquisitions of a volume).
    """

    def __init__(self, measured: Tensor, mask: Tensor, weight: float = 1.0, dims: int | None = None):
        if not 0 < weight <= 1:
            raise ValueError(f"k-space consistency weight must be in (0, 1], got {weight}")
        self.measured, self.mask, self.weight, self.dims = measured, mask, weight, dims

    def __call__(self, x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        k = to_kspace(x0_hat, self.dims)
        k = k + self.weight * self.mask * (self.measured.to(k.dtype) - k)
        return from_kspace(k, self.dims).to(x0_hat.dtype)


class DownsampleConsistency:
    """Make ``downsample(x0_hat, factors)`` equal the low-resolution input (DDNM-style null-space projection).

    ``x0 <- x0 - up(down(x0)) + up(lowres)`` with average pooling ``down`` and voxel replication ``up``;
    since ``down(up(z)) = z``, the result satisfies ``down(x0) = lowres`` exactly while keeping all detail
    of ``x0_hat`` that the down-sampling cannot see.

    Args:
        lowres: the measured low-resolution image ``(B, C, *spatial / factors)``.
        factors: integer down-sampling factor per spatial axis, e.g. ``(1, 1, 4)`` for 4x thicker slices.
        weight: 1 for the exact projection, less to move only part of the way.
    """

    def __init__(self, lowres: Tensor, factors: Sequence[int], weight: float = 1.0):
        self.lowres, self.factors, self.weight = lowres, tuple(int(f) for f in factors), weight

    def __call__(self, x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        residual = self.lowres.to(x0_hat.dtype) - downsample(x0_hat, self.factors)
        return x0_hat + self.weight * upsample_nearest(residual, self.factors, x0_hat.shape[2:])


class GradientStep:
    """One gradient step on ``||operator(x0_hat) - measurement||^2`` per denoiser output.

    Args:
        operator: differentiable ``A``, ``(B, C, *spatial) -> measurement shape``.
        measurement: ``y``.
        step_size: the step, scaled by ``1 / ||A(x0) - y||`` as DPS does so that it is unit-free.
        min_sigma: skip the step below this noise level (late steps need no pull).
    """

    def __init__(self, operator: Callable[[Tensor], Tensor], measurement: Tensor, step_size: float = 1.0,
                 min_sigma: float = 0.0):
        self.operator, self.measurement = operator, measurement
        self.step_size, self.min_sigma = step_size, min_sigma

    def __call__(self, x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        with torch.enable_grad():
            estimate = x0_hat.detach().requires_grad_(True)
            residual = (self.operator(estimate) - self.measurement).flatten(1)
            norm = residual.norm(dim=1)
            (grad,) = torch.autograd.grad(norm.pow(2).sum(), estimate)
        scale = self.step_size / norm.detach().clamp(min=1e-12)
        active = (sigma >= self.min_sigma).to(x0_hat.dtype)
        return x0_hat - append_dims(scale * active, x0_hat.ndim) * grad


class ClassifierFreeGuidance(torch.nn.Module):
    """``D = D(x | null) + scale * (D(x | cond) - D(x | null))``, both halves in one batched call.

    Args:
        denoiser: ``denoiser(x, sigma, **cond) -> x0_hat``.
        scale: guidance weight ``w``; 1 returns the conditional denoiser unchanged (one forward, not two).
        null: maps a condition tensor to its "no condition" value; zeros by default, matching
            :func:`drop_condition` during training.
    """

    def __init__(self, denoiser: Callable[..., Tensor], scale: float,
                 null: Callable[[Tensor], Tensor] = torch.zeros_like):
        super().__init__()
        self.denoiser, self.scale, self.null = denoiser, scale, null

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        if self.scale == 1 or not cond:
            return self.denoiser(x, sigma, **cond)
        paired = {k: torch.cat([v, self.null(v)]) for k, v in cond.items()}
        conditional, unconditional = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **paired).chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


def drop_condition(cond: Tensor, probability: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample's condition by zeros with ``probability`` (training for classifier-free guidance)."""
    if probability <= 0:
        return cond
    keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= probability
    return cond * append_dims(keep.to(cond.dtype), cond.ndim)
