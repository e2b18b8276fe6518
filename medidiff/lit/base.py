"""The one diffusion LightningModule every task subclasses.

A task says what is diffused and what conditions it (:meth:`DiffusionModule.target_and_condition`), how a
sample becomes a prediction (:meth:`DiffusionModule.decode`), optionally an extra loss on the network's
x0 estimate and a data-consistency hook. Training, sampling (always through :mod:`medidiff.core.samplers`),
ensembles, padding and precision live here, once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import Tensor, nn

from medidiff.core import DiscreteDenoiser, FlowDenoiser, beta_schedule, drop_condition, get_sampler
from medidiff.core.denoiser import GridSpec, LossWeighting, PredictionType
from medidiff.core.guidance import ClassifierFreeGuidance, Hook
from medidiff.core.schedules import BetaScheduleName
from medidiff.errors import MedidiffError
from medidiff.lit.distill import check_distillation_settings, distillation_loss, load_teacher


class MedidiffModule:
    """Mixin of every medidiff LightningModule.

    - Training and validation batches arrive as plain tensors (see :func:`plain_tensors`); prediction batches
      keep their metadata.
    - Checkpoint bookkeeping: :meth:`on_save_checkpoint` writes ``checkpoint["medidiff"]`` — the task, module
      class, how to rebuild the network (``net_config``) and the model-input contract
      (:mod:`medidiff.inference.contract`, built from the data module when fitting starts) — beside Lightning's
      weights and hyperparameters; :meth:`on_load_checkpoint` reads it back when training resumes.
    """

    task: str = "base"
    contract: dict[str, Any] | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return plain_tensors(batch) if self._trainer is not None and not self.trainer.predicting else batch

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "card"):
            from medidiff.inference.contract import build_contract

            self.contract = build_contract(datamodule, self) | {"sampling": self.contract_sampling()}

    def contract_sampling(self) -> dict[str, Any] | None:
        """The sampler settings recorded in the contract (diffusion modules: the validation's choice)."""
        return None

    def checkpoint_record(self) -> dict[str, Any]:
        contract = self.contract
        if contract is not None:
            contract = contract | {"sampling": self.contract_sampling() or contract.get("sampling")}
        return {"format": 1, "task": self.task, "module": type(self).__name__, "net_config": net_config(self.net),
                "contract": contract}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medidiff"] = self.checkpoint_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("medidiff") or {}
        saved, mine = record.get("net_config"), net_config(self.net)
        if saved and saved != mine:  # resuming builds from the configuration, never from the checkpoint
            raise MedidiffError(f"the checkpoint holds the network {saved}, the configuration builds {mine}; resume "
                                "with the configuration the checkpoint was trained with")
        self.contract = record.get("contract")
        # checkpoints written before the network was registered once hold its weights twice
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("denoiser.model.")]:
            del state[key]


