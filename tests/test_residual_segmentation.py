"""Diffusion of the residual over a deterministic predictor, and the UNet's test-time ensembles (flips, MC
dropout) that its uncertainty is measured against."""

from __future__ import annotations

import pytest
import torch

from medidiff.lit import ResidualDiffusion, SupervisedModule
from medidiff.lit.registry import export
from medidiff.nets import ConditionalUNet, PlainUNet
from medidiff.sliding import network_logits
from medidiff.tasks import Segmentation
from medidiff.tasks.segmentation import flip_sets, over_flips

PREDICTOR = {"class_path": "medidiff.nets.PlainUNet",
             "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                           "strides": [2], "num_res_units": 0}}


def residual_module(**overrides) -> ResidualDiffusion:
    torch.manual_seed(0)
    net = ConditionalUNet(spatial_dims=2, in_channels=1, cond_channels=2, channels=[8, 16], num_res_blocks=1,
                          norm_num_groups=4)
    settings = dict(net=net, task=Segmentation(num_classes=2), predictor=PREDICTOR,
                    diffusion={"prediction_type": "sample"}) | overrides
    return ResidualDiffusion(**settings).eval()


def test_the_predictor_estimate_plus_the_target_residual_is_the_mask():
    module = residual_module()
    label = (torch.rand(2, 1, 16, 16) > 0.7).long()
    batch = {"image": torch.randn(2, 1, 16, 16), "label": label}
    x0, cond = module.target_and_condition(batch)
    _, base = module.predictor_estimate(batch["image"])
    assert x0.abs().max() <= 1
    assert torch.allclose(base + 2 * x0, label.float() * 2 - 1, atol=1e-6)
    assert torch.equal(cond, torch.cat([batch["image"], base], 1))


@pytest.mark.parametrize("steps", [1, 5])
def test_a_residual_network_that_predicts_zero_returns_the_predictor(steps):
    """Every sampler step then denoises to a zero residual: the result is the predictor's probability."""
    module = residual_module()
    for parameter in module.net.parameters():
        parameter.data.zero_()
    image = torch.randn(1, 1, 23, 21)  # not a multiple of either network's strides: a full DRIVE image is not
    probability = module.predict({"image": image}, steps=steps, ensemble=3, seed=1)
    expected = network_logits(module.predictor, image, None).softmax(1)[:, 1:]
    assert probability.shape == (3, 1, 1, 23, 21)
    assert torch.allclose(probability, expected.expand_as(probability), atol=1e-5)


def test_a_predictor_from_a_checkpoint_keeps_its_weights_and_windows_and_the_file_is_read_once(tmp_path):
    source = PlainUNet(**PREDICTOR["init_args"])
    trained = SupervisedModule(net=source, task=Segmentation(num_classes=2), roi_size=[8, 8])
    path = export(trained, {}, tmp_path / "unet.ckpt", half=False)
    module = residual_module(predictor=None, predictor_ckpt=str(path))
    assert module.hparams.predictor_roi == [8, 8] and module.hparams.predictor_source == str(path)
    # the network the checkpoint records (PlainUNet records its dropout too)
    recorded = {"class_path": PREDICTOR["class_path"], "init_args": PREDICTOR["init_args"] | {"dropout": 0.0}}
    assert module.hparams.predictor_ckpt is None and module.hparams.predictor == recorded
    assert not module.hparams.train_predictor
    for name, value in source.state_dict().items():
        assert torch.equal(module.predictor.state_dict()[name], value), name
    content = torch.load(path, weights_only=True)
    content["medidiff"]["system"] = "DiffusionModule"
    torch.save(content, path)
    with pytest.raises(Exception, match="the predictor must be a SupervisedModule"):
        residual_module(predictor=None, predictor_ckpt=str(path))


def test_a_frozen_predictor_gets_no_gradient_and_stays_in_eval_mode():
    module = residual_module(train_predictor=False).train()
    assert not module.predictor.training and module.net.training
    names = {id(p) for p in module.trainable_parameters()}
    assert not any(id(p) in names for p in module.predictor.parameters())
    joint = residual_module()
    assert any(id(p) in {id(q) for q in joint.trainable_parameters()} for p in joint.predictor.parameters())


def test_the_condition_channels_must_hold_the_image_and_the_estimate():
    net = ConditionalUNet(spatial_dims=2, in_channels=1, cond_channels=1, channels=[8, 16], norm_num_groups=4)
    with pytest.raises(ValueError, match="cond_channels=2"):
        ResidualDiffusion(net=net, task=Segmentation(num_classes=2), predictor=PREDICTOR)


# ------------------------------------------------------------------------------------ UNet ensembles


def unet(dropout: float = 0.0) -> SupervisedModule:
    torch.manual_seed(0)
    net = PlainUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8], strides=[2], num_res_units=1,
                    dropout=dropout)
    return SupervisedModule(net, task=Segmentation(num_classes=2)).eval()


