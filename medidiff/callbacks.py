"""Lightning callbacks that the shipped configs use (checkpoints, choosing the step count on validation) and the
progress bar ``medidiff fit`` shows."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when training stops between two scheduled
    saves (a ``max_time`` limit, or ``max_steps`` not a multiple of ``every_n_train_steps``), and that finds the
    run a user just made for ``--ckpt_path last``.

    Lightning writes ``last.ckpt`` at the end of training only when it never wrote one, so a run saved every 50
    steps that stops at step 183 would keep step 150. Saving every step instead (what one-volume configs did, as
    their epochs are one step long) wrote a 3D model to disk after each step.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """Lightning looks in this run's own folder, ``lightning_logs/version_<N+1>/checkpoints``, which the logger
        has just created empty, so ``--ckpt_path last`` restarted from step 0. Every run's ``last*.ckpt`` below the
        run root counts; Lightning resumes the newest."""
        found = set(super()._find_last_checkpoints(trainer))
        root = Path(trainer.default_root_dir)
        if root.is_dir():
            found |= {os.path.normpath(p) for p in root.rglob("last*.ckpt") if p.is_file()}
        return found


class StepProgressBar(RichProgressBar):
    """Rich progress bar that counts steps when training is bounded by steps: Lightning's read "Epoch 293/-2"
    for ``max_epochs: -1``, and showed the logger's version number as a metric."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs not in (None, -1) or not trainer.max_steps or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        return f"Step {trainer.global_step}/{trainer.max_steps} (epoch {current_epoch})"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ChooseSteps(Callback):
    """Choose the sampler step count on validation and write it into the model's contract.

    On the first ``batches`` validation batches a sample is drawn with every count of ``steps`` and scored with the
    task's metric (``val/<metric>`` for the model's own ``steps``, ``val/<metric>_steps<n>`` for the others). At
    the end of each validation the count that scored best on average (the fewest on ties) becomes the contract's
    sampling, which ``medidiff infer`` uses unless told otherwise: a small model can be best at 1 step and give an
    empty mask at 10. Without ``steps``, the model's own count is scored and nothing is chosen.

    Args:
        steps: step counts to compare, e.g. ``[1, 2, 5, 10]``.
        batches: validation batches sampled at each validation.
    """

    def __init__(self, steps: list[int] | None = None, batches: int = 1):
        self.steps, self.batches = steps, batches
        self._scores: dict[int, list[float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module._check_grid(*self.counts(pl_module))  # an explicit grid fixes the step count: refuse now

    def counts(self, pl_module: L.LightningModule) -> list[int]:
        return sorted({int(s) for s in (self.steps or [pl_module.hparams.steps])})

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scores = {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx >= self.batches or not pl_module.task.scores(batch):
            return
        metric = pl_module.task.selection_metric[0]
        for steps in self.counts(pl_module):
            metrics = pl_module.validation_metrics(batch, steps)
            suffix = "" if steps == pl_module.hparams.steps else f"_steps{steps}"
            for name, value in metrics.items():
                pl_module.log(f"val/{name}{suffix}", value, batch_size=_batch_size(batch))
            score = metrics.get(metric)
            if score is not None and math.isfinite(score):
                self._scores.setdefault(steps, []).append(score)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scores = {steps: sum(v) / len(v) for steps, v in self._scores.items() if v}
        if scores and self.steps:
            pl_module.validated_sampling = choose_steps(scores, pl_module.task.selection_metric, pl_module.hparams,
                                                        pl_module.global_step)


def choose_steps(scores: dict[int, float], metric: tuple[str, str], hparams: Any, global_step: int) -> dict:
    """The sampling record of the step count that scored best on validation (ties: the fewest steps)."""
    name, mode = metric
    sign = 1 if mode == "max" else -1
    best = max(sorted(scores), key=lambda steps: sign * scores[steps])
    return {"sampler": hparams.sampler, "steps": int(best), "grid": hparams.grid, "chosen_by": "validation",
            "metric": name, "mode": mode, "scores": {str(k): float(v) for k, v in sorted(scores.items())},
            "global_step": int(global_step)}


def _batch_size(batch: dict[str, Any]) -> int:
    return int(next(v for v in batch.values() if hasattr(v, "shape")).shape[0])
