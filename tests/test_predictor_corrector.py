"""The Langevin corrector has the stationary law that theory gives on Gaussian data, and predictor-corrector
sampling draws the data distribution (tests/test_samplers.py runs it through every generic sampler check too)."""

import math

import pytest
import torch

from medidiff.core.analytic import Gaussian
from medidiff.core.samplers import langevin_correct, nfe_of, sample_pc
from medidiff.core.schedules import karras_sigmas

GAUSS = Gaussian(mean=0.3, std=0.5)


@pytest.mark.parametrize("sigma,step_ratio", [(1.0, 0.2), (0.3, 0.5)])
def test_langevin_corrector_is_stationary_at_the_closed_form_law(sigma, step_ratio):
    """Unadjusted Langevin on N(m, v) with step eps: x' = x - eps (x - m) / v + sqrt(2 eps) z has the stationary
    law N(m, v / (1 - eps / 2v)): the marginal at this level up to the known discretisation bias."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 512, 512, generator=generator, dtype=torch.float64) * 3.0
    for _ in range(400):
        x, _ = langevin_correct(GAUSS.denoiser, x, sigma, step_ratio=step_ratio, generator=generator)
    v, eps = GAUSS.std**2 + sigma**2, step_ratio * sigma**2
    expected_var = v / (1 - eps / (2 * v))
    n = x.numel()
    assert abs(x.mean().item() - GAUSS.mean) < 4.5 * math.sqrt(expected_var / n)
    assert abs(x.var().item() / expected_var - 1) < 4.5 * math.sqrt(2 / n)
    assert abs(expected_var / v - 1) > 10 * math.sqrt(2 / n)  # the check can tell the biased law from v itself


def test_a_hook_constrains_the_corrector_too():
    seen = []

    def hook(x0_hat, sigma, x):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x0_hat)

    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    out = sample_pc(GAUSS.denoiser, x * 10, karras_sigmas(4, 0.01, 10.0), hook=hook,
                    generator=torch.Generator().manual_seed(1))
    assert len(seen) == nfe_of("pc", 4) == 7 and torch.equal(out, torch.zeros_like(out))
