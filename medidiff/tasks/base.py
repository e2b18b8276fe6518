"""The task interface: everything that differs between segmentation, restoration, super-resolution, fusion and
synthesis, in one object per task, held by the systems (:mod:`medidiff.lit`) that train and sample it.

A task answers, for the layers that hold it:

- **data** (class methods, from a data card alone): which image and label keys a case brings
  (:meth:`Task.data_keys`), what a card must provide (:meth:`Task.check_card`), the degradation simulated for
  training, the labels a model writes, and the network channels the card implies (:meth:`Task.channels`);
- **training** (a batch of the data module): the diffused target and its condition in ``[-1, 1]``, a loss on the
  network's estimate, the per-step measurement hook (data consistency, a likelihood), decoding of samples, the
  validation metric — and, for the supervised baselines, the network's forward, loss and prediction;
- **inference** (files): the roles a case is read from, how its tensors become model inputs
  (:meth:`Task.model_inputs`), how predictions ``(N, C, *spatial)`` become the outputs written
  (:meth:`Task.outputs`), its command-line options (:attr:`Task.options`) and the settings it records.

Nothing outside :mod:`medidiff.tasks` compares task names: a new task is one file and one line in
:data:`medidiff.tasks.REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import Tensor

from medidiff.core.guidance import Hook
from medidiff.errors import MedidiffError


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


@dataclass(frozen=True)
class Option:
    """A command-line option of ``medidiff infer`` that belongs to one or more tasks: ``flags`` and the keyword
    arguments of ``argparse.ArgumentParser.add_argument``; ``default`` is what "not given" means."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    @property
    def default(self) -> Any:
        return self.kwargs.get("default", False if self.kwargs.get("action") == "store_true" else None)