class DiffusionModule(MedidiffModule, L.LightningModule):
    """A conditional DDPM: ``p(target | condition)`` with the condition concatenated to the network input.

    Args:
        net: called as ``net(x_t, t, cond=...)``; injected from YAML with ``class_path``/``init_args``.
        prediction_type: what ``net`` predicts: ``epsilon``, ``sample`` (x0) or ``v`` (with ``objective: flow``
            the flow velocity ``noise - x0``).
        objective: ``ddpm`` (noise along the schedule below) or ``flow`` (flow matching on the straight path
            ``(1 - t) x0 + t noise``, :class:`medidiff.core.FlowDenoiser`); the samplers are the same.
        schedule, num_timesteps, zero_terminal_snr: the training noise schedule (``flow`` uses the count only).
        loss_weighting, min_snr_gamma: weighting of the diffusion loss over timesteps.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to ``max_steps``.
        sampler, steps, grid: sampling defaults (any name in ``medidiff.core.SAMPLERS``); ``grid`` names a spacing
            or lists the ``steps`` noise levels themselves (e.g. ``[1000, 0.3]`` for a 2-step student).
        ensemble: samples drawn per input, as one batch.
        cond_drop, guidance_scale: classifier-free guidance (drop probability at training, scale at sampling).
        nan_policy: ``raise`` stops training on a NaN/Inf loss with a clear message; ``skip`` skips the batch.
        val_sampling_batches: validation batches on which a full sample is drawn and the task metric computed.
        val_steps: sampler step counts tried on those batches at every validation (default: ``steps`` only);
            the one that scores best (``selection_metric``) is recorded in the checkpoint's contract and is
            what ``medidiff infer`` uses unless told otherwise. A small model can be best at 1 step and give
            an empty mask at 10.
        terminal_fraction: share of training samples drawn at the highest noise level instead of uniformly.
            There the network sees no trace of the target and must predict it from the condition alone — the
            step every sample starts with. Uniform timesteps give that skill ~1/T of the updates, which starves
            few-step segmentation on small CPU budgets.
        recycle_fraction: share of training samples noised from the network's own one-step estimate (made from
            pure noise, without gradient) instead of from the target — "recycling" (Fu et al., MICCAI 2023).
            Sampling feeds the network noisy versions of its own earlier estimates, not of the truth; a network
            trained only on the latter learns to trust its input and carries early errors to the end, so the
            result gets worse as steps are added. Costs one extra forward pass (no gradient) per recycled sample.
            Measured with ``prediction_type: sample`` only; with epsilon or v targets the noise that maps a
            recycled ``x_t`` to ``x0`` grows like ``1 / sqrt(1 - abar)`` at low noise levels.
        channels_last, compile: opt-in speed switches (measured in benchmarks/).
        seed: base seed of sampling in validation and prediction.
        teacher_ckpt: distil this trained checkpoint (same class, network and denoiser settings) into a student
            for ``steps`` steps of ``grid`` (:mod:`medidiff.lit.distill`); the student starts from its weights.
        teacher_steps_per_step, teacher_sampler: how the teacher solves each student step (2 steps of
            ``dpmpp_2m``: one round of progressive distillation); a list gives each student step its own count.
        teacher_hook: apply the task's measurement hook (data consistency) to the teacher's steps and to the
            student's estimate while distilling, as sampling will.
        teacher_source: where the teacher came from (recorded; set from ``teacher_ckpt``).
        distill_task_loss: while distilling, add the task's own loss on the student's estimate against the truth
            (segmentation: the Dice term, ``dice_weight``), so the student may improve on what it imitates.
            Tasks without a loss of their own beside the diffusion one (restoration, super-resolution) add nothing.
        distill_truth_weight: while distilling, add this weight times the squared error of the student's estimate
            (after the measurement hook) against the truth, for every task: from its own inputs the student then
            also learns to correct its earlier steps, not only to copy the teacher.
        distill_inputs: where each student step starts while distilling: ``noised`` (``x0 + sigma * noise``, the
            state a perfect earlier step leaves) or ``own`` (where the student's own earlier steps lead, as when
            it samples).
    """

    task: str = "base"
    selection_metric: tuple[str, str] = ("loss", "min")  # validation metric choosing the step count

    def __init__(
        self,
        net: nn.Module,
        prediction_type: PredictionType = "epsilon",
        schedule: BetaScheduleName = "linear",
        num_timesteps: int = 1000,
        zero_terminal_snr: bool = False,
        objective: Literal["ddpm", "flow"] = "ddpm",
        loss_weighting: LossWeighting = "uniform",
        min_snr_gamma: float = 5.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        sampler: str = "dpmpp_2m",
        steps: int = 10,
        grid: GridSpec = "exponential",
        ensemble: int = 1,
        cond_drop: float = 0.0,
        guidance_scale: float = 1.0,
        nan_policy: Literal["raise", "skip"] = "raise",
        val_sampling_batches: int = 1,
        val_steps: Sequence[int] | None = None,
        terminal_fraction: float = 0.0,
        recycle_fraction: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        seed: int = 0,
        teacher_ckpt: str | None = None,
        teacher_steps_per_step: int | list[int] = 2,
        teacher_sampler: str = "dpmpp_2m",
        teacher_hook: bool = True,
        teacher_source: str | None = None,
        distill_task_loss: bool = False,
        distill_truth_weight: float = 0.0,
        distill_inputs: Literal["noised", "own"] = "noised",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        get_sampler(sampler)  # fail at construction on a misspelled sampler, not after training
        check_distillation_settings(teacher_steps_per_step, teacher_sampler, steps)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        network = torch.compile(self.net) if compile else self.net
        # the network is registered once, as `net`: the denoiser holds it without owning its parameters
        if objective == "flow":
            self.denoiser = FlowDenoiser(network, num_timesteps, prediction_type, loss_weighting=loss_weighting,
                                         register_model=False)
        elif objective == "ddpm":
            betas = beta_schedule(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr)
            self.denoiser = DiscreteDenoiser(network, betas, prediction_type, loss_weighting=loss_weighting,
                                             min_snr_gamma=min_snr_gamma, register_model=False)
        else:
            raise ValueError(f"unknown objective {objective!r}; choose ddpm or flow")
        self._check_grid()
        self._teacher: list[DiffusionModule] = []  # a list: the teacher is neither a submodule nor stored
        if teacher_ckpt is not None:
            self.attach_teacher(teacher_ckpt)

    def _check_grid(self) -> None:
        """An explicit grid fixes the step count: refuse at construction what sampling would refuse later."""
        hp = self.hparams
        if isinstance(hp.grid, str):
            return
        for steps in sorted({int(hp.steps), *(hp.val_steps or [])}):
            self.denoiser.get_sigmas(steps, list(hp.grid))

    def attach_teacher(self, path: str) -> None:
        """Distil the checkpoint at ``path``: start from its weights, keep it (frozen, unsaved) as the teacher."""
        teacher = load_teacher(path, self)
        self.net.load_state_dict(teacher.net.state_dict())
        self._teacher = [teacher]
        # the checkpoint is read once; a student checkpoint loads without it
        self.hparams.update(teacher_ckpt=None, teacher_source=str(path))

    # ------------------------------------------------------------------------------ task interface

    def target_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """``(x0, cond)``: the diffused target in ``[-1, 1]`` ``(B, C, *spatial)`` and the condition."""
        raise NotImplementedError

    def condition(self, batch: dict[str, Any]) -> Tensor | None:
        """The condition alone (prediction has no target)."""
        raise NotImplementedError

    def decode(self, samples: Tensor) -> Tensor:
        """Map samples ``(N, B, C, *spatial)`` in ``[-1, 1]`` to the task's output space."""
        return samples

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        """An optional loss on the network's estimate of x0 (e.g. Dice on a predicted mask)."""
        return None

    def measurement_hook(self, batch: dict[str, Any]) -> Hook | None:
        """An optional per-step hook (data consistency) built from the batch's measurement."""
        return None

    def sample_metrics(self, prediction: Tensor, batch: dict[str, Any]) -> dict[str, float]:
        """Task metrics of decoded samples on a validation batch."""
        return {}

    # ------------------------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        loss = self._loss(batch, "train")
        if not torch.isfinite(loss):
            if self.hparams.nan_policy == "skip":
                self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
                return None
            raise MedidiffError(f"training loss became {loss.item()} at step {self.global_step} "
                                f"(batch {batch_idx}); lower the learning rate or check the data for NaN/Inf, "
                                f"or set model.nan_policy=skip to skip such batches")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(self.hparams.seed + batch_idx)
        self._loss(batch, "val", generator=generator)
        if batch_idx < self.hparams.val_sampling_batches:
            for steps in self.validation_step_counts:
                prediction = self.predict(batch, ensemble=1, steps=steps)
                metrics = self.sample_metrics(prediction, batch)
                for name, value in metrics.items():
                    suffix = "" if steps == self.hparams.steps else f"_steps{steps}"
                    self.log(f"val/{name}{suffix}", value, batch_size=prediction.shape[1])
                score = metrics.get(self.selection_metric[0])
                if score is not None and math.isfinite(score):
                    self._step_scores.setdefault(steps, []).append(score)

    @property
    def validation_step_counts(self) -> list[int]:
        return sorted({int(s) for s in (self.hparams.get("val_steps") or [self.hparams.steps])})

    def on_validation_epoch_start(self) -> None:
        self._step_scores: dict[int, list[float]] = {}

    def on_validation_epoch_end(self) -> None:
        scores = {steps: sum(v) / len(v) for steps, v in getattr(self, "_step_scores", {}).items() if v}
        if scores:
            self.validated_sampling = choose_steps(scores, self.selection_metric, self.hparams, self.global_step)

    def contract_sampling(self) -> dict[str, Any]:
        hp = self.hparams
        default = {"sampler": hp.sampler, "steps": int(hp.steps), "grid": hp.grid, "chosen_by": "config"}
        return getattr(self, "validated_sampling", None) or default

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        sampling = (self.contract or {}).get("sampling") or {}
        if sampling.get("chosen_by") == "validation":
            self.validated_sampling = sampling

    def diffused_hook(self, hook: Hook | None, cond: Tensor | None) -> Hook | None:
        """A hook on output-space estimates made to act on the diffused variable (the same unless a task
        diffuses something else, e.g. a residual)."""
        return hook

    def _loss(self, batch: dict[str, Any], stage: str, generator: torch.Generator | None = None) -> Tensor:
        if self._teacher:
            return self._distillation_loss(batch, stage, generator)
        x0, cond = self.target_and_condition(batch)
        if cond is not None and stage == "train":
            cond = drop_condition(cond, self.hparams.cond_drop)
        kwargs = {} if cond is None else {"cond": self._layout(cond)}
        t = self.draw_timesteps(x0.shape[0], x0.device, generator)
        source = self.recycled_source(x0, kwargs.get("cond")) if stage == "train" else None
        per_sample, x0_hat = self.denoiser.loss(self._layout(x0), t=t, generator=generator, source=source, **kwargs)
        loss = per_sample.mean()
        self.log(f"{stage}/diffusion_loss", loss, batch_size=x0.shape[0], prog_bar=stage == "train")
        loss = self._plus_extra_loss(loss, x0_hat, x0, batch, stage)
        self.log(f"{stage}/loss", loss, batch_size=x0.shape[0], prog_bar=stage == "val")
        return loss

    def _plus_extra_loss(self, loss: Tensor, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any], stage: str) -> Tensor:
        """``loss`` plus the task's :meth:`extra_loss` on the estimate ``x0_hat`` (logged), if the task has one."""
        extra = self.extra_loss(x0_hat, x0, batch)
        if extra is None:
            return loss
        self.log(f"{stage}/extra_loss", extra, batch_size=x0.shape[0])
        return loss + extra

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for teacher in self._teacher:  # not a submodule: Lightning does not move it with the student
            teacher.to(self.device)

    def _distillation_loss(self, batch: dict[str, Any], stage: str, generator: torch.Generator | None) -> Tensor:
        step = distillation_loss(self, self._teacher[0], batch, generator)
        batch_size = step.per_sample.shape[0]
        loss = step.per_sample.mean()
        self.log(f"{stage}/distill_loss_step{step.index}", loss, batch_size=batch_size)
        if self.hparams.distill_task_loss:
            loss = self._plus_extra_loss(loss, step.estimate, step.x0, batch, stage)
        if self.hparams.distill_truth_weight:
            truth = (step.estimate.float() - step.x0.float()).pow(2).mean()
            self.log(f"{stage}/distill_truth_loss", truth, batch_size=batch_size)
            loss = loss + self.hparams.distill_truth_weight * truth
        self.log(f"{stage}/loss", loss, batch_size=batch_size, prog_bar=True)
        return loss

    def draw_timesteps(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Training timesteps ``(B,)``: uniform, with ``terminal_fraction`` of them at ``T - 1``."""
        num = self.denoiser.num_timesteps
        t = torch.randint(0, num, (batch,), generator=generator, device=device)
        if self.hparams.terminal_fraction > 0:
            terminal = torch.rand(batch, generator=generator, device=device) < self.hparams.terminal_fraction
            t = t.where(~terminal, torch.full_like(t, num - 1))
        return t

    @torch.no_grad()
    def recycled_source(self, x0: Tensor, cond: Tensor | None) -> Tensor | None:
        """``x0`` with ``recycle_fraction`` of the samples replaced by the network's estimate from pure noise."""
        if self.hparams.recycle_fraction <= 0:
            return None
        chosen = (torch.rand(x0.shape[0], device=x0.device) < self.hparams.recycle_fraction).nonzero()[:, 0]
        if chosen.numel() == 0:
            return None
        sigma = torch.full((chosen.numel(),), self.denoiser.sigma_max, device=x0.device)
        noise = torch.randn((chosen.numel(), *x0.shape[1:]), device=x0.device, dtype=x0.dtype)
        kwargs = {} if cond is None else {"cond": cond[chosen]}
        estimate = self.denoiser(self._layout(noise * self.denoiser.sigma_max), sigma, **kwargs)
        source = x0.clone()
        source[chosen] = estimate.to(x0.dtype)
        return self._layout(source)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last and x.ndim == 4 else x

    # ------------------------------------------------------------------------------------ sampling

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.predict(batch)

    def predict(self, batch: dict[str, Any], **overrides: Any) -> Tensor:
        """Decoded samples ``(N, B, C, *spatial)`` for a batch; ``overrides`` replace sampling defaults."""
        return self.predict_probabilities(self.condition(batch), hook=self.measurement_hook(batch), **overrides)

    def predict_probabilities(self, cond: Tensor, **sampling: Any) -> Tensor:
        """Decoded samples ``(N, B, C, *spatial)`` for a condition; the interface file-level inference uses."""
        return self.decode(self.sample(cond, **sampling))

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor | None,
        *,
        shape: tuple[int, ...] | None = None,
        channels: int | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        grid: GridSpec | None = None,
        ensemble: int | None = None,
        seed: int | None = None,
        hook: Hook | None = None,
        callback: Callable[[dict], None] | None = None,
        denoiser: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """Draw ``ensemble`` samples per condition, all members in one batch, through the shared samplers.

        Args:
            cond: ``(B, C_cond, *spatial)``, or None for an unconditional prior (then give ``shape``); spatial
                sizes are padded to what the network can take and cropped back, so whole images of any size
                can be sampled.
            shape: ``(B, *spatial)`` when there is no condition.
            channels: channels of the sample (defaults to the network's ``in_channels``).
            hook: per-step hook for one member ``(B, C, *spatial)``, on the unpadded region; it is applied to
                each ensemble member in turn.
            denoiser: replaces the module's denoiser (e.g. a sliding-window wrapper for large volumes).

        Returns:
            ``(N, B, C, *spatial)`` in ``[-1, 1]`` space, float32.
        """
        hp = self.hparams
        members = ensemble or hp.ensemble
        batch, *spatial = shape if cond is None else (cond.shape[0], *cond.shape[2:])
        channels = channels or self.net.in_channels
        generator = torch.Generator(self.device).manual_seed(hp.seed if seed is None else seed)
        pad = spatial_padding(spatial, self.size_multiple)
        padded = [size + pad[2 * i] + pad[2 * i + 1] for i, size in enumerate(reversed(spatial))][::-1]
        sigmas = self.denoiser.get_sigmas(steps or hp.steps, grid or hp.grid)
        x = torch.randn((batch * members, channels, *padded), generator=generator,
                        device=self.device).mul_(sigmas[0].to(self.device))
        base = denoiser or self.denoiser
        if cond is not None:
            # one member needs no copy: a large 3D condition is a volume of memory
            cond_batch = cond.float() if members == 1 else cond.float().repeat(members, *([1] * (cond.ndim - 1)))
            if hp.guidance_scale != 1:
                base = ClassifierFreeGuidance(base, hp.guidance_scale)
            base = functools.partial(base, cond=pad_to_multiple(cond_batch, self.size_multiple)[0])
        step_hook = unpadded_hook(per_member_hook(hook, members), pad)
        samples = get_sampler(sampler or hp.sampler)(base, x, sigmas, generator=generator, hook=step_hook,
                                                     callback=callback)
        return crop(samples, pad).reshape(members, batch, channels, *spatial)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the network accepts are multiples of this (2 ** number of down-samplings)."""
        levels = len(getattr(self.net, "config", {}).get("channels", (0,)))
        return 2 ** max(levels - 1, 0)

    # ---------------------------------------------------------------------------------- optimizer

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer else 10_000
        warmup = min(hp.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def choose_steps(scores: dict[int, float], metric: tuple[str, str], hparams: Any, global_step: int) -> dict:
    """The sampling record of the step count that scored best on validation (ties: the fewest steps)."""
    name, mode = metric
    sign = 1 if mode == "max" else -1
    best = max(sorted(scores), key=lambda steps: sign * scores[steps])
    return {"sampler": hparams.sampler, "steps": int(best), "grid": hparams.grid, "chosen_by": "validation",
            "metric": name, "mode": mode, "scores": {str(k): float(v) for k, v in sorted(scores.items())},
            "global_step": int(global_step)}


def plain_tensors(batch: Any) -> Any:
    """MONAI MetaTensors as plain tensors: every op on a MetaTensor goes through Python metadata tracking,
    which made a training step several times slower; training and validation need no metadata."""
    if isinstance(batch, MetaTensor):
        return batch.as_tensor()
    if isinstance(batch, dict):
        return {key: plain_tensors(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(plain_tensors(value) for value in batch)
    return batch


def net_config(net: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a network that records its arguments in ``net.config``.

    Stored in every checkpoint so that a checkpoint alone rebuilds its network (see :mod:`medidiff.checkpoint`).
    """
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(getattr(net, "config", {}))}


