"""Moving from MONAI's schedulers to medidiff's samplers changes nothing but speed: given the same network
outputs, DDIM (eta=0) and DDPM steps agree with MONAI's DDIMScheduler / DDPMScheduler."""

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medidiff.core.denoiser import DiscreteDenoiser
from medidiff.core.samplers import sample_ddim, sample_ddpm
from medidiff.core.schedules import append_zero

SHAPE = (2, 1, 6, 6)
PREDICTIONS = ["epsilon", "sample", "v"]


def make_fake_net(abar_table, prediction):
    """A fixed smooth function of (x_t, t) standing in for a trained network. It is built from a bounded x0
    guess so that long chains stay finite, then expressed in the requested prediction type."""

    def fake_net(x_t, t):
        a = abar_table[t.round().long()].reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        x0 = 0.8 * torch.tanh(x_t) * (0.5 + t.reshape(a.shape) / 2000)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]

    return fake_net


def _pair(prediction, scheduler_cls, schedule="linear_beta"):
    monai_name = {"v": "v_prediction"}.get(prediction, prediction)
    scheduler = scheduler_cls(1000, schedule=schedule, prediction_type=monai_name, clip_sample=False)
    net = make_fake_net(scheduler.alphas_cumprod, prediction)
    return scheduler, DiscreteDenoiser(net, scheduler.betas, prediction), net


def _vp_to_ve(x_vp, denoiser, t):
    return x_vp / denoiser.alphas_cumprod[t].sqrt() if t >= 0 else x_vp


def _ve_to_vp(x_ve, denoiser, t):
    return x_ve * denoiser.alphas_cumprod[t].sqrt() if t >= 0 else x_ve


@pytest.mark.parametrize("schedule", ["linear_beta", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_full_chain_matches_monai(prediction, schedule):
    scheduler, denoiser, fake_net = _pair(prediction, DDIMScheduler, schedule)
    scheduler.set_timesteps(1000)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours = sample_ddim(denoiser, _vp_to_ve(x_vp, denoiser, 999), append_zero(denoiser.sigmas.flip(0)))
    for t in scheduler.timesteps:
        x_vp, _ = scheduler.step(fake_net(x_vp, t.expand(SHAPE[0])), int(t), x_vp)
    assert torch.allclose(ours, x_vp, atol=2e-4), (ours - x_vp).abs().max()


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_single_steps_match_monai_on_its_own_timesteps(prediction, steps):
    scheduler, denoiser, fake_net = _pair(prediction, DDIMScheduler)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps.tolist():
        prev = t - 1000 // steps
        x_vp = torch.randn(SHAPE, generator=generator)
        expected, _ = scheduler.step(fake_net(x_vp, torch.full((SHAPE[0],), t)), t, x_vp)
        sigmas = torch.stack([denoiser.sigmas[t], denoiser.sigmas[prev] if prev >= 0 else torch.tensor(0.0)])
        ours = _ve_to_vp(sample_ddim(denoiser, _vp_to_ve(x_vp, denoiser, t), sigmas), denoiser, prev)
        assert torch.allclose(ours, expected, atol=5e-4), (t, (ours - expected).abs().max())


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_full_chain_matches_monai_noise_for_noise(prediction):
    scheduler, denoiser, fake_net = _pair(prediction, DDPMScheduler)
    scheduler.set_timesteps(1000)
    x_vp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours = sample_ddpm(denoiser, _vp_to_ve(x_vp, denoiser, 999), append_zero(denoiser.sigmas.flip(0)),
                       generator=torch.Generator().manual_seed(42))
    monai_generator = torch.Generator().manual_seed(42)
    for t in scheduler.timesteps:
        x_vp, _ = scheduler.step(fake_net(x_vp, t.expand(SHAPE[0])), int(t), x_vp, generator=monai_generator)
    assert torch.allclose(ours, x_vp, atol=1e-3), (ours - x_vp).abs().max()
