"""Fusion: classical baselines on hand-built cases, the DDFM-style likelihood hook (exact adjoint,
monotone loss, identity at low noise), the module, file-level fusion (registration errors, metadata,
colour), configs and the command line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff import io
from medidiff.cli import main
from medidiff.core.fusion_likelihood import FusionLikelihood, grad, grad_adjoint
from medidiff.data.custom import rgb_to_ycbcr
from medidiff.errors import MedidiffError
from medidiff.fusion_classical import fuse_average, fuse_laplacian, fuse_max_abs, laplacian_pyramid
from medidiff.inference import SamplingOptions, from_checkpoint, infer
from medidiff.inference.model import Model
from medidiff.lit import DiffusionModule
from medidiff.nets import ConditionalUNet
from medidiff.tasks import Fusion
from medidiff.tasks.fusion import classical_contract, restore_colour
from tests.conftest import REPO, SHARED

SHAPES = {"2d": (2, 1, 32, 32), "3d": (1, 1, 16, 16, 16)}
SAMPLE = REPO / "medidiff/sample_data/fusion"
# distillation configs need a teacher first: test_cli_segmentation.test_every_config_runs_a_fast_dev_run trains one
FUSION_CONFIGS = sorted(c for c in (REPO / "configs/fusion").glob("*.yaml") if not c.stem.endswith("_distill"))


def _two_squares(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``a``: a bright square on the left, ``b``: one on the right, both on a black background."""
    a, b = torch.zeros(shape), torch.zeros(shape)
    n = shape[2]
    a[:, :, n // 8: n // 2 - 2, n // 4: 3 * n // 4] = 1.0
    b[:, :, n // 2 + 2: 7 * n // 8, n // 4: 3 * n // 4] = 0.8
    return a, b


# ----------------------------------------------------------------------------------------- classical


def test_average_and_max_abs_on_hand_built_values():
    a = torch.tensor([-0.8, 0.2, 0.0, 1.0]).view(1, 1, 2, 2)
    b = torch.tensor([0.5, -0.3, 0.4, -1.0]).view(1, 1, 2, 2)
    assert torch.allclose(fuse_average(a, b), torch.tensor([-0.15, -0.05, 0.2, 0.0]).view(1, 1, 2, 2))
    assert torch.equal(fuse_max_abs(a, b), torch.tensor([-0.8, -0.3, 0.4, 1.0]).view(1, 1, 2, 2))  # tie -> a


@pytest.mark.parametrize("dims", SHAPES)
def test_laplacian_pyramid_is_exact_and_fusion_keeps_both_sources_contrast(dims):
    a, b = _two_squares(SHAPES[dims])
    assert torch.allclose(fuse_laplacian(a, a), a, atol=1e-5)  # fusing an image with itself changes nothing
    fused = fuse_laplacian(a, b)
    inside_a, inside_b = a > 0, b > 0
    background = (a == 0) & (b == 0)
    # averaging halves each square's contrast; max-abs band selection keeps most of it
    assert fused[inside_a].mean() - fused[background].mean() > 0.75
    assert fused[inside_b].mean() - fused[background].mean() > 0.6
    assert fuse_average(a, b)[inside_a].mean() == pytest.approx(0.5)
    assert len(laplacian_pyramid(a, 10)) < 10  # stops before an axis gets too small


def test_baselines_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        fuse_average(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


# ------------------------------------------------------------------------------------ likelihood hook


@pytest.mark.parametrize("dims", SHAPES)
def test_gradient_adjoint_is_exact(dims):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(SHAPES[dims], generator=g, dtype=torch.float64)
    y = [torch.randn(SHAPES[dims], generator=g, dtype=torch.float64) for _ in range(len(SHAPES[dims]) - 2)]
    lhs = sum((d * t).sum() for d, t in zip(grad(f), y))
    assert float(lhs) == pytest.approx(float((f * grad_adjoint(y)).sum()), rel=1e-10)


@pytest.mark.parametrize("dims", SHAPES)
@pytest.mark.parametrize("targets", [("both", "max"), ("both", "both"), ("max", "max")])
@pytest.mark.parametrize("sigma", [50.0, 1.0, 0.2])
def test_likelihood_step_reduces_the_fusion_loss(dims, targets, sigma):
    a, b = (s * 2 - 1 for s in _two_squares(SHAPES[dims]))
    hook = FusionLikelihood(a, b, intensity_target=targets[0], gradient_target=targets[1])
    x0_hat = torch.randn(a.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    sigmas = torch.full((a.shape[0],), sigma)
    fused = hook(x0_hat, sigmas, x0_hat)
    before, after = hook.loss(x0_hat, sigmas), hook.loss(fused, sigmas)
    assert (after < before).all()
    # a majorise-minimise step: the whole objective J = loss + rho/2 |f - x0_hat|^2 (per pixel mean) decreases
    rho = hook.rho(sigmas)
    penalty = rho * (fused - x0_hat).pow(2).flatten(1).mean(1) / 2
    assert (after + penalty <= before + 1e-6).all()


def test_likelihood_pulls_toward_both_sources_and_leaves_low_noise_estimates_alone():
    a, b = (s * 2 - 1 for s in _two_squares(SHAPES["2d"]))
    hook = FusionLikelihood(a, b)
    start = -torch.ones_like(a)  # a black estimate: neither square
    fused = hook(start, torch.full((2,), 80.0), start)
    assert fused[a > 0].mean() > 0 and fused[b > 0].mean() > 0  # both squares appear
    # the symmetric robust rule moves toward both too, though it keeps to the source it already agrees with
    symmetric = FusionLikelihood(a, b, intensity_target="both", gradient_target="both")(
        start, torch.full((2,), 80.0), start)
    assert symmetric[a > 0].mean() > start[a > 0].mean() + 0.1
    tiny = hook(start, torch.full((2,), 1e-3), start)
    assert (tiny - start).abs().max() < 1e-2  # rho ~ 1/sigma^2: the prior wins at the end of sampling


def test_prior_error_bounds_the_trust_in_the_network():
    a, b = (s * 2 - 1 for s in _two_squares(SHAPES["2d"]))
    hook = FusionLikelihood(a, b, prior_error=0.1)
    assert float(hook.rho(torch.tensor([1e-6]))) == pytest.approx(100.0, rel=1e-3)
    start = -torch.ones_like(a)
    late = hook(start, torch.full((2,), 1e-3), start)
    exact = FusionLikelihood(a, b)(start, torch.full((2,), 1e-3), start)
    # with the floor a missing structure is still pulled in at the end; without it the step is ~ identity
    assert late[a > 0].mean() > start[a > 0].mean() + 0.05
    assert (exact - start).abs().max() < 0.01


def test_restore_colour_round_trips_a_colour_image():
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ycbcr = rgb_to_ycbcr(rgb, channel_dim=1)
    assert torch.allclose(restore_colour(ycbcr[:, :1], ycbcr[:, 1:]), rgb, atol=1e-5)


# ---------------------------------------------------------------------------------------------- module


def _tiny_module(**kwargs) -> DiffusionModule:
    """A fusion prior; ``kwargs`` are the fusion task's (likelihood) settings."""
    net = ConditionalUNet(2, 1, 0, channels=(8, 16), norm_num_groups=8)
    return DiffusionModule(net=net, task=Fusion(**kwargs), steps=3).eval()


def test_module_needs_an_unconditional_prior():
    with pytest.raises(ValueError, match="cond_channels=0"):
        DiffusionModule(net=ConditionalUNet(2, 1, 1, channels=(8, 16), norm_num_groups=8), task=Fusion())


def test_predict_on_a_test_batch_returns_fused_luma_and_colour_from_the_chroma():
    module = _tiny_module()
    a, b = _two_squares((2, 1, 24, 20))  # a size the net must pad
    chroma = torch.full((2, 2, 24, 20), 0.5)
    chroma[:, 1] = 0.7  # reddish
    batch = {"source_a": a, "source_b": b, "source_b_chroma": chroma}
    luma = module.predict(batch, ensemble=2)
    assert luma.shape == (2, 2, 1, 24, 20) and 0 <= luma.min() and luma.max() <= 1
    rgb = restore_colour(luma.mean(0), batch["source_b_chroma"])
    assert rgb.shape == (2, 3, 24, 20) and (rgb[:, 0] >= rgb[:, 2]).all()
    again = module.predict(batch, ensemble=2)
    assert torch.equal(luma, again)  # seeded


# ------------------------------------------------------------------------------------- file fusion


def fusion_infer(a, b, out, *, module=None, method="diffusion", options=None):
    """``medidiff infer --task fusion`` through the Python API, for a module built here or a classical method."""
    if module is None:
        model = from_checkpoint("fusion", None, method=method)
    else:
        contract = classical_contract(module.spatial_dims)
        task_options = {"method": method, "contract": contract}
        module.task.prepare(module, contract, task_options, "a fusion prior built in the test")
        model = Model(module, module.task, contract, options or SamplingOptions(), task_options, None)
    return infer(model, {"source_a": a, "source_b": b}, out, report=lambda message: None)


def test_misregistered_pngs_give_an_error_naming_both_files(tmp_path):
    io.write_png(np.zeros((32, 32), np.uint8), tmp_path / "a.png")
    io.write_png(np.zeros((32, 30), np.uint8), tmp_path / "b.png")
    expected = r"b\.png: source shape \(32, 30\) differs from image shape \(32, 32\) .*a\.png"
    with pytest.raises(MedidiffError, match=expected):
        fusion_infer(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out", method="average")


def test_misregistered_volumes_give_an_error_naming_both_files(tmp_path):
    data = np.random.default_rng(0).random((12, 12, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "mr.nii.gz")
    with pytest.raises(MedidiffError, match=r"mr\.nii\.gz: source affine differs from the image's \(.*ct\.nii\.gz\)"):
        fusion_infer(tmp_path / "ct.nii.gz", tmp_path / "mr.nii.gz", tmp_path / "out", method="laplacian")


def test_folders_must_pair(tmp_path):
    for folder, names in (("a", ["1", "2"]), ("b", ["1"])):
        for name in names:
            io.write_png(np.zeros((16, 16), np.uint8), tmp_path / folder / f"{name}.png")
    with pytest.raises(MedidiffError, match="no partner named '2"):
        fusion_infer(tmp_path / "a", tmp_path / "b", tmp_path / "out", method="average")


def test_3d_fusion_writes_the_first_sources_oblique_geometry(tmp_path):
    angle = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                               [0, 0, 1]]) @ np.diag([1.0, 1.2, 3.0])
    affine[:3, 3] = [-10, 5, 20]
    rng = np.random.default_rng(0)
    for name, scale in (("ct", 1000.0), ("mr", 1.0)):
        nib.save(nib.Nifti1Image((rng.random((16, 16, 6)) * scale).astype(np.float32), affine),
                 tmp_path / f"{name}.nii.gz")
    module = _tiny_module()
    written = fusion_infer(tmp_path / "ct.nii.gz", tmp_path / "mr.nii.gz", tmp_path / "out", module=module,
                           options=SamplingOptions(steps=2, seed=3))
    out = nib.load(written[0])
    assert out.shape == (16, 16, 6) and np.allclose(out.affine, affine, atol=1e-5)
    assert np.asarray(out.dataobj).max() > 100  # back on the first source's (CT) scale
    info = json.loads(written[-1].read_text())
    assert (info["settings"]["seed"], info["settings"]["steps"], info["nfe"]) == (3, 2, 2)
    assert info["torch"] == torch.__version__


def test_fusing_the_shipped_pair_keeps_size_colour_and_provenance(tmp_path):
    pair = (SAMPLE / "mri/124.png", SAMPLE / "pet/124.png")
    options = SamplingOptions(steps=2, seed=5)
    written = fusion_infer(*pair, tmp_path / "out", module=_tiny_module(), options=options)
    fused, source = io.read(written[0]), io.read(SAMPLE / "pet/124.png")
    assert written[0].name == "124.png" and fused.shape == source.shape == (3, 208, 176)
    assert np.allclose(np.asarray(fused.affine), np.asarray(io.read(SAMPLE / "mri/124.png").affine))
    info = json.loads(written[-1].read_text())
    assert info["checks"]["source_b"]["channels"].startswith("colour") and info["settings"]["seed"] == 5
    assert "monai" in info
    # a second run with the same settings skips the finished case; one with other settings is refused
    assert fusion_infer(*pair, tmp_path / "out", module=_tiny_module(), options=options) == []
    with pytest.raises(MedidiffError, match="other settings"):
        fusion_infer(*pair, tmp_path / "out", method="average")


# ------------------------------------------------------------------------------------------- configs, CLI


@pytest.mark.parametrize("config", FUSION_CONFIGS, ids=[c.name for c in FUSION_CONFIGS])
def test_fusion_configs_run_a_fast_dev_run(config, tmp_path):
    if "harvard" in config.name and not SHARED.exists():
        pytest.skip("needs ../shared/data")
    code = main(["fit", "--config", str(config), "--trainer.fast_dev_run", "1", "--data.limit_cases", "2",
                 "--data.cache", "false", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false"])
    assert code == 0


def test_cli_trains_a_prior_and_fuses_the_sample_pair(tmp_path):
    code = main(["fit", "--config", str(REPO / "configs/fusion/sample_fusion_2d.yaml"),
                 "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.max_time", "null",
                 "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.enable_progress_bar", "false",
                 "--model.init_args.net.init_args.channels", "[8, 16]"])
    assert code == 0
    checkpoint = sorted((tmp_path / "run").rglob("*.ckpt"))[-1]
    code = main(["infer", "--task", "fusion", "--ckpt", str(checkpoint), "--input", str(SAMPLE / "mri"),
                 "--input-b", str(SAMPLE / "pet"), "--output", str(tmp_path / "fused"), "--steps", "2"])
    assert code == 0
    assert len(list((tmp_path / "fused").glob("*.png"))) == len(list((SAMPLE / "mri").glob("*.png")))
    assert main(["infer", "--task", "fusion", "--ckpt", str(checkpoint), "--input", str(SAMPLE / "mri"),
                 "--output", str(tmp_path / "x")]) == 2  # no --input-b: a one-line user error
