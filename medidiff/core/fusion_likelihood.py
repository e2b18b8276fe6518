"""The fusion likelihood of DDFM (Zhao et al., ICCV 2023) as a sampler hook: one EM step per x0 estimate.

Fusion has no ground truth, so nothing conditional can be trained: an *unconditional* prior over the images of
both modalities is sampled, and :class:`FusionLikelihood` pulls every x0 estimate toward the two sources. It is a
symmetric variant of DDFM's hierarchical Bayesian model that needs no choice of "infrared" source:

    J(f) = lam * sum_k psi(f - s_k) + mu * sum_j psi(|grad f - g_j|) + rho(sigma)/2 * |f - x0_hat|^2

- ``s_a, s_b``: the two sources (intensity fidelity); ``g_j``: target gradient fields, either the per-pixel
  stronger source gradient (``gradient_target="max"``, gradient-domain fusion) or both source gradients.
- ``psi``: the Laplace negative log-likelihood ``|r|``, smoothed as ``sqrt(r^2 + c^2)``. Written as a
  Gaussian scale mixture, the E-step gives the expected precisions ``w = 1 / sqrt(r^2 + c^2)`` (the
  half-quadratic / IRLS weights), robustly down-weighting the source the estimate disagrees with. The E-step
  takes the expectation over the estimate's own uncertainty too, ``E[r^2] = r^2 + tau^2``, so
  ``c^2 = eps^2 + tau^2(sigma)``: early (uncertain) steps weigh both sources almost equally, later ones
  select. Without that term an early dark estimate locks out a bright structure of either source (tested).
- The diffusion estimate enters as a Gaussian prior ``f ~ N(x0_hat, tau^2)`` with the posterior variance of
  x0 at noise ``sigma`` for data of std ``s``, ``s^2 sigma^2 / (s^2 + sigma^2)``, plus the network's own error
  ``delta^2`` (``prior_error``): the likelihood dominates early (high noise), the learnt prior late, but never
  beyond ``1 / delta^2`` — a small prior trained for minutes on a CPU leaves noise that an exact denoiser
  would not, and without the floor the last steps pass it through (seen on the Harvard validation pairs).
- M-step: the weighted quadratic is solved by a few conjugate-gradient iterations warm-started at the
  current estimate. This is a majorise-minimise step, so ``J`` (at that step's ``c``) never increases and,
  started at ``x0_hat``, the fusion loss ``J - prior term`` of the output is at most that of ``x0_hat``
  (tested).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from medidiff.core.denoiser import append_dims

IntensityTarget = Literal["both", "max"]
GradientTarget = Literal["max", "both"]
LIKELIHOOD_OPTIONS = ("intensity_weight", "gradient_weight", "prior_weight", "prior_error",
                      "intensity_target", "gradient_target", "em_iterations", "cg_iterations")


def grad(f: Tensor) -> list[Tensor]:
    """Forward differences along every spatial axis of ``(B, C, *spatial)``, zero at the far border."""
    out = []
    for axis in range(2, f.ndim):
        zero = torch.zeros_like(f.narrow(axis, 0, 1))
        out.append(torch.cat([torch.diff(f, dim=axis), zero], dim=axis))
    return out


def grad_adjoint(g: list[Tensor]) -> Tensor:
    """The adjoint of :func:`grad`: ``<grad f, g> = <f, grad_adjoint(g)>`` (a negative divergence)."""
    total = torch.zeros_like(g[0])
    for axis, component in enumerate(g, start=2):
        inner = component.narrow(axis, 0, component.shape[axis] - 1)
        zero = torch.zeros_like(component.narrow(axis, 0, 1))
        total = total + torch.cat([zero, inner], dim=axis) - torch.cat([inner, zero], dim=axis)
    return total


def _sq_norm(g: list[Tensor]) -> Tensor:
    return torch.stack(g).pow(2).sum(0)


class FusionLikelihood:
    """One EM step of the fusion likelihood per denoiser output, as a sampler hook (see the module docstring).

    Args:
        source_a, source_b: registered sources in the diffusion space ``[-1, 1]``, ``(B, 1, *spatial)``.
        intensity_weight: ``lam``, weight of the intensity fidelity to each source.
        gradient_weight: ``mu``, weight of the gradient fidelity.
        prior_weight: scales ``rho = prior_weight / tau^2`` (larger trusts the diffusion prior more).
        intensity_target: ``both`` sources (robust, symmetric) or their per-pixel ``max`` (bright
            structures of either modality, as choose-max fusion).
        gradient_target: the per-pixel stronger source gradient (``max``) or ``both`` source gradients.
        data_std: ``s``, the std of the data in ``[-1, 1]`` space, for ``tau``.
        prior_error: ``delta``, std of the network's x0 error at zero noise (``[-1, 1]`` space).
        eps: smoothing of the Laplace penalty at zero noise; bounds the E-step weights by ``1 / eps``.
        em_iterations: EM iterations per sampler step (DDFM uses one).
        cg_iterations: conjugate-gradient iterations of each M-step.
    """

    def __init__(self, source_a: Tensor, source_b: Tensor, *, intensity_weight: float = 10.0,
                 gradient_weight: float = 10.0, prior_weight: float = 1.0,
                 intensity_target: IntensityTarget = "max", gradient_target: GradientTarget = "max",
                 data_std: float = 0.5, prior_error: float = 0.0, eps: float = 0.02,
                 em_iterations: int = 1, cg_iterations: int = 10):
        if source_a.shape != source_b.shape:
            raise ValueError(f"sources differ in shape: {tuple(source_a.shape)} vs {tuple(source_b.shape)}")
        a, b = source_a.float(), source_b.float()
        self.intensity = [a, b] if intensity_target == "both" else [torch.maximum(a, b)]
        ga, gb = grad(a), grad(b)
        if gradient_target == "both":
            self.gradients = [ga, gb]
        else:
            stronger = _sq_norm(gb) > _sq_norm(ga)
            self.gradients = [[torch.where(stronger, y, x) for x, y in zip(ga, gb)]]
        self.lam, self.mu, self.prior_weight = intensity_weight, gradient_weight, prior_weight
        self.data_std, self.prior_error, self.eps = data_std, prior_error, eps
        self.em_iterations, self.cg_iterations = em_iterations, cg_iterations

    def tau2(self, sigma: Tensor) -> Tensor:
        """Variance of the estimate x0_hat at noise ``sigma``, ``(B,)``: the posterior variance of x0 for data
        of std ``data_std``, plus ``prior_error^2``."""
        s2, sigma2 = self.data_std**2, sigma.float() ** 2
        return s2 * sigma2 / (s2 + sigma2) + self.prior_error**2

    def rho(self, sigma: Tensor) -> Tensor:
        """Prior precision ``prior_weight / tau^2`` per sample, ``(B,)``."""
        return self.prior_weight / self.tau2(sigma).clamp(min=1e-12)

    def loss(self, f: Tensor, sigma: Tensor | None = None) -> Tensor:
        """The fusion loss (``J`` without its prior term) per sample, ``(B,)``, mean over pixels.

        Args:
            f: ``(B, 1, *spatial)`` in ``[-1, 1]``.
            sigma: ``(B,)`` noise level whose smoothing ``c`` to use; None for ``c = eps``.
        """
        c2 = self._c2(sigma, f)
        terms = [self.lam * ((f - s).pow(2) + c2).sqrt() for s in self.intensity]
        grad_f = grad(f)
        terms += [self.mu * (_sq_norm([d - t for d, t in zip(grad_f, g)]) + c2).sqrt()
                  for g in self.gradients]
        return torch.stack(terms).sum(0).flatten(1).mean(1)

    def __call__(self, x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        prior = x0_hat.float()
        rho, c2 = append_dims(self.rho(sigma), prior.ndim), self._c2(sigma, prior)
        f = prior
        for _ in range(self.em_iterations):
            f = self._m_step(prior, rho, *self._e_step(f, c2), start=f)
        return f.to(x0_hat.dtype)

    def _c2(self, sigma: Tensor | None, like: Tensor) -> Tensor:
        tau2 = torch.zeros(like.shape[0], device=like.device) if sigma is None else self.tau2(sigma)
        return append_dims(tau2 + self.eps**2, like.ndim)

    def _e_step(self, f: Tensor, c2: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Expected precisions of the scale mixtures: ``1 / sqrt(residual^2 + c^2)`` per pixel."""
        w = [self.lam * ((f - s).pow(2) + c2).rsqrt() for s in self.intensity]
        grad_f = grad(f)
        v = [self.mu * (_sq_norm([d - t for d, t in zip(grad_f, g)]) + c2).rsqrt() for g in self.gradients]
        return w, v

    def _m_step(self, prior: Tensor, rho: Tensor, w: list[Tensor], v: list[Tensor], start: Tensor) -> Tensor:
        """Minimise ``sum w (f - s)^2 / 2 + sum v |grad f - g|^2 / 2 + rho / 2 |f - prior|^2`` by CG."""
        diagonal = rho + sum(w)
        v_total = sum(v)
        target = [sum(vj * gj[axis] for vj, gj in zip(v, self.gradients)) for axis in range(prior.ndim - 2)]
        rhs = rho * prior + sum(wk * s for wk, s in zip(w, self.intensity)) + grad_adjoint(target)

        def operator(f: Tensor) -> Tensor:
            return diagonal * f + grad_adjoint([v_total * d for d in grad(f)])

        return conjugate_gradient(operator, rhs, start, self.cg_iterations)


def conjugate_gradient(operator: Callable[[Tensor], Tensor], rhs: Tensor, start: Tensor,
                       iterations: int) -> Tensor:
    """Batched conjugate gradient for a symmetric positive-definite ``operator`` on ``(B, ...)`` tensors.

    Each sample is its own system (dot products reduce over all but the batch axis). CG never increases the
    quadratic ``f A f / 2 - rhs f`` from ``start``, which makes the M-step monotone with few iterations.
    """
    def dot(p: Tensor, q: Tensor) -> Tensor:
        return append_dims((p * q).flatten(1).sum(1), p.ndim)

    f = start
    r = rhs - operator(f)
    p, rr = r, dot(r, r)
    for _ in range(iterations):
        ap = operator(p)
        alpha = rr / dot(p, ap).clamp(min=1e-30)
        f, r = f + alpha * p, r - alpha * ap
        rr_next = dot(r, r)
        p, rr = r + (rr_next / rr.clamp(min=1e-30)) * p, rr_next
    return f
