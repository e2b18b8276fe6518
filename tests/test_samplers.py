"""Samplers proven on data whose exact denoiser and probability-flow solution are known in closed form."""

import math

import pytest
import torch

from medidiff.core.analytic import Gaussian, GaussianMixture
from medidiff.core.samplers import SAMPLERS, get_sampler, nfe_of, steps_for_nfe
from medidiff.core.schedules import karras_sigmas

SHAPES = {"2d": (2, 1, 8, 8), "3d": (2, 1, 4, 4, 4)}
BIG_SHAPES = {"2d": (4, 1, 64, 64), "3d": (4, 1, 16, 16, 16)}  # 16384 independent samples each
DETERMINISTIC_ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2}
STOCHASTIC = {
    "ddpm": {},
    "ddim": {"eta": 0.5},
    "dpmpp_2m_sde": {},
    "euler": {"s_churn": 10.0},
    "heun": {"s_churn": 10.0},
    "pc": {},
}
GAUSS = Gaussian(mean=0.3, std=0.5)


def _noise(shape, sigma, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("name", DETERMINISTIC_ORDER)
def test_deterministic_sampler_converges_with_its_order(name, dims):
    """Error of the ODE solve from sigma=20 to sigma=0.01 against the exact flow: halves (order 1) or
    quarters (order 2) when the number of steps doubles."""
    x_start = _noise(SHAPES[dims], 20.0)
    exact = GAUSS.flow(x_start, 20.0, 0.01)
    errors = []
    for steps in (16, 32, 64, 128):
        sigmas = karras_sigmas(steps, 0.01, 20.0)[:-1]  # end at sigma_min to measure the ODE error alone
        errors.append((get_sampler(name)(GAUSS.denoiser, x_start, sigmas) - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    expected = 2.0 ** DETERMINISTIC_ORDER[name]
    assert all(abs(r / expected - 1) < 0.2 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_converges_with_one_order_above_its_predictor(order):
    """UniPC's corrector raises the predictor's order p to p + 1 (Zhao et al., 2023, Thm 3.3): the ODE error
    falls 2**(p+1)-fold when the steps double. Measured from 32 steps on, where the multistep start-up (lower
    orders on the first steps) no longer dominates."""
    x_start = _noise(SHAPES["2d"], 20.0)
    exact = GAUSS.flow(x_start, 20.0, 0.01)
    errors = []
    for steps in (32, 64, 128, 256):
        sigmas = karras_sigmas(steps, 0.01, 20.0)[:-1]
        errors.append((get_sampler("unipc")(GAUSS.denoiser, x_start, sigmas, order=order) - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(abs(r / 2.0 ** (order + 1) - 1) < 0.2 for r in ratios), (errors, ratios)


def test_unipc_beats_dpm_solver_at_equal_network_evaluations():
    """Same NFE, same grid: the default UniPC (order 3) is at least 5x closer to the exact flow than
    DPM-Solver++(2M)."""
    x_start = _noise(SHAPES["2d"], 20.0)
    exact = GAUSS.flow(x_start, 20.0, 0.01)
    sigmas = karras_sigmas(64, 0.01, 20.0)[:-1]
    error = {name: (get_sampler(name)(GAUSS.denoiser, x_start, sigmas) - exact).abs().max().item()
             for name in ("unipc", "dpmpp_2m")}
    assert error["unipc"] * 5 < error["dpmpp_2m"], error


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("name", ["euler", "ddim", "heun", "dpmpp_2m", "unipc"])
def test_deterministic_sampler_reaches_the_exact_endpoint(name, dims):
    """With a grid ending in 0, x_T maps to mean + (x_T - mean) * std / sqrt(std² + sigma_max²)."""
    x_start = _noise(SHAPES[dims], 20.0)
    exact = GAUSS.mean + (x_start - GAUSS.mean) * GAUSS.std / math.sqrt(GAUSS.std**2 + 20.0**2)
    out = get_sampler(name)(GAUSS.denoiser, x_start, karras_sigmas(128, 0.002, 20.0))
    tolerance = 0.03 if DETERMINISTIC_ORDER.get(name, 3) == 1 else 2e-3
    assert (out - exact).abs().max() < tolerance


@pytest.mark.parametrize("dims", BIG_SHAPES)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_reproduces_mean_and_std(name, dims):
    """Mean within 4.5 standard errors; std within 4.5 standard errors plus 1.5 % discretisation bias at 400 steps."""
    shape = BIG_SHAPES[dims]
    n = math.prod(shape)
    generator = torch.Generator().manual_seed(7)
    x_start = torch.randn(shape, generator=generator, dtype=torch.float64) * 80.0
    out = get_sampler(name)(GAUSS.denoiser, x_start, karras_sigmas(400, 0.002, 80.0), generator=generator,
                            **STOCHASTIC[name])
    mean_se, std_rel_se = GAUSS.std / math.sqrt(n), 1 / math.sqrt(2 * n)
    assert abs(out.mean().item() - GAUSS.mean) < 4.5 * mean_se
    assert abs(out.std().item() / GAUSS.std - 1) < 4.5 * std_rel_se + 0.015


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_bias_shrinks_with_steps(name):
    """The std bias at 400 steps is smaller than at 10: the stochastic sampler converges, not just passes."""
    gen = torch.Generator().manual_seed(3)
    errors = []
    for steps in (10, 400):
        x_start = torch.randn(BIG_SHAPES["2d"], generator=gen, dtype=torch.float64) * 80.0
        out = get_sampler(name)(GAUSS.denoiser, x_start, karras_sigmas(steps, 0.002, 80.0), generator=gen,
                                **STOCHASTIC[name])
        errors.append(abs(out.std().item() / GAUSS.std - 1))
    assert errors[1] < errors[0]


@pytest.mark.parametrize("name", SAMPLERS)
def test_hook_sees_every_denoiser_output_and_callback_every_step(name):
    calls, steps_seen = [], []

    def hook(x0_hat, sigma, x):
        assert sigma.shape == (x.shape[0],) and x0_hat.shape == x.shape
        calls.append(float(sigma[0]))
        return x0_hat

    sigmas = karras_sigmas(6, 0.01, 10.0)
    get_sampler(name)(GAUSS.denoiser, _noise(SHAPES["2d"], 10.0), sigmas, hook=hook,
                      callback=lambda info: steps_seen.append(info["i"]),
                      generator=torch.Generator().manual_seed(0))
    assert len(calls) == nfe_of(name, 6)
    assert steps_seen == list(range(6))


@pytest.mark.parametrize("name", SAMPLERS)
def test_hook_output_is_what_the_sampler_uses(name):
    """A hook that pins x0_hat to a constant makes every sampler return that constant at sigma=0."""
    out = get_sampler(name)(GAUSS.denoiser, _noise(SHAPES["3d"], 10.0), karras_sigmas(5, 0.01, 10.0),
                            hook=lambda x0_hat, sigma, x: torch.full_like(x0_hat, 0.25),
                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(out, 0.25))


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_never_modify_tensors_they_hand_out(name):
    """Updates may run in place to save memory on large volumes, but never on the caller's start noise nor on
    a tensor a callback was shown: callbacks may keep references (e.g. to record a trajectory)."""
    x_start = _noise(SHAPES["3d"], 10.0)
    original, shown = x_start.clone(), []

    def keep(info):
        shown.extend((info[key], info[key].clone()) for key in ("x", "denoised"))

    get_sampler(name)(GaussianMixture().denoiser, x_start, karras_sigmas(6, 0.01, 10.0), callback=keep,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_start, original)
    assert len(shown) == 12 and all(torch.equal(kept, copy) for kept, copy in shown)


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_generator_seed_gives_identical_samples_and_no_state_leaks(name):
    mixture = GaussianMixture()
    x_start = _noise(SHAPES["2d"], 10.0)
    sigmas = karras_sigmas(8, 0.01, 10.0)
    runs = [get_sampler(name)(mixture.denoiser, x_start, sigmas, generator=torch.Generator().manual_seed(s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    if name in ("ddpm", "dpmpp_2m_sde"):
        assert not torch.equal(runs[0], runs[2])


def test_samplers_keep_float32_and_reject_bad_grids():
    x = torch.randn(1, 1, 4, 4) * 10
    assert SAMPLERS["dpmpp_2m"](GAUSS.denoiser, x, karras_sigmas(4, 0.01, 10.0)).dtype == torch.float32
    with pytest.raises(ValueError, match="decreasing"):
        SAMPLERS["euler"](GAUSS.denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        get_sampler("dpm")


def test_nfe_bookkeeping():
    assert steps_for_nfe("heun", 19) == 10 and nfe_of("heun", 10) == 19
    assert steps_for_nfe("dpmpp_2m", 10) == 10 and nfe_of("ddim", 10) == 10


def test_gaussian_mixture_denoiser_matches_monte_carlo_posterior_mean():
    """The closed-form mixture denoiser equals E[x0 | x] estimated by importance weighting of prior draws."""
    mixture = GaussianMixture()
    generator = torch.Generator().manual_seed(0)
    prior = mixture.sample((200_000,), generator)
    x = torch.tensor([-0.9, 0.0, 0.5, 1.2], dtype=torch.float64)
    sigma = 0.3
    weights = torch.softmax(-0.5 * (x[:, None] - prior[None]) ** 2 / sigma**2, dim=1)
    monte_carlo = (weights * prior[None]).sum(1)
    exact = mixture.denoiser(x.reshape(1, 1, 4), torch.tensor([sigma], dtype=torch.float64)).flatten()
    assert torch.allclose(exact, monte_carlo, atol=5e-3)
