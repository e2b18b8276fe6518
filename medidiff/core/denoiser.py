"""The one place that knows how a network was parameterized.

A network trained as a discrete DDPM predicts ``epsilon``, the clean ``sample`` (x0) or ``v`` from
``(x_t, t)``. :class:`DiscreteDenoiser` wraps it once into the form every sampler uses,
``denoiser(x, sigma, **cond) -> x0_hat`` with ``x = x0 + sigma * noise`` (Karras et al., 2022), and also
owns the matching training objective, so that training and sampling can never disagree on the
parameterization.

With ``abar = 1 / (1 + sigma**2)`` the network input is ``x_t = c_in * x`` where ``c_in = sqrt(abar)``,
and the estimate is ``x0_hat = c_skip * x + c_out * F(x_t, t)``:

=========== ================= =======================
prediction  c_skip            c_out
=========== ================= =======================
epsilon     1                 -sigma
sample      0                 1
v           1 / (1 + sigma²)  -sigma / sqrt(1 + sigma²)
=========== ================= =======================
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import Tensor, nn

from medidiff.core.schedules import (
    alphas_cumprod,
    explicit_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
    timestep_sigmas,
)

PredictionType = Literal["epsilon", "sample", "v"]
LossWeighting = Literal["uniform", "min_snr"]
SigmaGrid = Literal["karras", "exponential", "trailing", "leading", "linspace"]
# a named grid, or the noise levels themselves (medidiff.core.schedules.explicit_sigmas)
GridSpec = Union[SigmaGrid, list[float]]


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so that ``x`` of shape ``(B,)`` broadcasts against ``(B, C, *spatial)``."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a {x.ndim}-D tensor to {ndim} dims")
    return x[(...,) + (None,) * missing]


class DiscreteDenoiser(nn.Module):
    """Wrap a discrete-time DDPM network into ``denoiser(x, sigma, **cond) -> x0_hat``.

    Args:
        model: called as ``model(x_t, t, **cond)`` with ``x_t`` of shape ``(B, C, *spatial)`` and continuous
            timesteps ``t`` of shape ``(B,)``; returns ``(B, C, *spatial)`` in its prediction type.
        betas: the training schedule, shape ``(T,)`` (see :mod:`medidiff.core.schedules`).
        prediction_type: what the network predicts: ``epsilon``, ``sample`` (x0) or ``v``.
        quantize: round the timestep to the nearest trained one instead of interpolating between them.
        loss_weighting: ``uniform`` or ``min_snr`` (Hang et al., ICCV 2023) with ``min_snr_gamma``.
        register_model: make ``model`` a submodule (its parameters part of this module's state). False when the
            owner registers the network itself, so that its weights are stored once.
    """

    def __init__(
        self,
        model: nn.Module,
        betas: Tensor,
        prediction_type: PredictionType = "epsilon",
        *,
        quantize: bool = False,
        loss_weighting: LossWeighting = "uniform",
        min_snr_gamma: float = 5.0,
        register_model: bool = True,
    ):
        super().__init__()
        if prediction_type not in ("epsilon", "sample", "v"):
            raise ValueError(f"unknown prediction type {prediction_type!r}; choose epsilon, sample or v")
        if loss_weighting not in ("uniform", "min_snr"):
            raise ValueError(f"unknown loss weighting {loss_weighting!r}; choose uniform or min_snr")
        if register_model:
            self.model = model
        else:
            object.__setattr__(self, "model", model)
        self.prediction_type = prediction_type
        self.quantize = quantize
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        sigmas = self.training_sigmas(betas)
        abar = 1 / (1 + sigmas.double() ** 2)
        # float32 buffers: float64 is unavailable on some accelerators (MPS) and not needed at T <= 10^4.
        self.register_buffer("alphas_cumprod", abar.clamp(min=2.0**-24).float(), persistent=False)
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)

    @staticmethod
    def training_sigmas(betas: Tensor) -> Tensor:
        """The noise level of each trained timestep, ``(T,)`` increasing."""
        return sigmas_from_alphas_cumprod(alphas_cumprod(betas))

    def noise_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``x_t = a * x0 + b * noise`` at integer timesteps ``t``: ``sqrt(abar), sqrt(1 - abar)``."""
        abar = self.alphas_cumprod[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def velocity(self, x0: Tensor, noise: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """The ``v`` target: ``a * noise - b * x0`` (Salimans & Ho, 2022)."""
        return a * noise - b * x0

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep of each noise level by linear interpolation in ``log sigma``; shape kept."""
        log_sigma = sigma.to(self.log_sigmas.dtype).log()
        high = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, self.num_timesteps - 1)
        low = high - 1
        frac = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        t = low + frac.clamp(0, 1)
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t` for ``t`` in ``[0, T-1]``."""
        t = t.float().clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        frac = t - low
        return ((1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[low + 1]).exp()

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` for noise levels ``sigma`` of any shape (see the module docstring)."""
        c_in = (1 + sigma**2).rsqrt()
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "sample":
            return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
        return c_in**2, -sigma * c_in, c_in

    def forward(self, x: Tensor, sigma: Tensor, **cond: Tensor) -> Tensor:
        """Estimate ``x0`` from ``x = x0 + sigma * noise``.

        Args:
            x: noisy input ``(B, C, *spatial)``.
            sigma: noise level per sample ``(B,)``.
            cond: passed to the network unchanged (e.g. ``cond=image`` for channel concatenation).

        Returns:
            ``(B, C, *spatial)`` in ``x``'s dtype, even when the network runs under autocast.
        """
        c_skip, c_out, c_in = (append_dims(c, x.ndim).to(x.dtype) for c in self.scalings(sigma.to(x.dtype)))
        out = self.model(x * c_in, self.sigma_to_t(sigma), **cond)
        return c_skip * x + c_out * out.to(x.dtype)

    def loss(
        self,
        x0: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        source: Tensor | None = None,
        **cond: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The DDPM training objective in the network's own prediction space.

        Args:
            x0: clean targets ``(B, C, *spatial)``.
            t: integer timesteps ``(B,)``; drawn uniformly from ``[0, T)`` when omitted.
            noise: ``(B, C, *spatial)``; standard normal when omitted.
            generator: source of randomness for ``t`` and ``noise``.
            source: what is noised into ``x_t`` (defaults to ``x0``). Passing the network's own earlier estimate
                trains it to correct that estimate toward ``x0`` — the inputs a sampler really feeds it
                ("recycling", Fu et al. 2023). Epsilon and v targets are the ones that map ``x_t`` to ``x0``.

        Returns:
            ``(loss, x0_hat)``: the weighted mean-squared error per sample ``(B,)``, and the network's
            estimate of ``x0`` ``(B, C, *spatial)`` so tasks can add losses on it (e.g. Dice on a mask).
        """
        batch = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        a, b = (append_dims(c.to(x0.dtype), x0.ndim) for c in self.noise_coefficients(t))
        x_t = a * (x0 if source is None else source) + b * noise
        if source is not None:
            noise = (x_t - a * x0) / b
        out = self.model(x_t, t.to(self.sigmas.dtype), **cond).to(x0.dtype)
        target = {"epsilon": noise, "sample": x0, "v": self.velocity(x0, noise, a, b)}
        mse = (out - target[self.prediction_type]).pow(2).flatten(1).mean(1)
        sigma = self.sigmas[t].to(x0.dtype)
        c_skip, c_out, _ = (append_dims(c, x0.ndim) for c in self.scalings(sigma))
        x0_hat = c_skip * (x_t / a) + c_out * out  # x_t / a is x in the sampler's coordinates
        return mse * self.loss_weights(t).to(mse.dtype), x0_hat

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-timestep weights ``(B,)`` of the objective; min-SNR-gamma expressed in the prediction space."""
        if self.loss_weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        abar = self.alphas_cumprod[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"epsilon": clipped / snr, "sample": clipped, "v": clipped / (snr + 1)}[self.prediction_type]

    def get_sigmas(self, steps: int, grid: GridSpec = "karras", rho: float = 7.0) -> Tensor:
        """A sampling grid of ``steps`` noise levels within the trained range, then 0; shape ``(steps + 1,)``.
        ``grid`` names a spacing or lists the levels (then it must have ``steps`` of them)."""
        if not isinstance(grid, str):
            sigmas = explicit_sigmas(grid, steps, self.sigma_min, self.sigma_max)
        elif grid == "karras":
            sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max, rho)
        elif grid == "exponential":
            sigmas = exponential_sigmas(steps, self.sigma_min, self.sigma_max)
        else:
            sigmas = timestep_sigmas(self.sigmas.double(), steps, grid)
        return sigmas.to(self.sigmas.device)


class FlowDenoiser(DiscreteDenoiser):
    """Flow matching / rectified flow (Lipman et al., 2023; Liu et al., 2023) behind the same sampler contract.

    Training noises along the straight path ``x_t = (1 - t) x0 + t noise`` and, with ``prediction_type="v"``,
    regresses the velocity ``noise - x0``. In the samplers' coordinates ``x = x_t / (1 - t) = x0 + sigma noise``
    with ``sigma = t / (1 - t)``, so every sampler and hook runs unchanged; the scalings become

    =========== ================= =======================
    prediction  c_skip            c_out
    =========== ================= =======================
    epsilon     1                 -sigma
    sample      0                 1
    v           1 / (1 + sigma)   -sigma / (1 + sigma)
    =========== ================= =======================

    with ``c_in = 1 - t = 1 / (1 + sigma)``. The ``T`` trained times are ``t_k = (k + 1) / (T + 1)``, so neither
    end (no noise, pure noise) is a trained level; the network sees ``k`` as its timestep, as a DDPM network does.
    Uniform loss weighting only (min-SNR is defined for the DDPM objective).
    """

    def __init__(self, model: nn.Module, num_timesteps: int = 1000, prediction_type: PredictionType = "v", *,
                 quantize: bool = False, loss_weighting: LossWeighting = "uniform", register_model: bool = True):
        if loss_weighting != "uniform":
            raise ValueError("flow matching trains with uniform loss weighting; min_snr is for the DDPM objective")
        # there is no beta schedule: only the count of trained times reaches training_sigmas
        super().__init__(model, torch.zeros(num_timesteps), prediction_type, quantize=quantize,
                         register_model=register_model)

    @staticmethod
    def training_sigmas(betas: Tensor) -> Tensor:
        count = betas.numel()
        t = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)
        return t / (1 - t)

    def noise_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        time = self.sigmas[t] / (1 + self.sigmas[t])
        return 1 - time, time

    def velocity(self, x0: Tensor, noise: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return noise - x0

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma)
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction_type == "sample":
            return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
        return c_in, -sigma * c_in, c_in