def spatial_padding(spatial: Sequence[int], multiple: int) -> list[int]:
    """``F.pad`` amounts (last axis first, before/after) that bring each size up to a multiple of ``multiple``."""
    pad: list[int] = []
    for size in reversed(spatial):
        extra = (-size) % multiple
        pad += [extra // 2, extra - extra // 2]
    return pad


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, list[int]]:
    """Replicate-pad the spatial axes of ``(B, C, *spatial)`` up to multiples of ``multiple``."""
    pad = spatial_padding(x.shape[2:], multiple)
    if not any(pad):
        return x, pad
    return F.pad(x, pad, mode="replicate"), pad


def stride_multiple(net: nn.Module) -> int:
    """Spatial sizes a plain network (``config["strides"]``, e.g. MONAI ``UNet``) takes are multiples of this."""
    return math.prod(getattr(net, "config", {}).get("strides", [1]))


def crop(x: Tensor, pad: list[int]) -> Tensor:
    """Undo :func:`pad_to_multiple`."""
    return x[(slice(None), slice(None)) + _inner_slices(x, pad)] if any(pad) else x


def per_member_hook(hook: Hook | None, members: int) -> Hook | None:
    """Apply a hook built for one ensemble member ``(B, ...)`` to each member of ``(N*B, ...)`` in turn."""
    if hook is None or members == 1:
        return hook

    def wrapped(x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        parts = zip(x0_hat.chunk(members), sigma.chunk(members), x.chunk(members))
        return torch.cat([hook(*part) for part in parts])

    return wrapped


def unpadded_hook(hook: Hook | None, pad: list[int]) -> Hook | None:
    """Run ``hook`` on the unpadded region only, so measurements keep the input's own shape."""
    if hook is None or not any(pad):
        return hook

    def wrapped(x0_hat: Tensor, sigma: Tensor, x: Tensor) -> Tensor:
        inner = crop(x0_hat, pad)
        fixed = hook(inner.contiguous(), sigma, crop(x, pad).contiguous())
        out = x0_hat.clone()
        out[(slice(None), slice(None)) + _inner_slices(x0_hat, pad)] = fixed
        return out

    return wrapped


def _inner_slices(x: Tensor, pad: list[int]) -> tuple[slice, ...]:
    spatial = x.ndim - 2
    return tuple(slice(pad[2 * (spatial - 1 - a)], x.shape[a + 2] - pad[2 * (spatial - 1 - a) + 1])
                 for a in range(spatial))
