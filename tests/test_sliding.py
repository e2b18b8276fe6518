"""Sliding-window denoising: exact for a voxel-wise denoiser whatever the window grid, shifted grids are
reproducible, and the module samples volumes larger than a window."""

import pytest
import torch

from medidiff.lit import DiffusionModule
from medidiff.nets import ConditionalUNet
from medidiff.sliding import SlidingWindowDenoiser, window_weights
from medidiff.tasks import SuperRes


def _voxelwise(x, sigma, cond=None):
    return 0.5 * x + cond / (1 + sigma.view(-1, 1, 1, 1, 1))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_voxelwise_denoiser_is_reproduced_exactly_with_shifted_windows(batch_size):
    x, cond = torch.randn(1, 1, 40, 36, 20), torch.rand(1, 1, 40, 36, 20)
    sigma = torch.tensor([2.0])
    windows = SlidingWindowDenoiser(_voxelwise, (16, 16, 8), overlap=0.25, shift=True, batch_size=batch_size)
    for _ in range(3):  # a different grid each call, the same answer
        assert torch.allclose(windows(x, sigma, cond=cond), _voxelwise(x, sigma, cond), atol=1e-5)


def test_an_axis_shorter_than_the_window_is_not_padded():
    """A slab thinner than the window is one window on that axis, so the denoiser sees the volume's own edges
    and the result equals the whole-volume call. The stand-in denoiser depends on its whole input (its mean),
    as a network's receptive field does; MONAI would have padded the window with zeros."""
    def context_dependent(x, sigma, cond=None):
        return x - x.mean(dim=(2, 3, 4), keepdim=True) + cond

    x, cond, sigma = torch.randn(1, 1, 16, 16, 8) + 1, torch.rand(1, 1, 16, 16, 8), torch.tensor([1.0])
    windows = SlidingWindowDenoiser(context_dependent, (16, 16, 16))
    assert torch.allclose(windows(x, sigma, cond=cond), context_dependent(x, sigma, cond), atol=1e-5)


def test_grid_offsets_change_per_call_and_repeat_with_the_seed():
    first = SlidingWindowDenoiser(_voxelwise, (16, 16, 8), shift=True, seed=3)
    second = SlidingWindowDenoiser(_voxelwise, (16, 16, 8), shift=True, seed=3)
    offsets = [first._offsets((40, 36, 20)) for _ in range(6)]
    assert offsets == [second._offsets((40, 36, 20)) for _ in range(6)]
    assert len({tuple(o) for o in offsets}) > 1
    assert all(0 <= o < 12 for row in offsets for o in row)
    assert first._offsets((16, 16, 8)) == [0, 0, 0]  # one window per axis: nothing to shift
    assert SlidingWindowDenoiser(_voxelwise, (16, 16, 8))._offsets((40, 36, 20)) == [0, 0, 0]  # off by default


def test_module_samples_a_volume_larger_than_its_window_reproducibly():
    net = ConditionalUNet(3, 1, 1, channels=(4, 8), norm_num_groups=4, num_head_channels=4)
    module = DiffusionModule(net=net, task=SuperRes(factors=[1, 1, 2])).eval()
    inputs = {"condition": torch.rand(1, 1, 24, 20, 16)}
    first = module.predict(inputs, window=(16, 16, 8), steps=3).mean(0)
    again = module.predict(inputs, window=(16, 16, 8), steps=3).mean(0)
    assert first.shape == (1, 1, 24, 20, 16) and torch.isfinite(first).all()
    assert torch.equal(first, again)


def test_window_weights_are_gaussian_without_a_floor():
    weights = window_weights((32, 32, 32), "gaussian")
    assert weights.shape == (1, 1, 32, 32, 32)
    assert weights.max() <= 1 and weights[0, 0, 0, 0, 0] < 1e-9  # MONAI would clamp this corner to 1e-3
    assert torch.allclose(weights, weights.flip(2).flip(3).flip(4))
    assert window_weights((32, 32, 32), "constant") is None


@pytest.mark.parametrize("task,ckpt", [("segmentation", "segmentation_ct_3d"), ("superres", "superres_ct_3d")])
def test_a_volume_larger_than_the_window_is_sampled_in_windows(tmp_path, monkeypatch, task, ckpt):
    """File-level inference of a volume larger than the training patch: the network never sees more than a
    window (padded to its size multiple), whatever the task."""
    import nibabel as nib
    import numpy as np

    from medidiff.cli import main
    from tests.conftest import REPO

    seen = []
    forward = ConditionalUNet.forward
    monkeypatch.setattr(ConditionalUNet, "forward", lambda self, x, t, cond=None: (
        seen.append(tuple(x.shape[2:])), forward(self, x, t, cond))[1])
    source = nib.load(REPO / "medidiff/sample_data/totalseg_ct/ct_a.nii.gz")
    volume = np.clip(np.asanyarray(source.dataobj).astype(np.float32), -1000, 1000)
    scan = tmp_path / "in" / "ct.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(volume[:, :, ::4] if task == "superres" else volume, source.affine), scan)
    assert main(["infer", "--task", task, "--ckpt", ckpt, "--input", str(scan), "--output", str(tmp_path / "out"),
                 "--steps", "1"]) == 0
    assert seen and max(max(shape) for shape in seen) <= 48, sorted(set(seen))
