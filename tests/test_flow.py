"""Flow matching behind the sampler contract: the wrapper is exact for an oracle network of each prediction type,
the ideal velocity field of Gaussian data becomes the exact Gaussian denoiser, and samplers then draw that
Gaussian; the training objective is zero for the oracle (also on recycled inputs)."""

import pytest
import torch

from medidiff.core import FlowDenoiser, get_sampler
from medidiff.core.analytic import Gaussian
from medidiff.core.denoiser import append_dims

PREDICTIONS = ["epsilon", "sample", "v"]


def truth(prediction, x0, noise):
    return {"epsilon": noise, "sample": x0, "v": noise - x0}[prediction]


class Oracle(torch.nn.Module):
    """Returns the true prediction for the x0 and noise it was given; records what it was called with."""

    def __init__(self, x0, noise, prediction):
        super().__init__()
        self.x0, self.noise, self.prediction = x0, noise, prediction
        self.seen = None

    def forward(self, x_t, t):
        self.seen = (x_t, t)
        return truth(self.prediction, self.x0, self.noise)


class GaussianVelocity(torch.nn.Module):
    """The ideal network for x0 ~ N(mean, std²): ``E[target | x_t]`` along ``x_t = (1 - t) x0 + t noise``."""

    def __init__(self, wrapper, data: Gaussian, prediction):
        super().__init__()
        self.wrapper, self.data, self.prediction = wrapper, data, prediction

    def forward(self, x_t, index):
        sigma = self.wrapper.t_to_sigma(index).double()
        t = append_dims(sigma / (1 + sigma), x_t.ndim)
        var, centred = self.data.std**2, x_t.double() - (1 - t) * self.data.mean
        total = (1 - t) ** 2 * var + t**2
        x0 = self.data.mean + (1 - t) * var / total * centred
        noise = t / total * centred
        return truth(self.prediction, x0, noise).to(x_t.dtype)


def data(shape=(2, 3, 8, 8)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_wrapper_recovers_x0_and_feeds_the_straight_path(prediction):
    x0, noise = data()
    wrapper = FlowDenoiser(torch.nn.Identity(), 1000, prediction)
    wrapper.model = Oracle(x0, noise, prediction)
    index = torch.tensor([10, 700])
    sigma = wrapper.sigmas[index]
    t = append_dims((index + 1) / 1001, x0.ndim)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    assert torch.allclose(wrapper(x, sigma), x0, atol=1e-4)
    seen_x, seen_t = wrapper.model.seen
    assert torch.allclose(seen_x, (1 - t) * x0 + t * noise, atol=1e-5)
    assert torch.allclose(seen_t, index.float(), atol=1e-3)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_objective_is_zero_for_the_oracle_also_on_a_recycled_source(prediction):
    x0, noise = data()
    wrapper = FlowDenoiser(torch.nn.Identity(), 1000, prediction)
    index = torch.tensor([3, 512])
    wrapper.model = Oracle(x0, noise, prediction)
    loss, x0_hat = wrapper.loss(x0, t=index, noise=noise)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-10) and torch.allclose(x0_hat, x0, atol=1e-4)

    source = torch.randn_like(x0)  # the network's own earlier estimate
    t = append_dims((index + 1) / 1001, x0.ndim)
    x_t = (1 - t) * source + t * noise
    recycled_noise = (x_t - (1 - t) * x0) / t  # the noise that maps this x_t to x0 on a straight path
    wrapper.model = Oracle(x0, recycled_noise, prediction)
    loss, x0_hat = wrapper.loss(x0, t=index, noise=noise, source=source)
    assert torch.allclose(wrapper.model.seen[0], x_t, atol=1e-6)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-8) and torch.allclose(x0_hat, x0, atol=1e-3)


