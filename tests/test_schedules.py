"""Schedules against their definitions and against MONAI's own noise schedules."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from medidiff.core.schedules import (
    alphas_cumprod,
    beta_schedule,
    explicit_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
    timestep_sigmas,
)

MONAI_NAMES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "sigmoid": "sigmoid_beta",
               "cosine": "cosine"}


@pytest.mark.parametrize("name", MONAI_NAMES)
def test_beta_schedules_match_monai(name):
    ours = alphas_cumprod(beta_schedule(name, 1000))
    theirs = DDIMScheduler(1000, schedule=MONAI_NAMES[name]).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", MONAI_NAMES)
def test_zero_terminal_snr_ends_at_zero_and_keeps_the_start(name):
    plain = alphas_cumprod(beta_schedule(name, 1000))
    rescaled = alphas_cumprod(beta_schedule(name, 1000, zero_terminal_snr=True))
    assert rescaled[-1].abs() < 1e-12 and torch.isclose(rescaled[0], plain[0])
    assert (rescaled[1:] < rescaled[:-1]).all()
    sigmas = sigmas_from_alphas_cumprod(rescaled)
    assert torch.isfinite(sigmas).all() and sigmas[-1] == pytest.approx(4096, rel=1e-3)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        beta_schedule("quadratic")


@pytest.mark.parametrize("grid", [karras_sigmas, exponential_sigmas])
def test_sigma_grids_are_decreasing_from_max_to_min_then_zero(grid):
    sigmas = grid(10, 0.002, 80.0)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float64
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_exponential_grid_is_uniform_in_log_sigma():
    log_steps = exponential_sigmas(8, 0.01, 10.0)[:-1].log().diff()
    assert torch.allclose(log_steps, log_steps[0].expand_as(log_steps))


def test_timestep_spacings():
    train = sigmas_from_alphas_cumprod(alphas_cumprod(beta_schedule("linear", 1000)))
    trailing = timestep_sigmas(train, 10, "trailing")
    assert trailing[0] == train[999] and trailing[-2] == train[99] and trailing[-1] == 0
    leading = timestep_sigmas(train, 10, "leading")
    assert leading[0] == train[900] and leading[-2] == train[0]
    scheduler = DDIMScheduler(1000)
    scheduler.set_timesteps(10)
    assert torch.equal(timestep_sigmas(train, 10, "linspace")[:-1], train[scheduler.timesteps])
    with pytest.raises(ValueError, match="1000"):
        timestep_sigmas(train, 1001)


def test_explicit_grid_is_the_levels_then_zero_with_or_without_the_final_zero():
    for levels in ([80.0, 0.3], [80.0, 0.3, 0.0]):
        sigmas = explicit_sigmas(levels, 2, 0.002, 80.0)
        assert sigmas.dtype == torch.float64 and sigmas.tolist() == [80.0, 0.3, 0.0]
    assert explicit_sigmas([1.0], None, 0.002, 80.0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("levels, steps, message", [
    ([80.0, 0.3], 3, "2 steps, not 3"),
    ([0.3, 80.0], None, "strictly decreasing"),
    ([80.0, 80.0], None, "strictly decreasing"),
    ([float("nan"), 1.0], None, "finite"),
    ([100.0, 1.0], None, "outside the trained range"),
    ([80.0, 0.001], None, "outside the trained range"),
    ([0.0], None, "at least one"),
])
def test_explicit_grid_refuses_what_a_sampler_cannot_walk(levels, steps, message):
    with pytest.raises(ValueError, match=message):
        explicit_sigmas(levels, steps, 0.002, 80.0)