def segment(module, image: torch.Tensor, flips: int = 1, **sampling) -> torch.Tensor:
    """Class probabilities ``(N, B, C, *)`` as inference draws them: the segmentation task's prediction, which
    takes test-time flips (and draws a deterministic UNet's ensemble members from flips)."""
    return module.task.predict(module, {"image": image}, {"seed": 0} | sampling, {"flips": flips})


def test_flip_sets_cover_every_subset_of_the_spatial_axes_identity_first():
    assert flip_sets(2) == [(), (2,), (3,), (2, 3)]
    assert len(flip_sets(3)) == 8 and flip_sets(3)[0] == ()


def test_tta_members_are_the_flipped_predictions_flipped_back():
    module, image = unet(), torch.randn(1, 1, 16, 16)
    members = segment(module, image, ensemble=4)
    plain = module.net(image).softmax(1)[:, 1:]
    assert members.shape == (4, 1, 1, 16, 16)
    assert torch.allclose(members[0], plain, atol=1e-6)
    assert torch.allclose(members[3], module.net(image.flip((2, 3))).softmax(1)[:, 1:].flip((2, 3)), atol=1e-6)
    with pytest.raises(Exception, match="4 flips"):
        segment(module, image, ensemble=5)


def test_mc_dropout_members_differ_repeat_with_the_seed_and_leave_the_network_in_eval_mode():
    module, image = unet(dropout=0.3), torch.randn(1, 1, 16, 16)
    first = module.predict({"image": image}, ensemble=3, seed=4)
    again = module.predict({"image": image}, ensemble=3, seed=4)
    assert first.shape == (3, 1, 1, 16, 16)
    assert torch.equal(first, again) and not torch.allclose(first[0], first[1])
    assert not any(m.training for m in module.net.modules())
    assert torch.allclose(module.predict({"image": image})[0], module.net(image).softmax(1)[:, 1:])


def test_fit_with_a_missing_predictor_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    """An error raised while LightningCLI builds the model reached the user wrapped in jsonargparse's type errors
    (a traceback, exit 1); now it is the one line the user needs, and nothing is written."""
    import yaml

    from tests.conftest import REPO
    from tests.test_bad_inputs import user_error

    config = yaml.safe_load((REPO / "configs/segmentation/sample_mni_2d.yaml").read_text())
    config["model"]["class_path"] = "medidiff.lit.ResidualDiffusion"
    config["model"]["init_args"]["predictor_ckpt"] = str(tmp_path / "missing.ckpt")
    config["model"]["init_args"]["net"]["init_args"]["cond_channels"] = 4  # the image and 3 class probabilities
    path = tmp_path / "residual.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    user_error(capsys, ["fit", "--config", str(path), "--trainer.fast_dev_run", "1", "--trainer.default_root_dir",
                        str(run)], "missing.ckpt", "checkpoint not found")
    assert not [p for p in run.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------ test-time flips


def test_over_flips_flips_each_members_input_and_flips_its_output_back():
    """A member function that adds a fixed position ramp to its input: flipped back, member i is the image plus
    the ramp flipped along flip set i, so a wrong axis or a missing flip-back shows."""
    image = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    ramp = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 100
    members = over_flips(image, 4, lambda flipped, i: (flipped + ramp + i)[None])
    assert members.shape == (4, 2, 1, 3, 4)
    for i, axes in enumerate(flip_sets(2)):
        assert torch.equal(members[i], image + ramp.flip([a - 2 for a in axes]) + i), axes
    with pytest.raises(Exception, match="--flips 5: a 2D image has 4"):
        over_flips(image, 5, lambda flipped, i: flipped[None])


def test_diffusion_flips_draw_the_ensemble_per_flip_with_its_own_seed():
    module, image = residual_module(), torch.randn(1, 1, 16, 16)
    plain = module.predict({"image": image}, steps=2, ensemble=2, seed=3)
    flipped = segment(module, image, flips=2, steps=2, ensemble=2, seed=3)
    assert flipped.shape == (4, 1, 1, 16, 16)
    assert torch.equal(flipped[:2], plain)  # the image as is first, with the given seed
    second = module.predict({"image": image.flip(2)}, steps=2, ensemble=2, seed=4).flip(3)
    assert torch.allclose(flipped[2:], second, atol=1e-6)


def test_a_unet_takes_flips_as_its_ensemble_of_flips_and_refuses_both():
    module, image = unet(), torch.randn(1, 1, 16, 16)
    assert torch.equal(segment(module, image, flips=3), segment(module, image, ensemble=3))
    with pytest.raises(Exception, match="not both"):
        segment(module, image, ensemble=2, flips=2)
    dropout = unet(dropout=0.3)
    assert segment(dropout, image, ensemble=3, flips=2, seed=1).shape == (6, 1, 1, 16, 16)