def test_a_wrong_network_has_a_positive_loss():
    wrapper = FlowDenoiser(lambda x, t: torch.zeros_like(x), 1000, "v")
    loss, _ = wrapper.loss(torch.randn(4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    assert (loss > 0.5).all()  # the velocity noise - x0 has variance 2 here


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_ideal_velocity_field_of_gaussian_data_is_the_exact_gaussian_denoiser(prediction):
    gauss = Gaussian(mean=0.3, std=0.5)
    wrapper = FlowDenoiser(torch.nn.Identity(), 1000, prediction)
    wrapper.model = GaussianVelocity(wrapper, gauss, prediction)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64) * 4
    # on trained levels and between them, across the whole range
    for sigma in (wrapper.sigmas[0], torch.tensor(0.05), torch.tensor(1.0), torch.tensor(37.0), wrapper.sigmas[-1]):
        sigmas = sigma.double().expand(3)
        assert torch.allclose(wrapper(x, sigmas), gauss.denoiser(x, sigmas), rtol=1e-4, atol=1e-5), float(sigma)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "ddim"])
def test_samplers_on_the_flow_wrapper_follow_the_exact_denoisers_path(sampler):
    """Every sampler runs unchanged: through the flow wrapper it takes the exact Gaussian denoiser's steps."""
    gauss = Gaussian(mean=0.3, std=0.5)
    wrapper = FlowDenoiser(torch.nn.Identity(), 1000, "v")
    wrapper.model = GaussianVelocity(wrapper, gauss, "v")
    sigmas = wrapper.get_sigmas(20, "exponential").double()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * sigmas[0]
    through_flow = get_sampler(sampler)(wrapper, x, sigmas)
    exact = get_sampler(sampler)(lambda x, sigma: gauss.denoiser(x, sigma), x, sigmas)
    assert torch.allclose(through_flow, exact, atol=1e-5)


def test_heun_on_the_flow_wrapper_converges_to_the_exact_flow_at_second_order():
    gauss = Gaussian(mean=0.3, std=0.5)
    wrapper = FlowDenoiser(torch.nn.Identity(), 1000, "v")
    wrapper.model = GaussianVelocity(wrapper, gauss, "v")
    start = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = []
    for steps in (40, 80, 160):
        sigmas = wrapper.get_sigmas(steps, "exponential").double()
        x = start * sigmas[0]
        errors.append((get_sampler("heun")(wrapper, x, sigmas) - gauss.flow(x, float(sigmas[0]), 0.0)).abs().max())
    assert errors[-1] < 3e-3
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 5.0  # error x 1/4 per doubling of steps


def test_min_snr_weighting_is_refused_for_flow_matching():
    with pytest.raises(ValueError, match="uniform"):
        FlowDenoiser(torch.nn.Identity(), 1000, "v", loss_weighting="min_snr")


def test_a_task_module_trains_and_samples_with_the_flow_objective():
    from medidiff.lit import DiffusionModule
    from medidiff.nets import ConditionalUNet
    from medidiff.tasks import Segmentation

    torch.manual_seed(0)
    net = ConditionalUNet(spatial_dims=2, in_channels=1, cond_channels=1, channels=[8, 16], num_res_blocks=1,
                          norm_num_groups=4)
    module = DiffusionModule(net=net, task=Segmentation(num_classes=2),
                             diffusion={"prediction_type": "v", "objective": "flow"}, terminal_fraction=0.5,
                             recycle_fraction=0.5)
    assert isinstance(module.denoiser, FlowDenoiser)
    batch = {"image": torch.randn(2, 1, 16, 16), "label": (torch.rand(2, 1, 16, 16) > 0.5).long()}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.net.parameters() if p.requires_grad)
    probability = module.eval().predict({"image": batch["image"]}, steps=2, ensemble=2, seed=0)
    assert probability.shape == (2, 2, 1, 16, 16) and ((0 <= probability) & (probability <= 1)).all()
    with pytest.raises(ValueError, match="ddpm or flow"):
        DiffusionModule(net=net, task=Segmentation(num_classes=2), diffusion={"objective": "rflow"})
