"""Data distributions whose ideal denoiser is known in closed form: the ground truth samplers are proven on.

Every element of ``x0`` is drawn independently from a 1-D distribution, so a ``(B, C, *spatial)`` tensor
holds many independent samples and the same code serves 2D and 3D shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from medidiff.core.denoiser import append_dims


@dataclass(frozen=True)
class Gaussian:
    """``x0 ~ N(mean, std**2)``."""

    mean: float = 0.3
    std: float = 0.5

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``E[x0 | x] = (std² x + sigma² mean) / (std² + sigma²)``."""
        var, sigma2 = self.std**2, append_dims(sigma, x.ndim) ** 2
        return (var * x + sigma2 * self.mean) / (var + sigma2)

    def flow(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Exact probability-flow ODE map from noise level ``sigma_from`` to ``sigma_to``."""
        var = self.std**2
        return self.mean + (x - self.mean) * math.sqrt((var + sigma_to**2) / (var + sigma_from**2))


@dataclass(frozen=True)
class GaussianMixture:
    """``x0 ~ sum_k weights[k] N(means[k], stds[k]**2)``, a multi-modal stand-in for image intensities."""

    weights: tuple[float, ...] = (0.5, 0.3, 0.2)
    means: tuple[float, ...] = (-0.8, 0.1, 0.7)
    stds: tuple[float, ...] = (0.05, 0.1, 0.04)

    def denoiser(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Posterior-weighted component means: ``sum_k r_k(x) (s_k² x + sigma² m_k) / (s_k² + sigma²)``."""
        sigma2 = append_dims(sigma, x.ndim).unsqueeze(-1) ** 2
        w, m, s2 = (x.new_tensor(v) for v in (self.weights, self.means, [s**2 for s in self.stds]))
        xk = x.unsqueeze(-1)
        total_var = s2 + sigma2
        log_resp = w.log() - 0.5 * total_var.log() - 0.5 * (xk - m) ** 2 / total_var
        resp = torch.softmax(log_resp, dim=-1)
        return (resp * (s2 * xk + sigma2 * m) / total_var).sum(-1)

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        component = torch.multinomial(torch.tensor(self.weights), math.prod(shape), True, generator=generator)
        noise = torch.randn(math.prod(shape), generator=generator, dtype=torch.float64)
        means, stds = torch.tensor(self.means, dtype=torch.float64), torch.tensor(self.stds, dtype=torch.float64)
        return (means[component] + stds[component] * noise).reshape(shape)

    def cdf(self, x: Tensor) -> Tensor:
        w, m, s = (x.new_tensor(v) for v in (self.weights, self.means, self.stds))
        return (w * 0.5 * (1 + torch.erf((x.unsqueeze(-1) - m) / (s * math.sqrt(2))))).sum(-1)

    def wasserstein1(self, samples: Tensor, grid_points: int = 4001) -> float:
        """W1 distance between the empirical distribution of ``samples`` and this mixture: ``∫|F_n - F| dx``."""
        lo = min(self.means) - 6 * max(self.stds) - 1
        grid = torch.linspace(lo, -lo, grid_points, dtype=torch.float64)
        flat = samples.detach().flatten().double().sort().values
        empirical = torch.searchsorted(flat, grid, right=True).double() / flat.numel()
        return float(torch.trapezoid((empirical - self.cdf(grid)).abs(), grid))
