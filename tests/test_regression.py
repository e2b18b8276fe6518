"""Regression-UNet baselines of the image tasks: they read the diffusion modules' batches, apply the task's
consistency step once (exactly), and run through the same checkpoint and infer path."""

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.cli import main
from medidiff.core.operators import downsample, to_kspace
from medidiff.data.degrade import degrade_with_extras
from medidiff.lit import SupervisedModule
from medidiff.lit.registry import load_system
from medidiff.nets import PlainUNet
from medidiff.tasks import Restoration, Segmentation, SuperRes
from tests.conftest import export_untrained


def _net(dims):
    return PlainUNet(dims, 1, 1, channels=(4, 8), strides=(2,), num_res_units=1)


def _clean(shape, seed=0):
    smooth = torch.nn.functional.avg_pool2d if len(shape) == 3 else torch.nn.functional.avg_pool3d
    return smooth(torch.rand((1, *shape), generator=torch.Generator().manual_seed(seed)), 3, 1, 1)[0]


def test_restoration_unet_output_matches_the_measured_kspace():
    image = _clean((1, 32, 28))
    degraded, extras = degrade_with_extras(image, {"kspace": {"acceleration": 4, "dims": 2}}, seed=1)
    batch = {"image": image[None], "condition": degraded[None], "kspace_mask": extras["kspace_mask"][None]}
    module = SupervisedModule(net=_net(2), task=Restoration()).eval()
    task = module.task
    restored = module.predict(batch)
    assert restored.shape == (1, 1, 1, 32, 28)
    mask = batch["kspace_mask"]
    measured = to_kspace(batch["condition"] * 2 - 1, 2) * mask
    # decode clamps to [0, 1]; the projection holds before the clamp, so compare where nothing was clamped
    cond = task.condition(batch)
    with torch.no_grad():
        raw = task.supervised_estimate(task.supervised_output(module.net, cond, None), cond)
    projected = task.measurement_hook(batch)(raw, torch.zeros(1), raw)
    assert torch.allclose(to_kspace(projected, 2) * mask, measured, atol=1e-4)
    assert torch.equal(restored[0], task.decode(projected))
    assert not torch.allclose(to_kspace(raw, 2) * mask, measured, atol=1e-2)


def test_superres_unet_output_downsamples_to_the_input():
    image = _clean((1, 16, 16, 12))
    degraded, extras = degrade_with_extras(image, {"downsample": {"factor": [1, 1, 4], "model": "average"}}, seed=0)
    batch = {"image": image[None], "condition": degraded[None], "low_res": extras["low_res"][None]}
    module = SupervisedModule(net=_net(3), task=SuperRes(factors=[1, 1, 4])).eval()
    task = module.task
    cond = task.condition(batch)
    with torch.no_grad():
        raw = task.supervised_estimate(task.supervised_output(module.net, cond, None), cond)
    projected = task.measurement_hook(batch)(raw, torch.zeros(1), raw)
    assert torch.allclose(downsample(projected, [1, 1, 4]), batch["low_res"] * 2 - 1, atol=1e-5)


def test_training_steps_reduce_the_regression_loss():
    torch.manual_seed(0)
    image = _clean((1, 32, 32))
    degraded, _ = degrade_with_extras(image, {"noise": {"std": 0.2}}, seed=1)
    batch = {"image": image[None], "condition": degraded[None]}
    module = SupervisedModule(net=_net(2), task=Restoration(loss="mse"), lr=3e-3)
    optimizer = module.configure_optimizers()

    def loss():
        return module.task.supervised_loss(module.net, batch)

    first = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.5 * first


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="loss"):
        SupervisedModule(net=_net(2), task=Restoration(loss="ssim"))