class Task:
    """Base of every task; see the module docstring. Subclasses set the class attributes and override what
    differs. Instances hold the task's settings (``config``, plain data: stored in checkpoints)."""

    name: ClassVar[str] = "base"
    roles: ClassVar[tuple[str, ...]] = ("image",)  # the files of one case at inference
    selection_metric: ClassVar[tuple[str, str]] = ("loss", "min")  # validation metric choosing the step count
    resample: ClassVar[bool] = False  # inference brings a case onto the training grid (and outputs back)
    window_dims: ClassVar[tuple[int, ...]] = ()  # case dimensions sampled in windows when larger than the patch
    slice_batch: ClassVar[int | None] = 8  # 2D models over volumes: slices per sampler call (None: all)
    keeps_units: ClassVar[bool] = False  # writes an image in the input's units (clipping would change it)
    png_main: ClassVar[bool] = False  # 2D image files in -> the main output as PNG
    luma: ClassVar[bool] = False  # colour inputs are modelled on their luma (chroma restored after)
    degrades: ClassVar[bool] = False  # the data module simulates a degraded condition of each image
    options: ClassVar[tuple[Option, ...]] = ()  # its `medidiff infer` options
    evaluate_options: ClassVar[tuple[Option, ...]] = ()  # its `medidiff evaluate` options
    structural: ClassVar[tuple[str, ...]] = ()  # settings that fix what a network's output means
    condition_free: ClassVar[bool] = False  # an unconditional prior (the network takes no condition)

    def __init__(self, **config: Any):
        self.config = dict(config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    # ---------------------------------------------------------------------------------- data (card)

    @classmethod
    def data_keys(cls, card: Any) -> tuple[list[str], list[str]]:
        """``(image keys, label keys)`` of the card's cases this task reads for training."""
        return ["image"], []

    @classmethod
    def check_card(cls, card: Any) -> None:
        """Refuse (``MedidiffError`` naming the card) a card this task cannot train on."""
        require_inputs(card, cls.roles, cls.name)

    @classmethod
    def default_degradation(cls, spatial_dims: int) -> dict[str, Any] | None:
        return None

    @classmethod
    def training_sources(cls, card: Any) -> list[str] | None:
        """Image keys trained on one at a time as ``image`` (an unconditional prior over several modalities), or
        None when cases are trained on as they are."""
        return None

    @classmethod
    def contract_labels(cls, card: Any) -> dict[str, int]:
        return {}

    @classmethod
    def contract_extras(cls, card: Any) -> dict[str, Any]:
        """Fields the contract records beside the inputs (e.g. the units of a synthesised target)."""
        return {}

    @classmethod
    def card_settings(cls, card: Any) -> dict[str, Any]:
        """Task settings a data card determines (filled into a configuration where null)."""
        return {}

    @classmethod
    def channels(cls, card: Any, settings: dict[str, Any]) -> tuple[int, int]:
        """``(diffused, condition)`` channels of the network for this card (condition 0: unconditional)."""
        channels = len(card.inputs["image"].use)
        return channels, channels

    def supervised_channels(self) -> int | None:
        """Output channels of a supervised network for this task, where the settings alone fix them."""
        return None

    def diffused_channels(self) -> int | None:
        """Channels of the diffused target, where the settings alone fix them (None: the card decides)."""
        return None

    # -------------------------------------------------------------------------------- training (batch)

    def target(self, batch: dict[str, Any]) -> Tensor:
        """The diffused target ``(B, C, *spatial)`` in ``[-1, 1]``."""
        raise NotImplementedError

    def condition(self, batch: dict[str, Any]) -> Tensor | None:
        """The condition ``(B, C_cond, *spatial)``, or None for an unconditional prior."""
        raise NotImplementedError

    def sample_shape(self, batch: dict[str, Any]) -> tuple[int, ...] | None:
        """``(B, *spatial)`` of an unconditional sample; None where the condition gives it."""
        return None

    def decode(self, samples: Tensor) -> Tensor:
        """Samples ``(N, B, C, *spatial)`` in ``[-1, 1]`` to the task's output space."""
        return samples

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        """A loss on the network's estimate of the target (e.g. Dice on a mask), or None."""
        return None

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        """The per-step hook built from the batch's measurement (data consistency, likelihood), or None."""
        return None

    def diffused_hook(self, hook: Hook | None, cond: Tensor | None) -> Hook | None:
        """``hook`` (on output-space estimates) made to act on the diffused variable: the same unless the task
        diffuses something else (a residual)."""
        return hook

    def undiffuse(self, samples: Tensor, cond: Tensor | None) -> Tensor:
        """Samples of the diffused variable ``(N, B, C, *)`` back to the target's space."""
        return samples

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        """Validation metrics of decoded predictions ``(N, B, C, *spatial)`` against the batch."""
        return {}

    # ------------------------------------------------------------------------------ supervised baseline

    def supervised_output(self, net: torch.nn.Module, cond: Tensor, roi: Sequence[int] | None) -> Tensor:
        """A supervised network's raw output for a condition (padded to the sizes it takes, in windows of
        ``roi`` where given)."""
        raise NotImplementedError(f"{self.name} has no supervised baseline")

    def supervised_output_loss(self, output: Tensor, cond: Tensor, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError(f"{self.name} has no supervised baseline")

    def supervised_estimate(self, output: Tensor, cond: Tensor) -> Tensor:
        """A supervised network's output as an estimate of the diffused target (``[-1, 1]``)."""
        raise NotImplementedError(f"{self.name} has no supervised baseline")

    def supervised_loss(self, net: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        cond = self.condition(batch)
        return self.supervised_output_loss(self.supervised_output(net, cond, None), cond, batch)

    def supervised_prediction(self, net: torch.nn.Module, inputs: dict[str, Any], window: Sequence[int] | None,
                              roi: Sequence[int] | None) -> Tensor:
        """The decoded prediction ``(B, C, *spatial)`` of a supervised network."""
        raise NotImplementedError(f"{self.name} has no supervised baseline")

    # --------------------------------------------------------------------------------- inference (files)

    def output_bounds(self, case: Case, contract: dict[str, Any]) -> Tensor:
        """``(C, 2)`` intensities that an image output's 0 and 1 stand for: the input's scale by default."""
        return case.images[f"{self.roles[0]}_bounds"]

    def extras(self, case: Case, options: dict[str, Any]) -> dict[str, Tensor]:
        """Tensors a case needs beside its images (a k-space mask on its grid)."""
        return {}

    def model_inputs(self, tensors: dict[str, Tensor], case: Case, options: dict[str, Any]) -> dict[str, Tensor]:
        """A case's tensors ``(C, *spatial)`` (on the model's device) as a batch of one for the system."""
        return {key: tensors[key].float()[None] for key in self.roles}

    def calls(self, options: dict[str, Any]) -> int:
        """Sampler calls of one prediction (test-time flips multiply them)."""
        return 1

    def predict(self, system: Any, inputs: dict[str, Tensor], sampling: dict[str, Any],
                options: dict[str, Any]) -> Tensor:
        """Predictions ``(N, B, C, *spatial)`` of ``system`` for a batch."""
        return system.predict(inputs, **sampling)

    def outputs(self, predictions: Tensor, tensors: dict[str, Tensor], case: Case,
                options: dict[str, Any]) -> dict[str, Output]:
        """The outputs written for a case from its predictions ``(N, C, *spatial)``; the first is the main one."""
        raise NotImplementedError

    def settings(self, options: dict[str, Any]) -> dict[str, Any]:
        """What, beside the sampler, decides this task's result (recorded in provenance, compared on resume)."""
        return {}

    @classmethod
    def evaluate(cls, args: Any) -> dict[str, Any]:
        """``medidiff evaluate`` for this task: score ``args.pred`` against its references, write ``args.out``."""
        raise NotImplementedError(f"{cls.name} has no evaluation")

    def prepare(self, system: Any, contract: dict[str, Any], options: dict[str, Any], where: Any) -> None:
        """Before any case: take the run's options (``options`` may gain what they imply, e.g. a mask read from
        its file) and refuse (``MedidiffError`` naming ``where``) what does not fit this model."""

    def supervised_validation(self, net: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """``(loss, prediction (1, B, C, *spatial))`` of a supervised network on a validation batch."""
        return self.supervised_loss(net, batch), self.supervised_prediction(net, batch, None, None)[None]

    def scores(self, batch: dict[str, Any]) -> bool:
        """Whether validation can sample and score this batch (a fusion prior's single images cannot)."""
        return True

    def end_validation(self, sanity_checking: bool) -> None:
        """Called after each validation epoch (e.g. to warn about an epoch that scored nothing)."""


def require_inputs(card: Any, keys: Sequence[str], task: str) -> None:
    """The card must name an input for each of ``keys``."""
    for key in keys:
        if key not in card.inputs:
            raise MedidiffError(f"task '{task}' needs an input named '{key}' in the card", card.path)


def require_reference(args: Any, task: str) -> None:
    """``medidiff evaluate`` of a task scored against references needs them."""
    if args.ref is None and args.pairs is None:
        raise MedidiffError(f"{task} evaluation needs --ref (or a --pairs file)")
