"""Restoration and super-resolution modules: the data-consistency hooks make the *final sample* agree with
the measurement exactly, through the module's own sampling path (ensembles and padding included)."""

import pytest
import torch

from medidiff.core.operators import downsample, to_kspace
from medidiff.data.degrade import degrade_with_extras
from medidiff.lit import DiffusionModule
from medidiff.nets import ConditionalUNet
from medidiff.tasks import Restoration, SuperRes


def _net(dims):
    return ConditionalUNet(dims, 1, 1, channels=(8, 16), norm_num_groups=4)


def _clean(shape, seed=0):
    smooth = torch.nn.functional.avg_pool2d if len(shape) == 3 else torch.nn.functional.avg_pool3d
    noise = torch.rand((1, *shape), generator=torch.Generator().manual_seed(seed))
    return smooth(noise, 3, 1, 1)[0]


@pytest.mark.parametrize("shape", [(1, 30, 26), (1, 20, 18, 12)])  # sizes the UNet must pad
def test_kspace_consistency_holds_on_the_final_sample(shape):
    image = _clean(shape)
    degraded, extras = degrade_with_extras(image, {"kspace": {"acceleration": 4, "dims": 2}}, seed=1)
    batch = {"image": image[None], "condition": degraded[None], "kspace_mask": extras["kspace_mask"][None]}
    module = DiffusionModule(net=_net(len(shape) - 1), task=Restoration()).eval()
    hook = module.task.measurement_hook(batch)
    samples = module.sample(module.task.condition(batch), hook=hook, steps=3, ensemble=2)  # (N, B, C, *spatial)
    mask = batch["kspace_mask"]
    measured = to_kspace(batch["condition"] * 2 - 1, 2) * mask
    for member in samples:
        assert torch.allclose(to_kspace(member, 2) * mask, measured, atol=1e-4)
    unhooked = module.sample(module.task.condition(batch), steps=3)[0]
    assert not torch.allclose(to_kspace(unhooked, 2) * mask, measured, atol=1e-2)


@pytest.mark.parametrize("residual_scale", [0.0, 8.0])
@pytest.mark.parametrize("shape,factors", [((1, 32, 24), (4, 4)), ((1, 16, 16, 12), (1, 1, 4))])
def test_superres_consistency_holds_on_the_final_sample(shape, factors, residual_scale):
    image = _clean(shape)
    spec = {"downsample": {"factor": list(factors), "model": "average"}}
    degraded, extras = degrade_with_extras(image, spec, seed=0)
    assert degraded.shape == image.shape
    batch = {"image": image[None], "condition": degraded[None], "low_res": extras["low_res"][None]}
    module = DiffusionModule(net=_net(len(shape) - 1), task=SuperRes(factors=list(factors),
                                                                     residual_scale=residual_scale)).eval()
    sample = module.sample(module.task.condition(batch), hook=module.task.measurement_hook(batch), steps=3)[0]
    assert torch.allclose(downsample(sample, factors), batch["low_res"] * 2 - 1, atol=1e-4)


def test_residual_diffusion_trains_on_the_scaled_residual_and_samples_in_image_space(monkeypatch):
    """With ``residual_scale`` the target is ``(image - condition) * scale``; a network that estimates a zero
    residual returns the condition itself, not the zero image."""
    image = _clean((1, 16, 16))
    degraded, _ = degrade_with_extras(image, {"downsample": {"factor": [2, 2], "model": "average"}}, seed=0)
    batch = {"image": image[None], "condition": degraded[None]}
    module = DiffusionModule(net=_net(2), task=SuperRes(factors=[2, 2], residual_scale=8.0)).eval()
    target, cond = module.target_and_condition(batch)
    assert torch.allclose(target, (image[None] - degraded[None]) * 2 * 8.0, atol=1e-6)
    monkeypatch.setattr(module, "_denoiser", lambda *args: lambda x, sigma: torch.zeros_like(x))
    samples = module.sample(cond, steps=3, ensemble=2)
    assert samples.shape == (2, 1, 1, 16, 16)
    assert torch.allclose(samples, cond.expand_as(samples), atol=1e-6)


def test_psnr_metric_of_a_perfect_prediction_is_high_and_of_noise_low():
    task = Restoration()
    image = _clean((1, 16, 16))[None]
    good = task.sample_metrics(image[None], {"image": image})["psnr"]
    bad = task.sample_metrics(torch.rand((1, *image.shape)), {"image": image})["psnr"]
    assert good > 60 and bad < 15


def test_restoration_infer_refuses_an_all_zero_mask_and_writes_nothing(tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from medidiff.cli import main
    from medidiff.demo import SAMPLES, WEIGHTS

    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((73, 90), np.uint8), np.eye(4)), mask)
    out = tmp_path / "out"
    code = main(["infer", "--task", "restoration", "--ckpt", str(WEIGHTS / "restoration_mni_2d.ckpt"), "--input",
                 str(SAMPLES / "mni152" / "t1_2mm.nii.gz"), "--mask", str(mask), "--output", str(out)])
    assert code == 2
    assert "samples nothing" in capsys.readouterr().err
    assert not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.parametrize("grid, message", [("1000,0.3", "cannot sample on the grid"),
                                           ("sideways", "neither a grid name")])
def test_infer_grid_levels_are_checked_against_the_model_before_anything_is_written(tmp_path, capsys, grid, message):
    """``--grid`` takes a name or the noise levels; levels beyond the shipped model's trained range are refused
    with the checkpoint named, before any output exists."""
    from medidiff.cli import main
    from medidiff.demo import SAMPLES, WEIGHTS

    out = tmp_path / "out"
    try:
        code = main(["infer", "--task", "restoration", "--ckpt", str(WEIGHTS / "restoration_mni_2d.ckpt"), "--input",
                     str(SAMPLES / "mni152" / "t1_2mm.nii.gz"), "--grid", grid, "--output", str(out)])
    except SystemExit as exit_:  # argparse refuses a malformed value itself
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and ("restoration_mni_2d.ckpt" in err or "--grid" in err)
    assert not any(p.is_file() for p in out.rglob("*"))
