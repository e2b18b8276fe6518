"""Lightning callbacks that the shipped configs use."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also writes ``last.ckpt`` when training stops between two scheduled
    saves (a ``max_time`` limit, or ``max_steps`` not a multiple of ``every_n_train_steps``).

    Lightning writes ``last.ckpt`` at the end of training only when it never wrote one, so a run saved every 50
    steps that stops at step 183 would keep step 150. Saving every step instead (what one-volume configs did, as
    their epochs are one step long) wrote a 3D model to disk after each step.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
