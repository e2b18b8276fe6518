"""A trained model ready for file-level inference: the system, its task, its contract, the sampler settings of
the run and the task's options — built by :func:`from_checkpoint` (weights only, everything checked), used by
:mod:`medidiff.inference.pipeline`.

Predictions of a case go through :func:`predict_case`, the same for every task: a 2D model over a volume runs
slice by slice (the task's ``slice_batch`` slices per call), a case larger than the training patch runs in
sliding windows where the task asks for them, and the sampler's steps are reported as progress.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, get_args

import torch
from torch import Tensor

from medidiff.arguments import MAX_STEPS
from medidiff.core import SAMPLERS
from medidiff.core.denoiser import SigmaGrid
from medidiff.errors import MedidiffError
from medidiff.fusion_classical import CLASSICAL_FUSION, ClassicalFusion
from medidiff.lit.registry import load_system
from medidiff.tasks import Case, Task, task_class
from medidiff.tasks.fusion import classical_contract

Progress = Callable[[int, int], None]


@dataclass
class SamplingOptions:
    """Sampler settings of one inference run (``None`` in :func:`from_checkpoint`: the checkpoint's validated or
    configured choice)."""

    sampler: str = "dpmpp_2m"
    steps: int = 10
    grid: str | list[float] = "exponential"  # a named spacing or the noise levels themselves
    ensemble: int = 1
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the systems' ``predict``."""
        return asdict(self)


@dataclass
class Model:
    """What file-level inference needs of a model.

    ``system``: a medidiff system (or a classical fusion method) with ``predict(inputs, **sampling)``;
    ``options``: the task's options of this run (``medidiff infer``'s task options; ``contract`` and ``allow``
    are added).
    """

    system: Any
    task: Task
    contract: dict[str, Any]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    options: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None

    @property
    def device(self) -> torch.device:
        return getattr(self.system, "device", torch.device("cpu"))

    def settings(self) -> dict[str, Any]:
        """Everything that decides a result besides the inputs (compared with a finished case before skipping)."""
        sampling = self.sampling.kwargs()
        if not getattr(self.system, "iterative", False):  # no sampler, steps or grid
            sampling = {k: v for k, v in sampling.items() if k not in ("sampler", "steps", "grid")}
        return {"task": self.task.name, "checkpoint": self.checkpoint, "system": type(self.system).__name__,
                **sampling, **self.task.settings(self.options)}


def predict_case(model: Model, tensors: dict[str, Tensor], case: Case, progress: Progress | None) -> Tensor:
    """Predictions ``(N, C, *spatial)`` of a case whose tensors ``(C, *spatial)`` are on the model's device."""
    task, system = model.task, model.system
    inputs = task.model_inputs(tensors, case, model.options)
    first = inputs[next(iter(inputs))]
    if getattr(system, "spatial_dims", None) == 2 and first.ndim == 5:
        return _over_slices(model, inputs, progress)
    sampling = model.sampling.kwargs() | _stepper(model, progress, 1)
    patch = model.contract.get("patch_size")
    if patch and first.ndim - 2 in task.window_dims and any(s > p for s, p in zip(first.shape[2:], patch)):
        sampling["window"] = tuple(patch)
    return task.predict(system, inputs, sampling, model.options)[:, 0]


