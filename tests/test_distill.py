"""Distillation into a few-step student: the target is exact, the student is its teacher's kind of model, and a
student checkpoint is an ordinary checkpoint of its task."""

from __future__ import annotations

import functools

import pytest
import torch

from medidiff.callbacks import ChooseSteps
from medidiff.checkpoint import read_checkpoint
from medidiff.core.analytic import Gaussian
from medidiff.core.samplers import sample_ddim, sample_heun
from medidiff.data.datamodule import MedicalDataModule
from medidiff.data.degrade import degrade_with_extras
from medidiff.errors import MedidiffError
from medidiff.inference.contract import build_contract
from medidiff.lit import DiffusionModule, DistillationModule
from medidiff.lit.distill import DISTILLATION_SETTINGS, distillation_loss, student_target, teacher_grid
from medidiff.lit.registry import export, load_system
from medidiff.nets import ConditionalUNet
from medidiff.tasks import Fusion, Restoration, Segmentation, SuperRes

GAUSS = Gaussian(mean=0.3, std=0.5)
SAMPLE = {"prediction_type": "sample"}  # the denoiser settings of the teachers and students below
RESTORATION_DATA = {"card": "sample_mni", "task": "restoration", "patch_size": [16, 16]}


def _net(channels=(8, 16)):
    return ConditionalUNet(2, 1, 1, channels=channels, norm_num_groups=4)


def _export(module, data, path):
    """Write ``module`` (built here, untrained) as ``medidiff export`` would, with full-precision weights and the
    contract of the data it would be trained on (``data``: data-module settings)."""
    module.contract = build_contract(MedicalDataModule(**data), module) | {"sampling": module.contract_sampling()}
    return export(module, data, path, half=False)


def _teacher_file(tmp_path, seed=0):
    torch.manual_seed(seed)
    teacher = DiffusionModule(net=_net(), task=Restoration(), diffusion=SAMPLE)
    with torch.no_grad():  # the output layer starts at zero: a teacher whose estimate depends on its input
        for parameter in teacher.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return _export(teacher, RESTORATION_DATA, tmp_path / "teacher.ckpt"), teacher


def _student(path, task=None, **settings):
    """A restoration student of the teacher at ``path``."""
    return DistillationModule(net=_net(), task=task or Restoration(), diffusion=SAMPLE, teacher_ckpt=str(path),
                              **settings)


def _kspace_batch(seed=0):
    image = torch.nn.functional.avg_pool2d(torch.rand((1, 1, 32, 32), generator=torch.Generator().manual_seed(seed)),
                                           3, 1, 1)[0]
    degraded, extras = degrade_with_extras(image, {"kspace": {"acceleration": 4, "dims": 2}}, seed=1)
    return {"image": image[None], "condition": degraded[None], "kspace_mask": extras["kspace_mask"][None]}


def test_one_ddim_step_with_the_student_target_lands_on_the_teacher():
    x, x_teacher = torch.randn(2, 1, 6, 6, dtype=torch.float64), torch.randn(2, 1, 6, 6, dtype=torch.float64)
    for sigma, sigma_next in [(80.0, 1.3), (1.3, 0.0), (2.0, 1.9)]:
        target = student_target(x, x_teacher, sigma, sigma_next)
        grid = torch.tensor([sigma, sigma_next], dtype=torch.float64)
        landed = sample_ddim(lambda _x, _s, target=target: target, x, grid)
        assert torch.allclose(landed, x_teacher, atol=1e-9)


@pytest.mark.parametrize("interval", [(40.0, 1.5), (1.5, 0.0)])
def test_target_from_an_exact_teacher_is_the_exact_flow_in_one_step(interval):
    """With the Gaussian's exact denoiser as teacher (Heun, 1024 steps over the interval), one student DDIM step
    from the distilled target reproduces the exact probability-flow map of that interval."""
    sigma, sigma_next = interval
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
    grid = teacher_grid(sigma, sigma_next, 1024, sigma_min=1e-4)
    assert len(grid) == 1025 and float(grid[0]) == sigma and float(grid[-1]) == sigma_next
    x_teacher = sample_heun(GAUSS.denoiser, x, grid)
    target = student_target(x, x_teacher, sigma, sigma_next)
    one_step = sample_ddim(lambda _x, _s: target, x, torch.tensor([sigma, sigma_next], dtype=torch.float64))
    exact = GAUSS.flow(x, sigma, max(sigma_next, 1e-4))
    assert (one_step - exact).abs().max() < 1e-4


