"""The denoiser wrapper recovers x0 exactly from a network that predicts the truth, for every
prediction type and schedule, and its training objective is zero for that network."""

import pytest
import torch

from medidiff.core.denoiser import DiscreteDenoiser, append_dims
from medidiff.core.schedules import beta_schedule

SCHEDULES = [("linear", False), ("cosine", False), ("scaled_linear", True), ("sigmoid", False)]
PREDICTIONS = ["epsilon", "sample", "v"]
SHAPES = [(2, 3, 8, 8), (2, 1, 4, 6, 5)]


class OracleNet(torch.nn.Module):
    """Returns the true eps / x0 / v for the x0 and noise it was given, whatever its input."""

    def __init__(self, x0, noise, abar, prediction):
        super().__init__()
        self.x0, self.noise, self.abar, self.prediction = x0, noise, abar, prediction
        self.seen_t = None

    def forward(self, x_t, t):
        self.seen_t = t
        a = append_dims(self.abar, x_t.ndim)
        truth = {"epsilon": self.noise, "sample": self.x0, "v": a.sqrt() * self.noise - (1 - a).sqrt() * self.x0}
        return truth[self.prediction]


def _oracle(prediction, schedule, zero_snr, shape):
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    betas = beta_schedule(schedule, 1000, zero_terminal_snr=zero_snr)
    wrapper = DiscreteDenoiser(torch.nn.Identity(), betas, prediction)
    return x0, noise, wrapper


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("schedule,zero_snr", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_wrapper_recovers_x0_from_an_oracle_network(prediction, schedule, zero_snr, shape):
    x0, noise, wrapper = _oracle(prediction, schedule, zero_snr, shape)
    t = torch.tensor([10, 700])
    sigma = wrapper.sigmas[t]
    abar = 1 / (1 + sigma.double() ** 2)
    wrapper.model = OracleNet(x0, noise, abar.float(), prediction)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    assert torch.allclose(wrapper(x, sigma), x0, atol=1e-4)
    assert torch.allclose(wrapper.model.seen_t, t.float(), atol=1e-3)


@pytest.mark.parametrize("schedule,zero_snr", SCHEDULES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_loss_is_zero_for_the_oracle_and_x0_hat_is_exact(prediction, schedule, zero_snr):
    x0, noise, wrapper = _oracle(prediction, schedule, zero_snr, SHAPES[0])
    t = torch.tensor([3, 512])
    wrapper.model = OracleNet(x0, noise, wrapper.alphas_cumprod[t], prediction)
    loss, x0_hat = wrapper.loss(x0, t=t, noise=noise)
    assert loss.shape == (2,) and torch.allclose(loss, torch.zeros(2), atol=1e-10)
    assert torch.allclose(x0_hat, x0, atol=1e-3)


def test_loss_is_positive_for_a_wrong_network_and_drawn_with_the_generator():
    wrapper = DiscreteDenoiser(lambda x, t: torch.zeros_like(x), beta_schedule("linear"), "epsilon")
    x0 = torch.randn(4, 1, 8, 8)
    a, _ = wrapper.loss(x0, generator=torch.Generator().manual_seed(1))
    b, _ = wrapper.loss(x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and (a > 0.5).all()  # eps ~ N(0, 1): MSE of predicting 0 is about 1


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights(prediction):
    gamma = 5.0
    wrapper = DiscreteDenoiser(torch.nn.Identity(), beta_schedule("linear"), prediction,
                               loss_weighting="min_snr", min_snr_gamma=gamma)
    t = torch.arange(1000)
    abar = wrapper.alphas_cumprod
    snr = abar / (1 - abar)
    # in x0-space every prediction type's weighted loss equals min(snr, gamma) * ||x0_hat - x0||^2
    to_x0_space = {"epsilon": snr, "sample": torch.ones_like(snr), "v": snr + 1}[prediction]
    assert torch.allclose(wrapper.loss_weights(t) * to_x0_space, snr.clamp(max=gamma), rtol=1e-4)


def test_sigma_timestep_round_trip_and_clamping():
    wrapper = DiscreteDenoiser(torch.nn.Identity(), beta_schedule("cosine"), "v")
    t = torch.tensor([0.0, 1.5, 250.25, 999.0])
    assert torch.allclose(wrapper.sigma_to_t(wrapper.t_to_sigma(t)), t, atol=1e-3)
    below, above = torch.tensor([1e-6]), torch.tensor([1e6])
    assert wrapper.sigma_to_t(below).item() == 0 and wrapper.sigma_to_t(above).item() == 999
    quantized = DiscreteDenoiser(torch.nn.Identity(), beta_schedule("cosine"), "v", quantize=True)
    assert quantized.sigma_to_t(wrapper.t_to_sigma(torch.tensor([250.3]))).item() == 250


def test_output_keeps_the_input_dtype_under_autocast():
    net = torch.nn.Conv2d(1, 1, 1)
    wrapper = DiscreteDenoiser(lambda x, t: net(x), beta_schedule("linear"), "epsilon")
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(x, torch.full((2,), 3.0))
    assert out.dtype == torch.float32


def test_get_sigmas_stays_inside_the_trained_range():
    wrapper = DiscreteDenoiser(torch.nn.Identity(), beta_schedule("linear"), "epsilon")
    for grid in ("karras", "exponential", "trailing", "leading", "linspace"):
        sigmas = wrapper.get_sigmas(10, grid)
        assert sigmas.shape == (11,) and sigmas[-1] == 0
        assert sigmas[0] <= wrapper.sigma_max * (1 + 1e-5) and sigmas[-2] >= wrapper.sigma_min * (1 - 1e-5)


class InputOracle(torch.nn.Module):
    """Returns, from ``x_t`` alone, the prediction that maps ``x_t`` exactly to ``x0``."""

    def __init__(self, x0, abar, prediction):
        super().__init__()
        self.x0, self.abar, self.prediction = x0, abar, prediction
        self.seen_x = None

    def forward(self, x_t, t):
        self.seen_x = x_t
        a = append_dims(self.abar, x_t.ndim)
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": self.x0, "v": a.sqrt() * eps - (1 - a).sqrt() * self.x0}[self.prediction]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_recycled_source_is_noised_and_the_target_still_maps_to_x0(prediction):
    x0, noise, wrapper = _oracle(prediction, "linear", False, SHAPES[0])
    source = torch.randn_like(x0)  # stands in for the network's own earlier estimate
    t = torch.tensor([3, 512])
    wrapper.model = InputOracle(x0, wrapper.alphas_cumprod[t], prediction)
    loss, x0_hat = wrapper.loss(x0, t=t, noise=noise, source=source)
    a = append_dims(wrapper.alphas_cumprod[t], x0.ndim)
    assert torch.allclose(wrapper.model.seen_x, a.sqrt() * source + (1 - a).sqrt() * noise)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-8)
    assert torch.allclose(x0_hat, x0, atol=1e-3)
