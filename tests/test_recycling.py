"""Recycling: training inputs noised from the network's own one-step estimate (see DiffusionModule)."""

import torch

from medidiff.lit import DiffusionModule
from medidiff.nets import ConditionalUNet
from medidiff.tasks import Segmentation


class ConstantNet(torch.nn.Module):
    """Predicts x0 = 0.25 everywhere and records what it was fed."""

    in_channels, spatial_dims, config = 1, 2, {}

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, cond=None):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return torch.full_like(x, 0.25) + self.weight


def _module(fraction, net=None):
    return DiffusionModule(net=net or ConstantNet(), task=Segmentation(num_classes=2),
                           diffusion={"prediction_type": "sample"}, recycle_fraction=fraction)


def test_recycled_samples_are_the_networks_estimate_from_pure_noise():
    module = _module(1.0)
    x0, cond = -torch.ones(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    source = module.recycled_source(x0, cond)
    assert torch.equal(source, torch.full_like(x0, 0.25))
    x, t = module.net.seen[-1]
    assert torch.allclose(t, torch.full((3,), 999.0))  # called at the highest noise level
    assert x.std() < 1.5  # the network's input is scaled pure noise
    assert _module(0.0).recycled_source(x0, cond) is None


def test_a_fraction_of_the_batch_is_recycled_and_the_rest_keeps_the_truth():
    torch.manual_seed(0)
    source = _module(0.5).recycled_source(-torch.ones(400, 1, 2, 2), None)
    recycled = (source == 0.25).flatten(1).all(1)
    kept = (source == -1).flatten(1).all(1)
    assert (recycled | kept).all() and 150 < int(recycled.sum()) < 250


def test_training_with_recycling_updates_a_real_network():
    torch.manual_seed(0)
    net = ConditionalUNet(spatial_dims=2, in_channels=1, cond_channels=1, channels=(8, 16), norm_num_groups=4)
    module = _module(1.0, net)
    batch = {"image": torch.randn(2, 1, 16, 16), "label": (torch.rand(2, 1, 16, 16) > 0.5).float()}
    loss = module._loss(batch, "train")
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_the_loss_noises_the_recycled_estimate_not_the_truth(monkeypatch):
    """Inside the training loss the network must see ``x_t`` built from its own estimate (0.25), not from the
    truth (-1). Timesteps are held at t = 0, where ``x_t`` is the source up to 1 % noise."""
    for fraction, expected in ((1.0, 0.25), (0.0, -1.0)):
        module = _module(fraction)
        monkeypatch.setattr(module, "draw_timesteps", lambda batch, device, generator=None: torch.zeros(
            batch, dtype=torch.long, device=device))
        module._loss({"image": torch.randn(4, 1, 8, 8), "label": torch.zeros(4, 1, 8, 8)}, "train")
        x, t = module.net.seen[-1]  # the loss's own call, after the recycling call
        assert torch.equal(t, torch.zeros(4)) and abs(float(x.mean()) - expected) < 0.05, (fraction, float(x.mean()))
