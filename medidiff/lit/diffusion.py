"""The conditional diffusion system: the objective, the training step and sampling, for any task.

The task (:mod:`medidiff.tasks`) says what is diffused and what conditions it, how a sample becomes a prediction,
an extra loss on the network's estimate and a per-step measurement hook; the denoiser wrapper
(:mod:`medidiff.core.denoiser`) reads the network's output; every sample goes through the shared samplers of
:mod:`medidiff.core.samplers`. Which step count to sample with is chosen on validation by the
:class:`~medidiff.callbacks.ChooseSteps` callback.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from medidiff.core import DiscreteDenoiser, FlowDenoiser, beta_schedule, drop_condition, get_sampler
from medidiff.core.denoiser import GridSpec, LossWeighting, PredictionType
from medidiff.core.guidance import ClassifierFreeGuidance, Hook
from medidiff.core.padding import crop, level_multiple, pad_to_multiple, per_member_hook, spatial_padding, unpadded_hook
from medidiff.core.schedules import BetaScheduleName
from medidiff.errors import MedidiffError
from medidiff.lit.system import System
from medidiff.sliding import SlidingWindowDenoiser
from medidiff.tasks import Task


@dataclass(frozen=True)
class DiffusionSettings:
    """How the network's output is read and trained (the denoiser wrapper).

    Attributes:
        objective: ``ddpm`` (noise along ``schedule``) or ``flow`` (flow matching on the straight path
            ``(1 - t) x0 + t noise``, :class:`medidiff.core.FlowDenoiser`); the samplers are the same.
        prediction_type: what the network predicts: ``epsilon``, ``sample`` (x0) or ``v`` (with ``flow`` the
            velocity ``noise - x0``).
        schedule, num_timesteps, zero_terminal_snr: the training noise schedule (``flow`` uses the count only).
        loss_weighting, min_snr_gamma: weighting of the diffusion loss over timesteps.
    """

    objective: Literal["ddpm", "flow"] = "ddpm"
    prediction_type: PredictionType = "epsilon"
    schedule: BetaScheduleName = "linear"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False
    loss_weighting: LossWeighting = "uniform"
    min_snr_gamma: float = 5.0

    def denoiser(self, network: nn.Module) -> DiscreteDenoiser | FlowDenoiser:
        """The denoiser wrapper of ``network`` (which it holds without owning its parameters)."""
        if self.objective == "flow":
            return FlowDenoiser(network, self.num_timesteps, self.prediction_type,
                                loss_weighting=self.loss_weighting, register_model=False)
        if self.objective != "ddpm":
            raise ValueError(f"unknown objective {self.objective!r}; choose ddpm or flow")
        betas = beta_schedule(self.schedule, self.num_timesteps, zero_terminal_snr=self.zero_terminal_snr)
        return DiscreteDenoiser(network, betas, self.prediction_type, loss_weighting=self.loss_weighting,
                                min_snr_gamma=self.min_snr_gamma, register_model=False)


class DiffusionModule(System):
    """A conditional DDPM (or flow) of a task's target given its condition.

    Args:
        net: called as ``net(x_t, t, cond=...)``; injected from YAML with ``class_path``/``init_args``.
        task: what is diffused, conditioned on, decoded and measured (:mod:`medidiff.tasks`).
        diffusion: the denoiser's objective, prediction type and noise schedule (:class:`DiffusionSettings`).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to ``max_steps``.
        sampler, steps, grid: sampling defaults (any name in ``medidiff.core.SAMPLERS``); ``grid`` names a spacing
            or lists the ``steps`` noise levels themselves (e.g. ``[1000, 0.3]`` for a 2-step student).
        cond_drop, guidance_scale: classifier-free guidance (drop probability at training, scale at sampling).
        nan_policy: ``raise`` stops training on a NaN/Inf loss with a clear message; ``skip`` skips the batch.
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
    """

    iterative = True

    def __init__(
        self,
        net: nn.Module,
        task: Task,
        diffusion: DiffusionSettings = DiffusionSettings(),
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_steps: int = 100,
        sampler: str = "dpmpp_2m",
        steps: int = 10,
        grid: GridSpec = "exponential",
        cond_drop: float = 0.0,
        guidance_scale: float = 1.0,
        nan_policy: Literal["raise", "skip"] = "raise",
        terminal_fraction: float = 0.0,
        recycle_fraction: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        seed: int = 0,
    ):
        super().__init__(net.to(memory_format=torch.channels_last) if channels_last else net, task)
        diffusion = DiffusionSettings(**diffusion) if isinstance(diffusion, dict) else diffusion
        self.save_hyperparameters(ignore=["net", "task", "diffusion"])
        self.hparams["diffusion"] = asdict(diffusion)
        get_sampler(sampler)  # fail at construction on a misspelled sampler, not after training
        self._check_channels()
        # the network is registered once, as `net`: the denoiser holds it without owning its parameters
        self.denoiser = diffusion.denoiser(torch.compile(self.net) if compile else self.net)
        self._check_grid(steps)

    def _check_channels(self) -> None:
        expected = self.task.diffused_channels()
        if expected is not None and self.net.in_channels != expected:
            raise ValueError(f"the network diffuses {self.net.in_channels} channels but the task needs {expected} "
                             f"({self.task!r}); set net.init_args.in_channels={expected}")
        if self.task.condition_free and getattr(self.net, "cond_channels", 0):
            raise ValueError(f"{self.task.name} trains an unconditional prior; set net.init_args.cond_channels=0 "
                             f"(got {self.net.cond_channels})")

    def _check_grid(self, *counts: int) -> None:
        """An explicit grid fixes the step count: refuse at construction what sampling would refuse later."""
        if not isinstance(self.hparams.grid, str):
            for steps in sorted(set(counts)):
                self.denoiser.get_sigmas(int(steps), list(self.hparams.grid))

    def diffusion_settings(self) -> DiffusionSettings:
        return DiffusionSettings(**self.hparams.diffusion)

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

    def on_validation_epoch_end(self) -> None:
        self.task.end_validation(bool(getattr(self._trainer, "sanity_checking", False)))

    def validation_metrics(self, batch: dict[str, Any], steps: int) -> dict[str, float]:
        """The task's metrics of one sample per input of a validation batch, drawn with ``steps`` steps."""
        return self.task.sample_metrics(self.predict(batch, steps=steps), batch)

    def contract_sampling(self) -> dict[str, Any]:
        hp = self.hparams
        default = {"sampler": hp.sampler, "steps": int(hp.steps), "grid": hp.grid, "chosen_by": "config"}
        return self.validated_sampling or default

    def target_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """``(x0, cond)``: the diffused target in ``[-1, 1]`` and its condition (the task's)."""
        return self.task.target(batch), self.task.condition(batch)

    def _loss(self, batch: dict[str, Any], stage: str, generator: torch.Generator | None = None) -> Tensor:
        x0, cond = self.target_and_condition(batch)
        if cond is not None and stage == "train":
            cond = drop_condition(cond, self.hparams.cond_drop)
        kwargs = {} if cond is None else {"cond": self.layout(cond)}
        t = self.draw_timesteps(x0.shape[0], x0.device, generator)
        source = self.recycled_source(x0, kwargs.get("cond")) if stage == "train" else None
        per_sample, x0_hat = self.denoiser.loss(self.layout(x0), t=t, generator=generator, source=source, **kwargs)
        loss = per_sample.mean()
        self.log(f"{stage}/diffusion_loss", loss, batch_size=x0.shape[0], prog_bar=stage == "train")
        loss = self.plus_task_loss(loss, x0_hat, x0, batch, stage)
        self.log(f"{stage}/loss", loss, batch_size=x0.shape[0], prog_bar=stage == "val")
        return loss

    def plus_task_loss(self, loss: Tensor, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any], stage: str) -> Tensor:
        """``loss`` plus the task's loss on the estimate ``x0_hat`` (logged), if the task has one."""
        extra = self.extra_loss(x0_hat, x0, batch)
        if extra is None:
            return loss
        self.log(f"{stage}/extra_loss", extra, batch_size=x0.shape[0])
        return loss + extra

    def extra_loss(self, x0_hat: Tensor, x0: Tensor, batch: dict[str, Any]) -> Tensor | None:
        return self.task.extra_loss(x0_hat, x0, batch)

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
        estimate = self.denoiser(self.layout(noise * self.denoiser.sigma_max), sigma, **kwargs)
        source = x0.clone()
        source[chosen] = estimate.to(x0.dtype)
        return self.layout(source)

    def layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last and x.ndim == 4 else x

    # ------------------------------------------------------------------------------------ sampling

    def predict(self, inputs: dict[str, Any], **sampling: Any) -> Tensor:
        """Decoded samples ``(N, B, C, *spatial)`` for a batch of inputs (the task's keys); ``sampling`` replaces
        the defaults of :meth:`sample` (``sampler``, ``steps``, ``grid``, ``ensemble``, ``seed``, ``callback``,
        ``window``)."""
        cond = self.task.condition(inputs)
        samples = self.sample(cond, shape=self.task.sample_shape(inputs), hook=self.task.measurement_hook(inputs),
                              **sampling)
        return self.task.decode(samples)

    @torch.no_grad()
    def sample(self, cond: Tensor | None, *, hook: Hook | None = None, **sampling: Any) -> Tensor:
        """Samples ``(N, B, C, *spatial)`` of the task's target space for a condition (see :meth:`draw`); a hook
        sees target-space estimates even where the task diffuses something else (a residual)."""
        drawn = self.draw(cond, hook=self.task.diffused_hook(hook, cond), **sampling)
        return self.task.undiffuse(drawn, cond)

    def draw(
        self,
        cond: Tensor | None,
        *,
        shape: tuple[int, ...] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        grid: GridSpec | None = None,
        ensemble: int = 1,
        seed: int | None = None,
        hook: Hook | None = None,
        callback: Callable[[dict], None] | None = None,
        window: tuple[int, ...] | None = None,
    ) -> Tensor:
        """Draw ``ensemble`` samples per condition, all members in one batch, through the shared samplers.

        Args:
            cond: ``(B, C_cond, *spatial)``, or None for an unconditional prior (then give ``shape``); spatial
                sizes are padded to what the network can take and cropped back, so whole images of any size
                can be sampled.
            shape: ``(B, *spatial)`` when there is no condition.
            hook: per-step hook for one member ``(B, C, *spatial)``, on the unpadded region; it is applied to
                each ensemble member in turn.
            window: denoise in sliding windows of this size (volumes larger than the network was trained on).

        Returns:
            ``(N, B, C, *spatial)`` in ``[-1, 1]`` space, float32.
        """
        hp = self.hparams
        batch, *spatial = shape if cond is None else (cond.shape[0], *cond.shape[2:])
        channels = self.net.in_channels
        generator = torch.Generator(self.device).manual_seed(hp.seed if seed is None else seed)
        pad = spatial_padding(spatial, level_multiple(self.net))
        padded = [size + pad[2 * i] + pad[2 * i + 1] for i, size in enumerate(reversed(spatial))][::-1]
        sigmas = self.denoiser.get_sigmas(steps or hp.steps, grid or hp.grid)
        x = torch.randn((batch * ensemble, channels, *padded), generator=generator,
                        device=self.device).mul_(sigmas[0].to(self.device))
        base = self._denoiser(cond, ensemble, window)
        step_hook = unpadded_hook(per_member_hook(hook, ensemble), pad)
        samples = get_sampler(sampler or hp.sampler)(base, x, sigmas, generator=generator, hook=step_hook,
                                                     callback=callback)
        return crop(samples, pad).reshape(ensemble, batch, channels, *spatial)

    def _denoiser(self, cond: Tensor | None, members: int, window: tuple[int, ...] | None) -> Callable[..., Tensor]:
        """The denoiser sampling calls: windowed, guided, with the (padded, repeated) condition bound."""
        base = self.denoiser if window is None else SlidingWindowDenoiser(self.denoiser, window)
        if cond is None:
            return base
        # one member needs no copy: a large 3D condition is a volume of memory
        cond_batch = cond.float() if members == 1 else cond.float().repeat(members, *([1] * (cond.ndim - 1)))
        if self.hparams.guidance_scale != 1:
            base = ClassifierFreeGuidance(base, self.hparams.guidance_scale)
        return functools.partial(base, cond=pad_to_multiple(cond_batch, level_multiple(self.net))[0])

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