def _over_slices(model: Model, inputs: dict[str, Tensor], progress: Progress | None) -> Tensor:
    """A 2D model over ``(1, C, X, Y, Z)`` inputs: chunks of 2D slices along the training slice axis, each a batch
    ``(S, C, H, W)``; predictions ``(N, S, C, H, W)`` are put back together: ``(N, C, X, Y, Z)``."""
    axis = model.contract["slice_axis"]
    slices = {key: value[0].movedim(axis + 1, 0) for key, value in inputs.items()}
    depth = next(iter(slices.values())).shape[0]
    chunk = model.task.slice_batch or depth
    sampling = model.sampling.kwargs() | _stepper(model, progress, -(-depth // chunk))
    parts = [model.task.predict(model.system, {key: value[start:start + chunk] for key, value in slices.items()},
                                sampling, model.options) for start in range(0, depth, chunk)]
    return torch.cat(parts, dim=1).movedim(1, 2 + axis)


def _stepper(model: Model, progress: Progress | None, calls: int) -> dict[str, Any]:
    """A sampler callback reporting steps over ``calls`` predictions (none for systems without steps)."""
    if progress is None or not getattr(model.system, "iterative", False):
        return {}
    total, done = calls * model.task.calls(model.options) * model.sampling.steps, [0]

    def step(info: dict) -> None:
        done[0] += 1
        progress(min(done[0], total), total)

    return {"callback": step}


# ----------------------------------------------------------------------------------------- construction


def from_checkpoint(task: str, checkpoint: str | Path | None, *, device: str = "cpu", sampler: str | None = None,
                    steps: int | None = None, grid: str | list[float] | None = None, ensemble: int = 1,
                    seed: int = 0, **options: Any) -> Model:
    """Load a checkpoint (weights only) onto ``device`` and make it ready for :func:`medidiff.inference.infer`.

    Sampler settings not given are the contract's (the step count that scored best on validation, else the
    training configuration's). ``options`` are the task's (``mask``, ``fusion``, ``flips``, ``no_consistency``,
    ``method``, ``allow`` ...). Fusion with a classical ``method`` needs no checkpoint.
    """
    cls = task_class(task)
    method = options.get("method", "diffusion")
    if checkpoint is None or method != "diffusion":
        return _classical(cls, method, seed, options)

    system, _ = load_system(checkpoint, task=task)
    system.to(torch.device(device))
    chosen = {**SamplingOptions().kwargs(), **(system.contract.get("sampling") or {})}
    steps, grid = _steps_and_grid(steps, grid, chosen)
    sampling = SamplingOptions(sampler=sampler or chosen["sampler"], steps=steps, grid=grid, ensemble=ensemble,
                               seed=seed)
    model = Model(system, system.task, system.contract, sampling, {**options, "contract": system.contract},
                  str(checkpoint))
    if getattr(system, "iterative", False):
        check_sampling(model.sampling, system, checkpoint)
    system.task.prepare(system, system.contract, model.options, checkpoint)
    return model


def _classical(cls: type[Task], method: str, seed: int, options: dict[str, Any]) -> Model:
    if method == "diffusion":
        raise MedidiffError(f"diffusion {cls.name} needs a trained prior (--ckpt); or choose a classical --method: "
                            f"{', '.join(CLASSICAL_FUSION)}")
    system = ClassicalFusion(method)
    contract = classical_contract()
    return Model(system, cls(), contract, SamplingOptions(seed=seed), {**options, "contract": contract}, None)


def check_sampling(options: SamplingOptions, system: Any, checkpoint: str | Path) -> None:
    """Sampler settings taken from a checkpoint are as untrusted as the file."""
    if options.sampler not in SAMPLERS:
        raise MedidiffError(f"names an unknown sampler {options.sampler!r}; give one with --sampler", checkpoint)
    if isinstance(options.steps, bool) or not isinstance(options.steps, int) or not 1 <= options.steps <= MAX_STEPS:
        raise MedidiffError(f"sets sampler steps to {options.steps!r} (1..{MAX_STEPS}); give a number of steps with "
                            "--steps", checkpoint)
    if isinstance(options.grid, str):
        if options.grid not in get_args(SigmaGrid):
            raise MedidiffError(f"names an unknown sigma grid {options.grid!r}; give one with --grid", checkpoint)
        return
    try:
        levels = [float(v) for v in options.grid]
        system.denoiser.get_sigmas(options.steps, levels)
    except (TypeError, ValueError) as error:
        raise MedidiffError(f"cannot sample on the grid {options.grid!r} with {options.steps} steps ({error}); "
                            "give --grid and --steps that agree", checkpoint) from None
    options.grid = levels


def _steps_and_grid(steps: int | None, grid: str | list[float] | None, chosen: dict[str, Any]) -> tuple[Any, Any]:
    """Steps and grid of a run, each the checkpoint's unless given; explicit levels given alone set the steps."""
    if grid is not None and not isinstance(grid, str) and steps is None:
        steps = len([v for v in grid if v != 0])
    return steps or chosen["steps"], grid or chosen["grid"]
