"""Samplers: small pure functions with one signature, shared by every task.

``sample_<name>(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, **knobs) -> x0``

- ``denoiser(x, sigma) -> x0_hat`` with ``x = x0 + sigma * noise``; bind conditions beforehand
  (``functools.partial(denoiser, cond=image)``). ``sigma`` is passed as a ``(B,)`` tensor.
- ``x``: the starting noise already multiplied by ``sigmas[0]``, shape ``(B, C, *spatial)``.
- ``sigmas``: decreasing 1-D tensor; a grid ending in 0 returns the clean sample, any other grid
  integrates down to its last level (used by the convergence tests).
- ``hook(x0_hat, sigma, x) -> x0_hat`` runs on every denoiser output: data consistency, guidance.
- ``callback(info)`` sees every step: a dict with ``i``, ``x``, ``sigma``, ``sigma_next``, ``denoised``.
- Randomness only through ``generator``; no state survives a call. Step coefficients are computed from
  the grid once, in Python floats, so the loop never forces a host-device synchronisation.

Equivalences worth knowing: on the probability-flow ODE in this parameterization, Euler, DDIM (eta=0)
and first-order DPM-Solver++ are the same update; DDPM ancestral sampling is DDIM with eta=1.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

Hook = Callable[[Tensor, Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------- shared pieces


def _levels(sigmas: Tensor) -> list[float]:
    levels = [float(s) for s in sigmas.detach().cpu().double()]
    if any(b >= a for a, b in zip(levels, levels[1:])) or levels[-1] < 0:
        raise ValueError(f"sigmas must be strictly decreasing and non-negative, got {levels}")
    return levels


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float, hook: Hook | None) -> Tensor:
    sigma_batch = x.new_full((x.shape[0],), sigma)
    denoised = denoiser(x, sigma_batch)
    return denoised if hook is None else hook(denoised, sigma_batch, x)


def _report(callback: Callback | None, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step ``sigma -> sigma_next`` into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up**2 = eta**2 * sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2`` is DDIM's
    ``sigma_t(eta)`` (Song et al., 2021, eq. 16) in this parameterization, and
    ``sigma_down**2 = sigma_next**2 - sigma_up**2``.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _churn(x: Tensor, sigma: float, gamma: float, s_noise: float, generator) -> tuple[Tensor, float]:
    """EDM's stochastic "churn" (Karras et al., 2022, Alg. 2, lines 5-6): raise the noise to ``sigma*(1+gamma)``."""
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + _noise(x, generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


def _churn_gamma(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    return min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


# ----------------------------------------------------------------------------- samplers


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, eta=0.0, s_noise=1.0):
    """DDIM (Song et al., ICLR 2021) with stochasticity ``eta``: 0 is deterministic, 1 is DDPM ancestral."""
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _denoise(denoiser, x, sigma, hook)
        _report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + _noise(x, generator) * (s_noise * sigma_up)
    return x


def sample_ddpm(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, s_noise=1.0):
    """DDPM ancestral sampling (Ho et al., 2020) with the posterior variance ``beta_tilde`` ("fixed small").

    On consecutive trained timesteps this is exactly MONAI's ``DDPMScheduler.step``; on a coarser grid it
    samples the exact DDPM posterior between the two levels (DDIM with eta=1).
    """
    return sample_ddim(denoiser, x, sigmas, generator=generator, hook=hook, callback=callback, eta=1.0,
                       s_noise=s_noise)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the probability-flow ODE, with EDM's optional stochastic churn (Karras et al., 2022)."""
    levels = _levels(sigmas)
    steps = len(levels) - 1
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        x, sigma_hat = _churn(x, sigma, _churn_gamma(sigma, steps, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = _denoise(denoiser, x, sigma_hat, hook)
        _report(callback, i, x, sigma_hat, sigma_next, denoised)
        x = denoised + (x - denoised) * (sigma_next / sigma_hat)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Heun's second-order method (Karras et al., 2022, Alg. 2); 2 NFE per step, 1 on the final step to 0."""
    levels = _levels(sigmas)
    steps = len(levels) - 1
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        # Euler step from the (optionally churned) level sigma_hat
        x, sigma_hat = _churn(x, sigma, _churn_gamma(sigma, steps, s_churn, s_tmin, s_tmax), s_noise, generator)
        denoised = _denoise(denoiser, x, sigma_hat, hook)
        _report(callback, i, x, sigma_hat, sigma_next, denoised)
        slope = (x - denoised) / sigma_hat
        x_next = x + slope * (sigma_next - sigma_hat)
        # Trapezoidal correction, skipped when the slope at sigma_next = 0 is undefined
        if sigma_next > 0:
            slope_next = (x_next - _denoise(denoiser, x_next, sigma_next, hook)) / sigma_next
            x_next = x + (slope + slope_next) * (0.5 * (sigma_next - sigma_hat))
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, hook=None, callback=None):
    """DPM-Solver++(2M) (Lu et al., 2022, Alg. 2): second-order multistep in the data prediction, 1 NFE per step."""
    levels = _levels(sigmas)
    previous, h_previous = None, None
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _denoise(denoiser, x, sigma, hook)
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        if previous is None:
            x = torch.add(x * (sigma_next / sigma), denoised, alpha=-math.expm1(-h))
        else:
            # blended = (1 + 1/2r) denoised - (1/2r) previous, updated in place: on large volumes every
            # volume-sized temporary counts (benchmarks/bench_sliding_window.py)
            blended = torch.lerp(denoised, previous, -h / (2 * h_previous))
            x = blended.mul_(-math.expm1(-h)).add_(x, alpha=sigma_next / sigma)
        previous, h_previous = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE (Lu et al., 2022, midpoint variant): multistep with fresh noise ``eta`` each step."""
    levels = _levels(sigmas)
    previous, h_previous = None, None
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        denoised = _denoise(denoiser, x, sigma, hook)
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        decay = -math.expm1(-h - eta * h)
        x = x * (sigma_next / sigma * math.exp(-eta * h)) + denoised * decay
        if previous is not None:
            x = x + (denoised - previous) * (0.5 * decay * h / h_previous)
        if eta > 0:
            x = x + _noise(x, generator) * (s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)))
        previous, h_previous = denoised, h
    return x


def _unipc_coefficients(h: float, ratios: list[float]) -> tuple[list[float], list[float]]:
    """UniPC's predictor and corrector weights (Zhao et al., NeurIPS 2023, Alg. 2, variant B(h) = e^h - 1) in the
    data prediction, for one step of log-length ``h`` with earlier outputs at ``ratios`` (r_k < 0) of that step.

    Solves ``R rho = b`` with ``R[i, k] = r_k**i`` and ``b[i] = (i+1)! phi_{i+2}(-h) / B(h)``; the predictor uses
    the earlier outputs only, the corrector also the new one (r = 1), which raises the order by one."""
    hh = -h
    b_h = math.expm1(hh)
    phi, factorial, b = math.expm1(hh) / hh - 1, 1.0, []
    nodes = ratios + [1.0]
    for i in range(1, len(nodes) + 1):
        b.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1 / factorial
    matrix = torch.tensor([[r ** i for r in nodes] for i in range(len(nodes))], dtype=torch.float64)
    rhs = torch.tensor(b, dtype=torch.float64)
    corrector = torch.linalg.solve(matrix, rhs).tolist()
    predictor = torch.linalg.solve(matrix[:-1, :-1], rhs[:-1]).tolist() if ratios else []
    return predictor, corrector


def _weighted_differences(differences: list[Tensor], weights: list[float]) -> Tensor | float:
    return sum((d * w for d, w in zip(differences, weights)), start=0.0)


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, order=2):
    """UniPC (Zhao et al., NeurIPS 2023): multistep predictor of order ``order`` and the unified corrector, which
    reuses the next step's network output, so 1 NFE per step and global order ``order + 1``; the last step has no
    corrector. Lower orders on the first steps and, on grids under 10 steps, the last ones (as the authors do)."""
    del generator  # deterministic; the argument keeps the shared signature
    levels = _levels(sigmas)
    steps = len(levels) - 1
    denoised = _denoise(denoiser, x, levels[0], hook)
    history: list[tuple[float, Tensor]] = []  # (log-sigma, denoised) of earlier levels, newest last
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        _report(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            return denoised
        step_order = min(order, i + 1, steps - i if steps < 10 else order)
        h = math.log(sigma / sigma_next)
        earlier = history[len(history) - (step_order - 1):] if step_order > 1 else []
        ratios = [(math.log(sigma) - log_sigma) / h for log_sigma, _ in earlier]  # lambda = -log sigma
        differences = [(previous - denoised) / r for (_, previous), r in zip(earlier, ratios)]
        rho_p, rho_c = _unipc_coefficients(h, ratios)
        b_h = math.expm1(-h)
        first_order = torch.add(x * (sigma_next / sigma), denoised, alpha=-b_h)
        x_next = first_order - b_h * _weighted_differences(differences, rho_p)
        history = (history + [(math.log(sigma), denoised)])[-max(order - 1, 1):]
        if i == steps - 1:
            return x_next
        denoised_next = _denoise(denoiser, x_next, sigma_next, hook)
        correction = _weighted_differences(differences, rho_c[:-1]) + rho_c[-1] * (denoised_next - denoised)
        x = first_order - b_h * correction
        denoised = denoised_next
    return x


def langevin_correct(denoiser, x: Tensor, sigma: float, *, step_ratio: float, generator=None,
                     hook: Hook | None = None) -> tuple[Tensor, Tensor]:
    """One Langevin step at a fixed noise level: ``x + eps * score + sqrt(2 eps) z`` with ``eps = step_ratio *
    sigma**2`` and the score ``(D(x) - x) / sigma**2`` (Tweedie). Returns ``(x, denoised)``.

    On Gaussian data of variance ``v`` at this level the chain's stationary law is ``N(mean, v / (1 - eps / 2v))``,
    the marginal up to the step's known bias (tests/test_predictor_corrector.py).
    """
    denoised = _denoise(denoiser, x, sigma, hook)
    return x + (denoised - x) * step_ratio + _noise(x, generator) * (sigma * math.sqrt(2 * step_ratio)), denoised


@torch.no_grad()
def sample_pc(denoiser, x, sigmas, *, generator=None, hook=None, callback=None, step_ratio=0.05, s_noise=1.0):
    """Predictor–corrector sampling (Song et al., ICLR 2021; Score-MRI, Chung & Ye 2022): at each level one
    Langevin corrector step (:func:`langevin_correct`), then the ancestral (reverse-diffusion) predictor to the
    next level; 2 NFE per step, 1 on the final step to 0. ``step_ratio`` 0.05 matches a signal-to-noise ratio of
    about 0.16 in Song et al.'s step rule. The hook (data consistency) acts on both denoiser outputs."""
    levels = _levels(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(levels, levels[1:])):
        if sigma_next > 0:
            x, _ = langevin_correct(denoiser, x, sigma, step_ratio=step_ratio, generator=generator, hook=hook)
        denoised = _denoise(denoiser, x, sigma, hook)
        _report(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, 1.0)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + _noise(x, generator) * (s_noise * sigma_up)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "pc": sample_pc,
    "unipc": sample_unipc,
}

# Network evaluations per step; the last step to sigma = 0 of Heun and of predictor-corrector costs one.
_EVALS_PER_STEP = {"heun": 2, "pc": 2}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look a sampler up by name, with the list of valid names in the error."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}") from None


def steps_for_nfe(name: str, nfe: int) -> int:
    """Number of grid steps (ending in 0) a sampler may take for a budget of ``nfe`` network evaluations."""
    per_step = _EVALS_PER_STEP.get(name, 1)
    return max(1, (nfe + per_step - 1) // per_step)


def nfe_of(name: str, steps: int) -> int:
    """Network evaluations a sampler spends on a grid of ``steps`` steps that ends in 0."""
    per_step = _EVALS_PER_STEP.get(name, 1)
    return per_step * steps - (per_step - 1)