def test_exported_regressor_runs_through_infer_and_keeps_the_affine(tmp_path):
    module = SupervisedModule(net=_net(2), task=SuperRes(factors=[2, 2])).eval()
    ckpt = export_untrained(module, {"card": "mni152", "task": "superres", "patch_size": [16, 16]},
                            tmp_path / "sr.ckpt")
    loaded, data = load_system(ckpt, task="superres")
    assert type(loaded) is SupervisedModule and type(loaded.task) is SuperRes and data["patch_size"] == [16, 16]
    affine = np.array([[0.9, 0.1, 0, 5], [-0.1, 0.9, 0, -3], [0, 0, 2.0, 1], [0, 0, 0, 1]])
    scan = np.random.default_rng(0).uniform(0, 255, (21, 23)).astype(np.float32)  # sizes the UNet must pad
    nib.save(nib.Nifti1Image(scan, affine), tmp_path / "lr.nii.gz")
    assert main(["infer", "--task", "superres", "--ckpt", str(ckpt), "--input", str(tmp_path / "lr.nii.gz"),
                 "--output", str(tmp_path / "out")]) == 0
    result = nib.load(tmp_path / "out" / "lr.nii.gz")
    assert result.shape[:2] == (42, 46)
    np.testing.assert_allclose(result.affine[:3, :2], affine[:3, :2] / 2, atol=1e-5)


def test_3d_unet_segmenter_infers_a_volume_larger_than_its_patch(tmp_path):
    """The baseline windows itself (roi_size); infer must not wrap it in the diffusion sliding-window denoiser."""
    net = PlainUNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
    module = SupervisedModule(net=net, task=Segmentation(num_classes=3), roi_size=[16, 16, 16]).eval()
    ckpt = export_untrained(module, {"card": "mni152", "task": "segmentation", "patch_size": [16, 16, 16]},
                            tmp_path / "s.ckpt")
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    volume = np.random.default_rng(0).uniform(0, 255, (30, 26, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "t1.nii.gz")
    assert main(["infer", "--task", "segmentation", "--ckpt", str(ckpt), "--input", str(tmp_path / "t1.nii.gz"),
                 "--output", str(tmp_path / "out")]) == 0
    labels = nib.load(tmp_path / "out" / "t1.nii.gz")
    assert labels.shape == (30, 26, 20)
    np.testing.assert_allclose(labels.affine, affine)


def test_no_consistency_is_refused_for_tasks_without_a_consistency_step(tmp_path, capsys):
    code = main(["infer", "--task", "segmentation", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--no-consistency"])
    assert code == 2 and "--no-consistency applies to restoration and superres" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_windowed_regression_of_a_large_input_matches_the_whole_input_pass_for_a_voxelwise_net():
    module = SupervisedModule(net=_net(2), task=Restoration()).eval()
    module.net = torch.nn.Conv2d(1, 1, 1)  # voxel-wise: windowing must not change the result
    cond = torch.rand(1, 1, 40, 36) * 2 - 1
    inputs = {"condition": (cond + 1) / 2}  # the task's condition() maps [0, 1] to [-1, 1]
    windowed = module.predict(inputs, window=(16, 16)).mean(0)
    assert torch.allclose(windowed, module.predict(inputs).mean(0), atol=1e-5)


def test_unet_segmenter_window_on_a_thin_volume_is_the_volume_itself():
    """Axes shorter than roi_size are one window (padded only to what the network divides, by replication):
    the windowed result equals the network on the whole volume, where MONAI would have added zeros."""
    from medidiff.core.padding import crop, pad_to_multiple

    net = PlainUNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
    module = SupervisedModule(net=net, task=Segmentation(num_classes=3), roi_size=[16, 16, 16]).eval()
    volume = torch.rand(1, 1, 12, 10, 7, generator=torch.Generator().manual_seed(0))
    padded, pad = pad_to_multiple(volume, 2)
    with torch.no_grad():
        expected = crop(net(padded), pad).softmax(1)
        assert torch.allclose(module.predict({"image": volume})[0], expected, atol=1e-5)


def test_unet_segmenter_with_dice_weight_zero_trains_on_cross_entropy_alone():
    """``dice_weight 0`` (the calibration baseline): the loss is exactly the mean pixel cross-entropy."""
    net = PlainUNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1)
    logits = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    label = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    image = torch.zeros(2, 1, 8, 8)  # the condition: not used by the segmentation loss
    batch = {"image": image, "label": label}
    ce_only = SupervisedModule(net=net, task=Segmentation(dice_weight=0.0)).task.supervised_output_loss(logits, image,
                                                                                                       batch)
    torch.testing.assert_close(ce_only, torch.nn.functional.cross_entropy(logits, label[:, 0].long()))
    with_dice = SupervisedModule(net=net, task=Segmentation()).task.supervised_output_loss(logits, image, batch)
    assert with_dice > ce_only + 0.1  # the default keeps MONAI's Dice term
