"""What each task does between a preprocessed case and its outputs: the task adapters of file-level inference.

Every adapter has the interface of :class:`TaskAdapter`: the input roles it reads, whether a case is brought
onto the training grid (and its outputs mapped back), the extra tensors a case needs (a k-space mask), the
settings that decide its result, and :meth:`TaskAdapter.predict`, which turns tensors already on the model's
device into named :class:`Output` s. Reading, checking, writing and the loop over cases live in
:mod:`medidiff.inference.pipeline`, once for all tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from medidiff import io
from medidiff.errors import MedidiffError
from medidiff.metrics.segmentation import (
    ensemble_variance,
    fuse_majority_vote,
    fuse_mean_threshold,
    fuse_staple,
    predictive_entropy,
)

Progress = Callable[[int, int], None]


@dataclass
class SamplingOptions:
    """Sampler settings of one inference run (``None``: the checkpoint's validated or configured choice)."""

    sampler: str = "dpmpp_2m"
    steps: int = 10
    grid: str | list[float] = "exponential"  # a named spacing or the noise levels themselves
    ensemble: int = 1
    seed: int = 0
    fusion: str = "mean"  # segmentation ensembles: mean | vote | staple
    flips: int = 1  # segmentation: the ensemble is drawn for each of this many flips of the image
    slice_batch: int | None = None  # 2D models over volumes: slices per sampler call (None: the task's default)

    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of the modules' sampling methods."""
        flips = {"flips": self.flips} if self.flips != 1 else {}  # segmentation modules alone take flips
        return dict(sampler=self.sampler, steps=self.steps, grid=self.grid, ensemble=self.ensemble, seed=self.seed,
                    **flips)


@dataclass
class Output:
    """One output of a case: ``(C, *spatial)`` on the preprocessed grid.

    ``kind``: ``label`` (integer classes), ``map`` (probabilities, uncertainty), ``image`` (intensities in
    [0, 1], written in the input's units) or ``unit`` (written as [0, 1], e.g. an RGB fusion).
    ``spacing``: a new voxel size when the output grid is finer than the input's (super-resolution).
    """

    array: Tensor
    kind: Literal["label", "map", "image", "unit"]
    spacing: tuple[float, ...] | None = None


@dataclass
class Case:
    """One case: its name, its source files by role, and (once read) the images as read (``raw``, the geometry
    outputs are written on) and preprocessed (``images``)."""

    name: str
    sources: dict[str, Path]
    raw: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


class TaskAdapter(Protocol):
    task: str
    roles: tuple[str, ...]
    keeps_units: bool  # writes an image in the input's units
    resample: bool  # preprocess onto the training orientation and spacing, and invert afterwards
    png_main: bool  # 2D image files in -> the main output as PNG (fusion), else NIfTI
    contract: dict[str, Any]

    def settings(self) -> dict[str, Any]: ...
    def extras(self, case: Case) -> dict[str, Tensor]: ...
    def predict(self, tensors: dict[str, Tensor], case: Case, progress: Progress | None) -> dict[str, Output]: ...


class ModelTask:
    """Shared by the adapters of trained modules: sampling options, slices, settings."""

    roles: tuple[str, ...] = ("image",)
    resample = False
    png_main = False
    keeps_units = False  # writes an image in the input's units, so clipping the input changes the output
    # slices per sampler call; each call draws its noise from the seed, so results depend on it (kept per task
    # as the published figures were made: restoration sampled all slices of a volume in one batch)
    slice_batch: int | None = 8

    def __init__(self, module: Any, contract: dict[str, Any], options: SamplingOptions, checkpoint: str | None):
        self.module, self.contract, self.options, self.checkpoint = module, contract, options, checkpoint
        self.task = contract["task"]

    def settings(self) -> dict[str, Any]:
        options = asdict(self.options)
        if not hasattr(self.module, "denoiser"):  # a deterministic network: no sampler, steps or grid
            options = {k: v for k, v in options.items() if k not in ("sampler", "steps", "grid")}
        return {"task": self.task, "checkpoint": self.checkpoint, "module": type(self.module).__name__, **options}

    def extras(self, case: Case) -> dict[str, Tensor]:
        return {}

    def per_slice(self, image: Tensor) -> bool:
        """A 2D network over a 3D volume runs slice by slice along the training slice axis."""
        return self.module.net.spatial_dims == 2 and image.ndim == 4

    def sampling(self, progress: Progress | None, calls: int = 1) -> dict[str, Any]:
        """Sampling keyword arguments, with a per-step progress report over ``calls`` sampler calls."""
        kwargs = self.options.sampling()
        if progress is not None and hasattr(self.module, "denoiser"):
            total, done = calls * self.options.steps, [0]

            def step(info: dict) -> None:
                done[0] += 1
                progress(min(done[0], total), total)

            kwargs["callback"] = step
        return kwargs

    def slice_calls(self, volume: Tensor) -> int:
        """Sampler calls :meth:`over_slices` makes for ``volume``."""
        depth = volume.shape[self.contract["slice_axis"] + 1]
        return -(-depth // self.chunk(depth))

    def chunk(self, depth: int) -> int:
        return self.options.slice_batch or self.slice_batch or depth

    def over_slices(self, fn: Callable[..., Tensor], *volumes: Tensor) -> Tensor:
        """``fn`` over chunks of 2D slices ``(S, C, H, W)`` of ``(C, X, Y, Z)`` volumes; its outputs
        ``(S, ..., C', H, W)`` are put back together along the slice axis: ``(..., C', X, Y, Z)``."""
        axis = self.contract["slice_axis"]
        slices = [v.movedim(axis + 1, 0) for v in volumes]
        chunk = self.chunk(slices[0].shape[0])
        parts = [fn(*(s[start:start + chunk] for s in slices)) for start in range(0, slices[0].shape[0], chunk)]
        out = torch.cat(parts)
        return out.movedim(0, out.ndim - 3 + axis)


# ------------------------------------------------------------------------------------------ segmentation


class SegmentationTask(ModelTask):
    """Label map, ensemble-mean probability, entropy and variance; cases on the training grid."""

    resample = True

    def predict(self, tensors: dict[str, Tensor], case: Case, progress: Progress | None) -> dict[str, Output]:
        image = tensors["image"].float()
        if self.per_slice(image):
            kwargs = self.sampling(progress, self.slice_calls(image) * self.options.flips)
            # (S, C, H, W) -> (N, S, C, H, W) -> (S, N, C, H, W); back together: (N, C, X, Y, Z)
            probs = self.over_slices(lambda s: self.module.predict_probabilities(s, **kwargs).movedim(0, 1), image)
        else:
            probs = self.module.predict_probabilities(image[None], denoiser=self._windows(image),
                                                      **self.sampling(progress, self.options.flips))[:, 0]
        return segmentation_outputs(self.module, probs, self.options.fusion)

    def _windows(self, image: Tensor):
        from medidiff.sliding import SlidingWindowDenoiser

        patch = self.contract.get("patch_size")
        if image.ndim == 4 and patch and hasattr(self.module, "denoiser") and \
                any(s > p for s, p in zip(image.shape[1:], patch)):
            return SlidingWindowDenoiser(self.module.denoiser, patch)
        return None  # deterministic baselines window themselves (their roi_size)


def segmentation_outputs(module: Any, probs: Tensor, fusion: str) -> dict[str, Output]:
    """Label map (the model's class ids), ensemble-mean probability and uncertainty maps from ``(N, C, *)``."""
    p = probs.float().cpu().numpy()
    classes, binary = module.hparams.num_classes, module.hparams.num_classes == 2
    members = module.label_map(probs).cpu().numpy()[:, 0]  # (N, *spatial)
    if fusion == "mean":
        labels = fuse_mean_threshold(p, module.hparams.threshold) if binary else p.mean(0).argmax(0)
    elif fusion == "vote":
        labels = fuse_majority_vote(members, classes)
    elif fusion == "staple":
        labels = fuse_staple(members, classes)
    else:
        raise MedidiffError(f"unknown ensemble fusion '{fusion}'; choose mean, vote or staple")
    class_probs = np.concatenate([1 - p, p], axis=1) if binary else p
    maps = {"seg": np.asarray(labels)[None].astype(np.int16), "prob": p.mean(0),
            "entropy": predictive_entropy(class_probs)[None],
            "variance": ensemble_variance(class_probs).sum(0, keepdims=True)}
    if len(members) > 1:  # every member's label map (N channels): the sample set, for GED against raters
        maps["members"] = members.astype(np.int16)
    return {name: Output(torch.from_numpy(np.ascontiguousarray(array)), "label" if name in ("seg", "members")
                         else "map") for name, array in maps.items()}


# ------------------------------------------------------------------------- restoration, super-resolution


class RestorationTask(ModelTask):
    """The restored image on the input's own grid; with ``--mask``, k-space consistency at every step."""

    keeps_units = True

    slice_batch = None  # all slices at once

    def __init__(self, module, contract, options, checkpoint, mask: Path | None = None):
        super().__init__(module, contract, options, checkpoint)
        self.mask_path = mask
        self.mask = None if mask is None else read_kspace_mask(mask)

    def settings(self) -> dict[str, Any]:
        # what is applied: k-space consistency needs the mask
        applied = self.mask is not None and bool(self.module.hparams.get("consistency", True))
        return super().settings() | {"mask": None if self.mask_path is None else str(self.mask_path),
                                     "consistency": applied}

    def extras(self, case: Case) -> dict[str, Tensor]:
        """The mask on the scan's grid ``(1, *spatial)``: an in-plane ``(H, W)`` mask serves every slice."""
        if self.mask is None:
            return {}
        shape, mask = tuple(case.images["image"].shape[1:]), self.mask
        if mask.ndim == len(shape) - 1 and tuple(mask.shape) == shape[:-1]:
            mask = mask[..., None].expand(*mask.shape, shape[-1])
        if tuple(mask.shape) != shape:
            raise MedidiffError(f"k-space mask of shape {tuple(self.mask.shape)} does not fit the scan {shape} "
                                f"({case.sources['image']})", self.mask_path)
        return {"kspace_mask": mask[None].float()}

    def predict(self, tensors: dict[str, Tensor], case: Case, progress: Progress | None) -> dict[str, Output]:
        image, mask = tensors["image"].float(), tensors.get("kspace_mask")
        if self.per_slice(image):
            kwargs = self.sampling(progress, self.slice_calls(image))
            if mask is None:
                restored = self.over_slices(lambda s: self._restore(s, None, kwargs), image)
            else:
                restored = self.over_slices(lambda s, m: self._restore(s, m, kwargs), image, mask)
        else:
            restored = self._restore(image[None], None if mask is None else mask[None], self.sampling(progress))[0]
        return {"image": Output(restored, "image")}

    def _restore(self, images: Tensor, mask: Tensor | None, kwargs: dict) -> Tensor:
        # the module builds its own consistency step from a batch shaped like its training batches
        batch = {"condition": images} | ({} if mask is None else {"kspace_mask": mask})
        return self.module.estimate(self.module.condition(batch), hook=self.module.measurement_hook(batch),
                                    **kwargs)


def read_kspace_mask(path: Path) -> Tensor:
    """A 0/1 sampling mask over the last two axes (or per slice); stored 0/255 (PNG) is read as 0/1."""
    mask = io.read(path)[0].float()
    values = torch.unique(mask)
    if not bool((mask > 0).any()):
        raise MedidiffError("the k-space mask samples nothing (all zeros); expected 1 where k-space was measured",
                            path)
    if values.numel() > 2 or float(values.min()) != 0 and values.numel() == 2:
        raise MedidiffError(f"a k-space mask holds two values, 0 and one other (found {values[:5].tolist()}); "
                            "soft weights are not supported", path)
    return (mask > 0).float()


class SuperResTask(ModelTask):
    """The high-resolution image: the input's field of view at the voxel size divided by the model's factors;
    the condition is built from the low-resolution input exactly as the trained degradation built it."""

    keeps_units = True

    def settings(self) -> dict[str, Any]:
        applied = bool(self.module.hparams.get("consistency", True)) and self._exact()
        return super().settings() | {"consistency": applied}

    def _exact(self) -> bool:
        """The consistency step holds the box-average forward model, the one "model: average" trains with."""
        return (self.contract.get("degradation") or {}).get("downsample", {}).get("model", "average") == "average"

    def predict(self, tensors: dict[str, Tensor], case: Case, progress: Progress | None) -> dict[str, Output]:
        from medidiff.data.degrade import interpolate_back

        low, factors = tensors["image"].float(), [int(f) for f in self.module.hparams.factors]
        if len(factors) != low.ndim - 1:
            raise MedidiffError(f"the model up-samples {len(factors)}D images but this input is {low.ndim - 1}D",
                                case.sources["image"])
        options = (self.contract.get("degradation") or {}).get("downsample", {})
        cond = interpolate_back(low, factors, options.get("interpolation", "linear"))[None] * 2 - 1
        hook = self.module.measurement_hook({"low_res": low[None]}) if self._exact() else None
        high = self.module.estimate(cond, hook=hook, patch_size=self.contract.get("patch_size"),
                                    **self.sampling(progress))[0]
        spacing = tuple(float(s) / f for s, f in zip(case.record["spacing"], factors))
        return {"image": Output(high, "image", spacing=spacing)}


# ------------------------------------------------------------------------------------------------ fusion


class FusionTask(ModelTask):
    """Fused luma of two registered sources (diffusion prior + likelihood, or a classical ``method``); the
    colour source's chroma comes back (colour-mapped PET / SPECT), the result is on source A's grid."""

    roles = ("source_a", "source_b")
    png_main = True

    def __init__(self, module, contract, options, checkpoint, method: str = "diffusion"):
        super().__init__(module, contract, options, checkpoint)
        from medidiff.fusion_classical import CLASSICAL_FUSION

        if method != "diffusion" and method not in CLASSICAL_FUSION:
            raise MedidiffError(f"unknown fusion method '{method}'; choose diffusion or one of "
                                f"{', '.join(CLASSICAL_FUSION)}")
        if method == "diffusion" and module is None:
            raise MedidiffError("diffusion fusion needs a trained prior (--ckpt); or choose a classical "
                                f"--method: {', '.join(CLASSICAL_FUSION)}")
        self.method, self.fuser = method, CLASSICAL_FUSION.get(method)

    def settings(self) -> dict[str, Any]:
        if self.method != "diffusion":
            return {"task": "fusion", "method": self.method}
        return super().settings() | {"method": "diffusion"}

    def per_slice(self, image: Tensor) -> bool:
        return self.module is not None and super().per_slice(image)

    def predict(self, tensors: dict[str, Tensor], case: Case, progress: Progress | None) -> dict[str, Output]:
        from medidiff.lit.fusion import restore_colour

        a, b = tensors["source_a"].float(), tensors["source_b"].float()
        if self.method != "diffusion":
            fused = self.fuser(a[None], b[None]).clamp(0, 1)[0]
        elif self.per_slice(a):
            kwargs = self.sampling(progress, self.slice_calls(a))
            fused = self.over_slices(lambda x, y: self.module.fuse(x, y, **kwargs).mean(0), a, b)
        else:
            fused = self.module.fuse(a[None], b[None], **self.sampling(progress)).mean(0)[0]
        chroma = tensors.get("source_b_chroma", tensors.get("source_a_chroma"))
        if chroma is None:
            return {"fused": Output(fused.clamp(0, 1), "image")}
        return {"fused": Output(restore_colour(fused.clamp(0, 1), chroma, channel_dim=0), "unit")}


def adapter_for(task: str, module: Any, contract: dict[str, Any], options: SamplingOptions,
                checkpoint: str | None, **task_options: Any) -> TaskAdapter:
    """The adapter of ``task`` for a loaded module (``module=None``: classical fusion)."""
    adapters = {"segmentation": SegmentationTask, "restoration": RestorationTask, "superres": SuperResTask,
                "fusion": FusionTask}
    return adapters[task](module, contract, options, checkpoint, **task_options)


# ----------------------------------------------------------------------------------------- construction


def fusion_contract(module: Any = None) -> dict[str, Any]:
    """What classical fusion (and a prior built in Python, without a checkpoint) takes: grey or colour images,
    8-bit image files on their 0..255 scale, other files between their 0.5 and 99.5 percentiles."""
    entry = {"channels": ["grey"], "use": ["grey"], "modality": None, "normalise": {"method": "auto"},
             "profile": None}
    dims = getattr(getattr(module, "net", None), "spatial_dims", 2)
    return {"version": 1, "task": "fusion", "spatial_dims": dims, "data_dims": 3, "slice_axis": 2,
            "patch_size": None, "inputs": {"source_a": entry, "source_b": dict(entry)}, "labels": {},
            "spacing": None, "orientation": "RAS", "degradation": None, "factors": None, "sampling": None,
            "card": {"name": "none (classical fusion)", "description": "", "modality": ""}}


def _check_sampling(options: SamplingOptions, module: Any, checkpoint: str | Path) -> None:
    """Sampler settings taken from a checkpoint are as untrusted as the file."""
    from typing import get_args

    from medidiff.arguments import MAX_STEPS
    from medidiff.core import SAMPLERS
    from medidiff.core.denoiser import SigmaGrid

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
        module.denoiser.get_sigmas(options.steps, levels)
    except (TypeError, ValueError) as error:
        raise MedidiffError(f"cannot sample on the grid {options.grid!r} with {options.steps} steps ({error}); "
                            "give --grid and --steps that agree", checkpoint) from None
    options.grid = levels


def _steps_and_grid(steps: int | None, grid: str | list[float] | None, chosen: dict[str, Any]) -> tuple[Any, Any]:
    """Steps and grid of a run, each the checkpoint's unless given; explicit levels given alone set the steps."""
    if grid is not None and not isinstance(grid, str) and steps is None:
        steps = len([v for v in grid if v != 0])
    return steps or chosen["steps"], grid or chosen["grid"]


def from_checkpoint(task: str, checkpoint: str | Path | None, *, device: str = "cpu", sampler: str | None = None,
                    steps: int | None = None, grid: str | list[float] | None = None, ensemble: int = 1,
                    seed: int = 0, fusion: str = "mean", flips: int = 1, consistency: bool = True,
                    **task_options: Any) -> TaskAdapter:
    """Load a checkpoint (weights only) onto ``device`` and build its task adapter; sampler settings not given
    are the contract's (the step count that scored best on validation, else the training config's)."""
    from medidiff.checkpoint import load_module

    if checkpoint is None:  # classical fusion
        return adapter_for(task, None, fusion_contract(), SamplingOptions(seed=seed), None, **task_options)
    module, _ = load_module(checkpoint, task=task)
    if module.contract is None:
        raise MedidiffError("holds no model-input contract and names no data card to rebuild one from; export it "
                            "again from a checkpoint written by medidiff fit", checkpoint)
    module.to(torch.device(device))
    if not consistency:
        module.hparams.consistency = False
    chosen = {**SamplingOptions().sampling(), **(module.contract.get("sampling") or {})}
    steps, grid = _steps_and_grid(steps, grid, chosen)
    options = SamplingOptions(sampler=sampler or chosen["sampler"], steps=steps, grid=grid, ensemble=ensemble,
                              seed=seed, fusion=fusion, flips=flips)
    if flips != 1 and task != "segmentation":
        raise MedidiffError(f"test-time flips (--flips) apply to segmentation, not {task}", checkpoint)
    if not 1 <= flips <= 2 ** module.net.spatial_dims:
        raise MedidiffError(f"--flips {flips}: a {module.net.spatial_dims}D model's images have "
                            f"{2 ** module.net.spatial_dims} sets of axes to flip (the image as is included)",
                            checkpoint)
    _check_sampling(options, module, checkpoint)
    return adapter_for(task, module, module.contract, options, str(checkpoint), **task_options)
