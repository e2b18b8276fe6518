"""Distillation of a trained diffusion model into a few-step student (progressive distillation, Salimans & Ho 2022).

The student is a :class:`DistillationModule`: the teacher's own network and task, started from the teacher's weights
and trained for the
sampling grid it will be used on: ``steps`` levels of its ``grid`` (e.g. 2 steps, trailing). For each batch one
student step ``sigma -> sigma_next`` of that grid is drawn; the teacher solves the same interval with
``teacher_steps_per_step`` steps of ``teacher_sampler`` from ``x = x0 + sigma * noise``, and the student's single
DDIM step must land where the teacher did. A DDIM step ``x_next = D + (x - D) * sigma_next / sigma`` lands at the
teacher's ``x_teacher`` exactly when its estimate is

    D* = (x_teacher - r x) / (1 - r),   r = sigma_next / sigma,

so the student regresses ``D*`` in x0 space. With 2 teacher steps per student step this is one round of
progressive distillation; more teacher steps per step reach a 2-step student in one round. The count may differ
per student step (``[1, 5]``): a step the teacher already does well in one evaluation (the jump from pure noise)
is then kept as the teacher does it, and the budget goes where one evaluation falls short.

Each student step starts from ``x0 + sigma * noise`` (``distill_inputs="noised"``), the state a perfect earlier
step would leave, or (``"own"``) from where the student's own earlier steps take ``x0 + sigma_max * noise``, the
state it will meet when it samples; the teacher then solves the interval from that same state.

The task's measurement hook (k-space or down-sampling consistency) acts on every teacher step and on the
student's estimate, as it will at sampling, so the student learns what is left after data consistency. The
teacher is read weights-only and is not stored: a student checkpoint is an ordinary
:class:`~medidiff.lit.diffusion.DiffusionModule` checkpoint of its task.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from medidiff.core import get_sampler
from medidiff.core.schedules import exponential_sigmas
from medidiff.errors import MedidiffError
from medidiff.lit.diffusion import DiffusionModule
from medidiff.lit.registry import load_system
from medidiff.lit.system import net_config
from medidiff.tasks import Task

DISTILLATION_SETTINGS = ("teacher_ckpt", "teacher_steps_per_step", "teacher_sampler", "teacher_hook",
                         "teacher_source", "distill_task_loss", "distill_truth_weight", "distill_inputs")


class DistillationModule(DiffusionModule):
    """A few-step student of a trained :class:`~medidiff.lit.diffusion.DiffusionModule` (the teacher).

    Args:
        net, task, **settings: the student, as :class:`~medidiff.lit.diffusion.DiffusionModule`; it is trained
            for ``steps`` steps of its ``grid`` and starts from the teacher's weights.
        teacher_ckpt: the trained checkpoint to distil (same network, task and denoiser settings).
        teacher_steps_per_step, teacher_sampler: how the teacher solves each student step (2 steps of
            ``dpmpp_2m``: one round of progressive distillation); a list gives each student step its own count.
        teacher_hook: apply the task's measurement hook (data consistency) to the teacher's steps and to the
            student's estimate while distilling, as sampling will.
        teacher_source: where the teacher came from (recorded; set from ``teacher_ckpt``).
        distill_task_loss: add the task's own loss on the student's estimate against the truth (segmentation: the
            Dice term), so the student may improve on what it imitates. Tasks without a loss of their own beside
            the diffusion one (restoration, super-resolution) add nothing.
        distill_truth_weight: add this weight times the squared error of the student's estimate (after the
            measurement hook) against the truth, for every task: from its own inputs the student then also learns
            to correct its earlier steps, not only to copy the teacher.
        distill_inputs: where each student step starts: ``noised`` (``x0 + sigma * noise``, the state a perfect
            earlier step leaves) or ``own`` (where the student's own earlier steps lead, as when it samples).
    """

    def __init__(self, net: nn.Module, task: Task, teacher_ckpt: str | None = None,
                 teacher_steps_per_step: int | list[int] = 2, teacher_sampler: str = "dpmpp_2m",
                 teacher_hook: bool = True, teacher_source: str | None = None, distill_task_loss: bool = False,
                 distill_truth_weight: float = 0.0, distill_inputs: Literal["noised", "own"] = "noised",
                 **settings: Any):
        super().__init__(net, task, **settings)
        self.save_hyperparameters(*DISTILLATION_SETTINGS)
        check_distillation_settings(teacher_steps_per_step, teacher_sampler, self.hparams.steps)
        self._teacher: list[DiffusionModule] = []  # a list: the teacher is neither a submodule nor stored
        if teacher_ckpt is not None:
            self.attach_teacher(teacher_ckpt)

    def record_name(self) -> str:
        return "DiffusionModule"  # a student checkpoint is an ordinary one of its task

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in super().settings().items() if k not in DISTILLATION_SETTINGS}

    def attach_teacher(self, path: str) -> None:
        """Distil the checkpoint at ``path``: start from its weights, keep it (frozen, unsaved) as the teacher."""
        teacher = load_teacher(path, self)
        self.net.load_state_dict(teacher.net.state_dict())
        self._teacher = [teacher]
        # the checkpoint is read once; a student checkpoint loads without it
        self.hparams.update(teacher_ckpt=None, teacher_source=str(path))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for teacher in self._teacher:  # not a submodule: Lightning does not move it with the student
            teacher.to(self.device)

    def _loss(self, batch: dict[str, Any], stage: str, generator: torch.Generator | None = None) -> Tensor:
        if not self._teacher:
            return super()._loss(batch, stage, generator)
        step = distillation_loss(self, self._teacher[0], batch, generator)
        batch_size = step.per_sample.shape[0]
        loss = step.per_sample.mean()
        self.log(f"{stage}/distill_loss_step{step.index}", loss, batch_size=batch_size)
        if self.hparams.distill_task_loss:
            loss = self.plus_task_loss(loss, step.estimate, step.x0, batch, stage)
        if self.hparams.distill_truth_weight:
            truth = (step.estimate.float() - step.x0.float()).pow(2).mean()
            self.log(f"{stage}/distill_truth_loss", truth, batch_size=batch_size)
            loss = loss + self.hparams.distill_truth_weight * truth
        self.log(f"{stage}/loss", loss, batch_size=batch_size, prog_bar=True)
        return loss


def load_teacher(path: str, student: DistillationModule) -> DiffusionModule:
    """The teacher of ``student`` from a checkpoint (weights-only), checked to be the same kind of model."""
    teacher, _ = load_system(path)
    if type(teacher) is not DiffusionModule:
        raise MedidiffError(f"is a {type(teacher).__name__} checkpoint; a student needs a DiffusionModule teacher",
                            path)
    differ = [key for key in student.task.structural if teacher.task.config.get(key) != student.task.config.get(key)]
    if teacher.task.name != student.task.name or differ:
        raise MedidiffError(f"was trained for {teacher.task!r} but the student is for {student.task!r}; give the "
                            f"student the teacher's {', '.join(differ) or 'task'}", path)
    mine, theirs = student.hparams.diffusion, teacher.hparams.diffusion
    for name in theirs:
        if mine.get(name) != theirs[name]:
            raise MedidiffError(f"was trained with {name}={theirs[name]!r} but the student has {name}="
                                f"{mine.get(name)!r}; set model.init_args.diffusion.{name}: {theirs[name]!r}", path)
    if net_config(teacher.net) != net_config(student.net):
        raise MedidiffError(f"holds the network {net_config(teacher.net)}, the student {net_config(student.net)}; "
                            "the student starts from the teacher's weights, so give it the same net", path)
    return teacher.requires_grad_(False)


def teacher_grid(sigma: float, sigma_next: float, steps: int, sigma_min: float) -> Tensor:
    """``steps`` teacher steps over one student step: uniform in log sigma, and down to ``sigma_min`` then 0
    when the student step ends at 0."""
    if sigma_next > 0:
        return exponential_sigmas(steps + 1, sigma_next, sigma)[:-1]
    if steps == 1:
        return torch.tensor([sigma, 0.0], dtype=torch.float64)
    return exponential_sigmas(steps, min(sigma_min, sigma * 0.5), sigma)


def student_target(x: Tensor, x_teacher: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """The x0 estimate whose DDIM step from ``x`` at ``sigma`` lands on ``x_teacher`` at ``sigma_next``."""
    ratio = sigma_next / sigma
    return (x_teacher - ratio * x) / (1 - ratio)


class DistillationStep(NamedTuple):
    per_sample: Tensor  # (B,) the student's x0 error against its target
    index: int  # which student step was drawn
    estimate: Tensor  # the student's x0 estimate (after the measurement hook), for a task loss against the truth
    x0: Tensor  # the truth in the diffused space


def distillation_loss(student: Any, teacher: Any, batch: dict[str, Any],
                      generator: torch.Generator | None = None) -> DistillationStep:
    """One batch: the student's x0 error against the target that makes its one step equal the teacher's
    ``teacher_steps_per_step`` steps."""
    hp = student.hparams
    x0, cond = student.target_and_condition(batch)
    kwargs = {} if cond is None else {"cond": student.layout(cond)}
    hook = student.task.diffused_hook(student.task.measurement_hook(batch), cond) if hp.teacher_hook else None
    sigmas = [float(s) for s in student.denoiser.get_sigmas(hp.steps, hp.grid)]
    index = int(torch.randint(0, len(sigmas) - 1, (1,), generator=generator, device=x0.device))
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        if hp.distill_inputs == "own":
            x = own_state(student, student.layout(x0 + sigmas[0] * noise), sigmas[:index + 1], kwargs, hook)
        else:
            x = student.layout(x0 + sigma * noise)
        grid = teacher_grid(sigma, sigma_next, teacher_steps(hp.teacher_steps_per_step, index),
                            teacher.denoiser.sigma_min)
        solve = get_sampler(hp.teacher_sampler)
        x_teacher = solve(functools.partial(teacher.denoiser, **kwargs), x, grid.to(x.device), hook=hook)
        target = student_target(x, x_teacher, sigma, sigma_next)
    sigma_batch = x.new_full((x.shape[0],), sigma)
    estimate = student.denoiser(x, sigma_batch, **kwargs)
    if hook is not None:
        estimate = hook(estimate, sigma_batch, x)
    per_sample = (estimate.float() - target.float()).pow(2).flatten(1).mean(1)
    return DistillationStep(per_sample, index, estimate, student.layout(x0))


def teacher_steps(per_step: int | Sequence[int], index: int) -> int:
    """Teacher steps for student step ``index``: one count for every step, or one count per step."""
    return int(per_step) if isinstance(per_step, int) else int(per_step[index])


def own_state(student: Any, x: Tensor, sigmas: list[float], kwargs: dict[str, Tensor], hook: Any) -> Tensor:
    """Where the student's own DDIM steps along ``sigmas`` take ``x``: the state its next step will see when it
    samples (the ``x0 + sigma * noise`` of training is the state of a perfect earlier step)."""
    if len(sigmas) == 1:
        return x
    grid = torch.tensor(sigmas, dtype=torch.float64, device=x.device)
    return get_sampler("ddim")(functools.partial(student.denoiser, **kwargs), x, grid, hook=hook)


def check_distillation_settings(teacher_steps_per_step: int | Sequence[int], teacher_sampler: str,
                                steps: int) -> None:
    counts = [teacher_steps_per_step] if isinstance(teacher_steps_per_step, int) else list(teacher_steps_per_step)
    if not isinstance(teacher_steps_per_step, int) and len(counts) != steps:
        raise ValueError(f"teacher_steps_per_step lists {len(counts)} counts for a student of {steps} steps; "
                         "give one count, or one per student step")
    if any(int(c) < 1 for c in counts):
        raise ValueError(f"teacher_steps_per_step must be at least 1, got {teacher_steps_per_step}")
    get_sampler(teacher_sampler)
