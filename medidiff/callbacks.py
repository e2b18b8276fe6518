"""Lightning callbacks that the shipped configs use, and the progress bar ``medidiff fit`` shows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar


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
