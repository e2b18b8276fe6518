"""Diffusion of the residual over a deterministic predictor (CARD, Han et al. 2022; HiDiff, Chen et al. 2024).

A supervised network learns most of a task cheaply; what it gets wrong is a small, structured residual. Here a
conditional DDPM models ``p(target - f(cond) | cond, f(cond))``: the predictor's estimate ``f(cond)`` (in the
diffused space, ``[-1, 1]``) is both the sampler's start point — pure noise in residual space is noise centred on
the predictor's answer — and a condition beside the task's own. Everything else is the diffusion system
unchanged: the same denoiser, shared samplers, task loss (on the combined estimate), recycling and validated
step count.

The predictor is either trained first (``predictor_ckpt``: a :class:`~medidiff.lit.supervised.SupervisedModule`
checkpoint of the same task, frozen) or jointly (``predictor``: a network config; its supervised loss is added
to the diffusion loss, and the residual network sees its output detached). Its weights are stored in this
system's checkpoints, so a trained model is one self-contained file.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from medidiff.checkpoint import build_network, read_checkpoint
from medidiff.errors import MedidiffError
from medidiff.lit.diffusion import DiffusionModule
from medidiff.tasks import Task

PREDICTOR_BASE = "_predictor_base"  # batch keys the loss terms share within one step
PREDICTOR_OUTPUT = "_predictor_output"


class ResidualDiffusion(DiffusionModule):
    """Conditional diffusion of the residual between the target and a supervised predictor's estimate.

    Args:
        net, task: as :class:`~medidiff.lit.diffusion.DiffusionModule`; the network's ``cond_channels`` are the
            task's condition channels plus the diffused channels (the predictor's estimate).
        predictor: ``{"class_path", "init_args"}`` of the predictor network (e.g. ``medidiff.nets.PlainUNet``
            with ``out_channels = num_classes``); filled in from ``predictor_ckpt`` when that is given.
        predictor_ckpt: a trained supervised checkpoint of the same task whose network becomes the predictor
            (read weights-only, once).
        train_predictor: train the predictor jointly (default: only when it does not come from a checkpoint).
        predictor_weight: weight of the predictor's supervised loss when it is trained jointly.
        predictor_roi: sliding-window size of the predictor on images larger than it (None: whole image).
        predictor_source: where the predictor came from (recorded; set from ``predictor_ckpt``).
        **settings: see :class:`~medidiff.lit.diffusion.DiffusionModule`.
    """

    def __init__(self, net: nn.Module, task: Task, predictor: dict[str, Any] | None = None,
                 predictor_ckpt: str | None = None, train_predictor: bool | None = None, predictor_weight: float = 1.0,
                 predictor_roi: Sequence[int] | None = None, predictor_source: str | None = None, **settings: Any):
        super().__init__(net, task, **settings)
        self.save_hyperparameters("predictor", "predictor_ckpt", "train_predictor", "predictor_weight",
                                  "predictor_roi", "predictor_source")
        weights = None
        if predictor_ckpt is not None:
            predictor, weights, roi = predictor_from_checkpoint(predictor_ckpt, task)
            # the checkpoint is read once: later loads rebuild the network from its config and this system's
            # weights; the predictor sees images as it did when it was scored alone (its own windows)
            self.hparams.update(predictor=predictor, predictor_ckpt=None, predictor_source=str(predictor_ckpt),
                                train_predictor=bool(train_predictor),
                                predictor_roi=predictor_roi if predictor_roi is not None else roi)
        elif predictor is None:
            raise ValueError("give the predictor: predictor_ckpt (a trained supervised checkpoint) or predictor "
                             "(a network config to train jointly)")
        else:
            self.hparams.train_predictor = True if train_predictor is None else bool(train_predictor)
        self.predictor = build_network(predictor, predictor_ckpt or "predictor")
        if weights is not None:
            self.predictor.load_state_dict(weights)
        self._check_predictor()
        self.predictor.requires_grad_(self.hparams.train_predictor)

    def _check_predictor(self) -> None:
        wanted, out = self.task.supervised_channels(), getattr(self.predictor, "out_channels", None)
        if wanted is not None and out is not None and out != wanted:
            raise ValueError(f"the predictor outputs {out} channels but {self.task!r} needs {wanted}")
        image, diffused = getattr(self.predictor, "in_channels", None), self.task.diffused_channels()
        if image is None or diffused is None:
            return
        expected = self.condition_channels(image, diffused)
        if self.net.cond_channels != expected:
            raise ValueError(f"the network's cond_channels is {self.net.cond_channels} but the image ({image} "
                             f"channel(s)) and the predictor's estimate ({diffused}) make {expected}; set "
                             f"net.init_args.cond_channels={expected}")

    @classmethod
    def condition_channels(cls, task_channels: int, diffused_channels: int) -> int:
        """The network's condition: the task's and the predictor's estimate of the diffused target."""
        return task_channels + diffused_channels

    def train(self, mode: bool = True) -> ResidualDiffusion:
        super().train(mode)
        if not self.hparams.train_predictor:
            self.predictor.eval()  # a frozen predictor keeps its normalisation statistics and no dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = list(self.predictor.parameters()) if self.hparams.train_predictor else []
        return [*self.net.parameters(), *extra]

    # ------------------------------------------------------------------------------ the residual

    def predictor_estimate(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, base)``: the predictor's raw output and its estimate of the diffused target in [-1, 1]."""
        output = self.task.supervised_output(self.predictor, cond, self.hparams.predictor_roi)
        return output, self.task.supervised_estimate(output, cond)

    def target_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        cond = self.task.condition(batch).float()
        with torch.set_grad_enabled(self.hparams.train_predictor and torch.is_grad_enabled()):
            output, base = self.predictor_estimate(cond)
        base = base.detach()
        batch[PREDICTOR_BASE], batch[PREDICTOR_OUTPUT] = base, output
        # target and base both lie in [-1, 1]: half their difference does too
        return (self.task.target(batch) - base) / 2, torch.cat([cond, base], 1)

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        base = batch[PREDICTOR_BASE]
        loss = self.task.extra_loss(base + 2 * x0_hat, base + 2 * x0, batch)
        if self.hparams.train_predictor:
            cond = self.task.condition(batch).float()
            joint = self.hparams.predictor_weight * self.task.supervised_output_loss(batch[PREDICTOR_OUTPUT], cond,
                                                                                    batch)
            loss = joint if loss is None else loss + joint
        return loss

    def predict(self, inputs: dict[str, Any], **sampling: Any) -> Tensor:
        """The predictor's estimate plus sampled residuals, decoded: ``(N, B, C, *spatial)``."""
        cond = self.task.condition(inputs).float()
        _, base = self.predictor_estimate(cond)
        hook = self.task.measurement_hook(inputs)
        residual_hook = None if hook is None else \
            (lambda x0_hat, sigma, x: (hook(base + 2 * x0_hat, sigma, x) - base) / 2)
        residual = self.draw(torch.cat([cond, base], 1), hook=residual_hook, **sampling)
        return self.task.decode(base[None] + 2 * residual)


def predictor_from_checkpoint(path: str, task: Task) -> tuple[dict[str, Any], dict[str, Tensor], list[int] | None]:
    """``(net_config, weights, roi_size)`` of a supervised checkpoint of ``task``'s kind and settings."""
    content = read_checkpoint(path)
    record = content.get("medidiff") or {}
    if record.get("system") != "SupervisedModule":
        raise MedidiffError(f"is a {record.get('system')} checkpoint; the predictor must be a SupervisedModule", path)
    saved = record.get("task") or {}
    settings = saved.get("settings") or {}
    differ = [key for key in task.structural if settings.get(key) != task.config.get(key)]
    if saved.get("name") != task.name or differ:
        raise MedidiffError(f"is a predictor for {saved.get('name')} {settings}, not for this {task.name} task "
                            f"({', '.join(f'{k}={task.config.get(k)!r}' for k in differ) or 'another task'})", path)
    weights = {k[len("net."):]: v for k, v in content["state_dict"].items() if k.startswith("net.")}
    roi = (record.get("settings") or {}).get("roi_size")
    return record["net_config"], weights, list(roi) if roi else None