def test_teacher_grid_counts_its_steps_and_ends_where_the_student_step_ends():
    assert teacher_grid(10.0, 2.0, 3, 0.01).tolist() == pytest.approx([10.0, 10.0 * 0.2 ** (1 / 3),
                                                                       10.0 * 0.2 ** (2 / 3), 2.0])
    to_zero = teacher_grid(10.0, 0.0, 4, 0.01)
    assert len(to_zero) == 5 and float(to_zero[-1]) == 0 and float(to_zero[-2]) == pytest.approx(0.01)
    assert teacher_grid(10.0, 0.0, 1, 0.01).tolist() == [10.0, 0.0]


def test_student_starts_from_the_teacher_and_its_checkpoint_needs_no_teacher(tmp_path):
    path, teacher = _teacher_file(tmp_path)
    student = _student(path, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(student.net.state_dict().values(), teacher.net.state_dict().values()))
    assert student.hparams.teacher_ckpt is None and student.hparams.teacher_source == str(path)
    assert not any(name.startswith("_teacher") for name in student.state_dict())
    saved = _export(student, RESTORATION_DATA, tmp_path / "student.ckpt")
    path.unlink()
    # an ordinary diffusion checkpoint of its task: no teacher, none of the distillation settings
    record = read_checkpoint(saved)["medidiff"]
    assert record["system"] == "DiffusionModule" and not set(DISTILLATION_SETTINGS) & set(record["settings"])
    loaded, _ = load_system(saved)
    assert type(loaded) is DiffusionModule and not hasattr(loaded, "_teacher") and loaded.hparams.steps == 2


def test_a_student_that_copies_a_one_step_teacher_has_zero_loss_and_more_steps_teach_it_something(tmp_path):
    """Teacher = student, one DDIM teacher step per student step: the target is the student's own (hooked)
    estimate, so the loss is 0 up to rounding; two teacher steps give a target it does not yet meet."""
    path, _ = _teacher_file(tmp_path)
    batch = _kspace_batch()
    losses = {}
    for teacher_steps in (1, 2):
        student = _student(path, steps=2, teacher_steps_per_step=teacher_steps, teacher_sampler="ddim")
        for seed in range(3):  # both student steps get drawn
            step = distillation_loss(student, student._teacher[0], batch, torch.Generator().manual_seed(seed))
            losses.setdefault(teacher_steps, []).append(float(step.per_sample.detach().mean()))
    assert max(losses[1]) < 1e-10
    assert min(losses[2]) > 1e-6


def test_distillation_gradient_reaches_the_student_only(tmp_path):
    path, _ = _teacher_file(tmp_path)
    student = _student(path, steps=2)
    step = distillation_loss(student, student._teacher[0], _kspace_batch(), torch.Generator().manual_seed(0))
    step.per_sample.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net.parameters())
    assert all(p.grad is None for p in student._teacher[0].parameters())


def test_the_student_step_keeps_data_consistency(tmp_path):
    """The hook acts on the student's estimate in the loss: measured k-space never contributes to it."""
    path, _ = _teacher_file(tmp_path)
    batch = _kspace_batch()
    student = _student(path, steps=2)
    hook = student.task.measurement_hook(batch)
    calls = []
    student.task.measurement_hook = lambda b: functools.partial(_count, hook, calls)
    distillation_loss(student, student._teacher[0], batch, torch.Generator().manual_seed(0))
    assert len(calls) == student.hparams.teacher_steps_per_step + 1  # every teacher step and the student's


def _count(hook, calls, x0_hat, sigma, x):
    calls.append(float(sigma[0]))
    return hook(x0_hat, sigma, x)


@pytest.mark.parametrize("student_options,message", [
    ({"task": SuperRes}, r"was trained for Restoration\(.*\) but the student is for SuperRes\("),
    ({"diffusion": {"prediction_type": "epsilon"}}, "prediction_type='sample'"),
    ({"task": lambda: Restoration(residual_scale=4.0)}, "residual_scale=0.0"),
    ({"channels": (8, 8, 16)}, "same net"),
])
def test_a_teacher_of_another_kind_is_refused_naming_the_file(tmp_path, student_options, message):
    path, _ = _teacher_file(tmp_path)
    task = student_options.pop("task", Restoration)()
    channels = student_options.pop("channels", (8, 16))
    options = {"diffusion": SAMPLE} | student_options
    with pytest.raises(MedidiffError, match=message) as caught:
        DistillationModule(net=_net(channels), task=task, teacher_ckpt=str(path), **options)
    assert str(path) in str(caught.value)


