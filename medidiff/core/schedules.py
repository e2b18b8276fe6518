"""Noise schedules of a discrete DDPM and the sigma grids samplers walk along.

Two conventions meet here. A DDPM is trained over ``T`` discrete timesteps with
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; the samplers work in the variance-exploding form
``x = x0 + sigma * eps`` (Karras et al., 2022), which is the same process rescaled by ``1/sqrt(abar_t)``,
so ``sigma_t = sqrt((1 - abar_t) / abar_t)``. Every function returns a 1-D float64 tensor; sigma grids are
decreasing and end in 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

BetaScheduleName = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
TimestepSpacing = Literal["trailing", "leading", "linspace"]

# Smallest abar kept when a schedule reaches zero terminal SNR: sigma_max = 4096 instead of infinity,
# the same floor diffusers uses, so the first step of a sampler stays finite.
_MIN_ALPHA_CUMPROD = 2.0**-24


def beta_schedule(
    name: BetaScheduleName,
    num_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    cosine_s: float = 8e-3,
    sigmoid_range: float = 6.0,
    zero_terminal_snr: bool = False,
) -> Tensor:
    """Betas of a discrete DDPM, shape ``(num_timesteps,)``.

    The formulas match MONAI's ``linear_beta``, ``scaled_linear_beta``, ``sigmoid_beta`` and ``cosine``
    (Nichol & Dhariwal, 2021), so a network trained with MONAI's schedulers samples unchanged here.

    Args:
        name: ``linear`` | ``scaled_linear`` (linear in sqrt(beta)) | ``cosine`` | ``sigmoid``.
        num_timesteps: number of training timesteps ``T``.
        beta_start, beta_end: range of the linear, scaled-linear and sigmoid schedules.
        cosine_s: offset of the cosine schedule.
        sigmoid_range: the sigmoid schedule spans ``sigmoid(-r) .. sigmoid(r)``.
        zero_terminal_snr: rescale so that ``abar_T = 0`` exactly (Lin et al., 2024).
    """
    n = num_timesteps
    if n < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {n}")
    if name == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    elif name == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    elif name == "sigmoid":
        grid = torch.linspace(-sigmoid_range, sigmoid_range, n, dtype=torch.float64)
        betas = torch.sigmoid(grid) * (beta_end - beta_start) + beta_start
    elif name == "cosine":
        t = torch.linspace(0, n, n + 1, dtype=torch.float64) / n
        abar = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(0.0, 0.999)
    else:
        raise ValueError(f"unknown beta schedule {name!r}; choose linear, scaled_linear, cosine or sigmoid")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale ``sqrt(abar)`` so that it ends at exactly 0 and keeps its first value.

    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (WACV 2024), Algorithm 1.
    """
    sqrt_abar = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: Tensor) -> Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)``, shape ``(T,)``."""
    return torch.cumprod(1 - betas.double(), 0)


def sigmas_from_alphas_cumprod(abar: Tensor) -> Tensor:
    """Variance-exploding noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)``, increasing in ``t``.

    A zero-terminal-SNR schedule would give ``sigma_T = inf``; ``abar`` is floored at ``2**-24`` instead.
    """
    abar = abar.double().clamp(min=_MIN_ALPHA_CUMPROD)
    return ((1 - abar) / abar).sqrt()


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final noise level 0 that every sampler ends on."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The grid of Karras et al. (2022), eq. 5: ``n`` levels uniform in ``sigma**(1/rho)``, then 0.

    Returns:
        shape ``(n + 1,)``, from ``sigma_max`` down to ``sigma_min``, then 0.
    """
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``n`` levels uniform in ``log sigma`` (uniform in the half-log-SNR ``lambda``), then 0."""
    _check_range(n, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return append_zero(log_sigmas.exp())


def explicit_sigmas(levels: Sequence[float], steps: int | None, sigma_min: float, sigma_max: float) -> Tensor:
    """A grid given level by level (k-diffusion's ``sigmas``), e.g. a distilled student's ``[sigma_max, 0.3]``.

    Args:
        levels: the noise levels of the steps, decreasing, each within the trained range; a final 0 may be given.
        steps: the step count it must have (None: any).

    Returns:
        shape ``(steps + 1,)``: the levels, then 0.
    """
    values = [float(v) for v in levels]
    if values and values[-1] == 0:
        values = values[:-1]
    if not values:
        raise ValueError("an explicit sigma grid needs at least one noise level above 0")
    if steps is not None and steps != len(values):
        raise ValueError(f"the sigma grid {values} has {len(values)} steps, not {steps}")
    if any(not math.isfinite(v) for v in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"the levels of a sigma grid must be finite and strictly decreasing, got {values}")
    # a float32 copy of the trained range rounds its ends: allow that much
    low, high = sigma_min * (1 - 1e-5), sigma_max * (1 + 1e-5)
    outside = [v for v in values if not low <= v <= high]
    if outside:
        raise ValueError(f"sigma levels {outside} lie outside the trained range [{sigma_min:.4g}, {sigma_max:.4g}]")
    return append_zero(torch.tensor(values, dtype=torch.float64))


def timestep_sigmas(train_sigmas: Tensor, n: int, spacing: TimestepSpacing = "trailing") -> Tensor:
    """Noise levels of ``n`` of the trained timesteps, as a DDPM/DDIM scheduler would pick them.

    Args:
        train_sigmas: ``sigma_t`` for ``t = 0 .. T-1`` (see :func:`sigmas_from_alphas_cumprod`).
        n: number of sampling steps, ``1 <= n <= T``.
        spacing: ``trailing`` starts at ``t = T-1`` and steps by ``T/n`` (Lin et al., 2024, Table 2; the best
            choice for few steps); ``leading`` takes ``0, T/n, 2T/n, ...`` reversed (DDIM's original, never
            reaches ``T-1``); ``linspace`` rounds ``linspace(T-1, 0, n)`` (MONAI's ``set_timesteps``).

    Returns:
        shape ``(n + 1,)``: the chosen ``sigma_t`` from high to low, then 0.
    """
    num_train = train_sigmas.numel()
    if not 1 <= n <= num_train:
        raise ValueError(f"number of steps must be in [1, {num_train}], got {n}")
    if spacing == "trailing":
        steps = torch.arange(num_train, 0, -num_train / n, dtype=torch.float64).round().long() - 1
    elif spacing == "leading":
        steps = (torch.arange(n, dtype=torch.float64) * (num_train // n)).round().long().flip(0)
    elif spacing == "linspace":
        steps = torch.linspace(num_train - 1, 0, n, dtype=torch.float64).round().long()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose trailing, leading or linspace")
    return append_zero(train_sigmas.double()[steps])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"number of steps must be at least 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