def test_the_task_loss_is_added_to_the_distillation_loss_only_when_asked(tmp_path):
    """``distill_task_loss``: the segmentation student's loss is its distillation error plus exactly its Dice term
    on the same estimate against the truth; without the flag, the distillation error alone."""
    torch.manual_seed(0)
    teacher = DiffusionModule(net=ConditionalUNet(2, 1, 1, channels=(8, 16), norm_num_groups=4),
                              task=Segmentation(num_classes=2, dice_weight=0.7), diffusion=SAMPLE)
    path = _export(teacher, {"card": "sample_mni", "task": "segmentation", "patch_size": [16, 16]},
                   tmp_path / "teacher.ckpt")
    label = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    batch = {"image": torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)), "label": label}
    losses = {}
    for flag in (False, True):
        student = DistillationModule(net=ConditionalUNet(2, 1, 1, channels=(8, 16), norm_num_groups=4),
                                     task=Segmentation(num_classes=2, dice_weight=0.7), diffusion=SAMPLE,
                                     teacher_ckpt=str(path), steps=1, distill_task_loss=flag)
        student.log = lambda *args, **kwargs: None
        step = distillation_loss(student, student._teacher[0], batch, torch.Generator().manual_seed(0))
        dice = student.extra_loss(step.estimate, step.x0, batch)
        losses[flag] = float(student._loss(batch, "train", torch.Generator().manual_seed(0)))
    assert losses[False] == pytest.approx(float(step.per_sample.mean()), rel=1e-6)
    assert losses[True] == pytest.approx(float(step.per_sample.mean() + dice), rel=1e-6)
    assert float(dice) > 0.01


def test_a_student_on_an_explicit_grid_distils_and_samples_on_those_levels(tmp_path):
    """``grid: [sigma_max, 0.3]``: the student's steps are drawn from those levels, its checkpoint samples on them
    by default, explicit levels given alone set the step count, and a step count they do not have is refused
    naming the file."""
    from medidiff.inference import from_checkpoint

    path, teacher = _teacher_file(tmp_path)
    levels = [teacher.denoiser.sigma_max, 0.3]
    student = _student(path, steps=2, grid=levels)
    drawn = []
    student._teacher[0].denoiser.forward = _recording(student._teacher[0].denoiser.forward, drawn)
    for seed in range(4):
        distillation_loss(student, student._teacher[0], _kspace_batch(), torch.Generator().manual_seed(seed))
    assert {round(s, 4) for s in drawn} >= {round(levels[0], 4), 0.3}
    saved = _export(student, RESTORATION_DATA, tmp_path / "student.ckpt")
    assert from_checkpoint("restoration", saved).sampling.grid == levels
    other = from_checkpoint("restoration", saved, grid=[levels[0], 1.0, 0.1])
    assert other.sampling.steps == 3
    with pytest.raises(MedidiffError, match="give --grid and --steps that agree") as caught:
        from_checkpoint("restoration", saved, steps=1)
    assert str(saved) in str(caught.value)


def _recording(forward, drawn):
    def record(x, sigma, **kwargs):
        drawn.append(float(sigma.flatten()[0]))
        return forward(x, sigma, **kwargs)
    return record


@pytest.mark.parametrize("options, choose, message", [
    ({"grid": [1.0, 0.3], "steps": 3}, None, "2 steps, not 3"),
    ({"grid": [1.0, 0.3], "steps": 2}, [1, 2], "2 steps, not 1"),
    ({"grid": [1e6, 0.3], "steps": 2}, None, "outside the trained range"),
])
def test_an_explicit_grid_that_cannot_be_sampled_is_refused_at_construction(options, choose, message):
    """The system refuses a step count its grid does not have when it is built; the step counts validation
    compares (the ChooseSteps callback) are refused when the callback is set up, before any training."""
    if choose is None:
        with pytest.raises(ValueError, match=message):
            DiffusionModule(net=_net(), task=Restoration(), **options)
    else:
        module = DiffusionModule(net=_net(), task=Restoration(), **options)
        with pytest.raises(ValueError, match=message):
            ChooseSteps(steps=choose).setup(None, module, "fit")


def test_teacher_steps_may_differ_per_student_step(tmp_path):
    """``teacher_steps_per_step=[1, 2]`` with teacher = student and DDIM: the first student step's target is its
    own estimate (zero loss), the second one's is two teacher steps (a target it does not yet meet); a list of the
    wrong length is refused."""
    path, _ = _teacher_file(tmp_path)
    student = _student(path, steps=2, grid="trailing", teacher_steps_per_step=[1, 2], teacher_sampler="ddim")
    losses = {}
    for seed in range(6):
        step = distillation_loss(student, student._teacher[0], _kspace_batch(), torch.Generator().manual_seed(seed))
        losses.setdefault(step.index, []).append(float(step.per_sample.detach().mean()))
    assert set(losses) == {0, 1}
    assert max(losses[0]) < 1e-10 and min(losses[1]) > 1e-6
    with pytest.raises(ValueError, match="lists 3 counts for a student of 2 steps"):
        DistillationModule(net=_net(), task=Restoration(), steps=2, teacher_steps_per_step=[1, 2, 3])


def test_own_inputs_start_each_student_step_where_its_earlier_steps_lead(tmp_path):
    """``distill_inputs="own"``: the state the teacher solves the second student step from is exactly the
    student's own (hooked) DDIM step from ``x0 + sigma_max * noise``; the first step starts from that noise."""
    path, _ = _teacher_file(tmp_path)
    batch = _kspace_batch()
    student = _student(path, steps=2, grid="trailing", distill_inputs="own")
    teacher = student._teacher[0]
    seen = []
    original = teacher.denoiser.forward
    teacher.denoiser.forward = lambda x, sigma, **kw: seen.append(x.clone()) or original(x, sigma, **kw)
    sigmas = [float(s) for s in student.denoiser.get_sigmas(2, "trailing")]
    x0, cond = student.target_and_condition(batch)
    hook = student.task.diffused_hook(student.task.measurement_hook(batch), cond)
    for seed in range(6):
        seen.clear()
        step = distillation_loss(student, teacher, batch, torch.Generator().manual_seed(seed))
        generator = torch.Generator().manual_seed(seed)
        torch.randint(0, 2, (1,), generator=generator)
        start = x0 + sigmas[0] * torch.randn(x0.shape, generator=generator)
        expected = start if step.index == 0 else sample_ddim(
            functools.partial(student.denoiser, cond=cond), start, torch.tensor(sigmas[:2], dtype=torch.float64),
            hook=hook)
        assert torch.allclose(seen[0], expected, atol=1e-6)


def test_a_fusion_prior_distils_and_its_student_keeps_the_likelihood_on_each_of_its_steps(tmp_path):
    """Fusion distils its unconditional prior (training batches are single images, no sources); the fusion
    likelihood is the student's per-step hook when it fuses, as for the teacher."""
    torch.manual_seed(0)
    teacher = DiffusionModule(net=ConditionalUNet(2, 1, 0, channels=(8, 16), norm_num_groups=4), task=Fusion())
    path = _export(teacher, {"card": "sample_fusion", "task": "fusion", "patch_size": [16, 16]},
                   tmp_path / "teacher.ckpt")
    student = DistillationModule(net=ConditionalUNet(2, 1, 0, channels=(8, 16), norm_num_groups=4), task=Fusion(),
                                 teacher_ckpt=str(path), steps=2, teacher_steps_per_step=3)
    image = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    step = distillation_loss(student, student._teacher[0], {"image": image}, torch.Generator().manual_seed(0))
    step.per_sample.mean().backward()
    assert torch.isfinite(step.per_sample).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net.parameters())
    a, b = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    a[..., 2:8, 2:8], b[..., 8:14, 8:14] = 1.0, 0.6
    hook = student.task.likelihood(a, b)
    calls = []
    student.task.likelihood = lambda *_: functools.partial(_count, hook, calls)
    fused = student.eval().predict({"source_a": a, "source_b": b})
    assert fused.shape == (1, 1, 1, 16, 16) and len(calls) == 2


def test_the_truth_term_adds_exactly_its_weight_times_the_estimates_squared_error(tmp_path):
    """``distill_truth_weight``: the loss is the distillation error plus w * mean((estimate - x0)^2) of the same
    k-space-consistent estimate."""
    path, _ = _teacher_file(tmp_path)
    batch = _kspace_batch()
    losses = {}
    for weight in (0.0, 0.5):
        student = _student(path, steps=2, distill_truth_weight=weight)
        student.log = lambda *args, **kwargs: None
        step = distillation_loss(student, student._teacher[0], batch, torch.Generator().manual_seed(0))
        losses[weight] = float(student._loss(batch, "train", torch.Generator().manual_seed(0)))
    truth = (step.estimate - step.x0).pow(2).mean()
    assert losses[0.0] == pytest.approx(float(step.per_sample.mean()), rel=1e-6)
    assert losses[0.5] == pytest.approx(float(step.per_sample.mean() + 0.5 * truth), rel=1e-6)
    assert float(truth) > 1e-4
