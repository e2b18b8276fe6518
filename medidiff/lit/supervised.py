"""The deterministic bar diffusion must meet: a supervised network for any task that has a supervised form
(segmentation: MONAI's UNet with Dice + cross-entropy; image tasks: a regression UNet predicting a residual on
the condition, with the task's data-consistency step applied once to its output).

Same data module, checkpoint format and ``medidiff infer`` / ``medidiff evaluate`` commands as the diffusion
system, so the two are compared by identical code paths (BASELINES.md: 0.807 Dice on DRIVE after 8 CPU minutes).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from medidiff.lit.system import System
from medidiff.tasks import Task


class SupervisedModule(System):
    """Supervised training of ``net`` for ``task``.

    Args:
        net: ``medidiff.nets.PlainUNet`` (logits of the classes, or a residual image).
        task: the task; its ``supervised_*`` methods say how the network's output is trained and read.
        lr, weight_decay: AdamW, constant learning rate (as the baseline in BASELINES.md).
        roi_size: sliding-window size of segmentation networks over whole images (None: whole image in one pass);
            image tasks window with the training patch over volumes larger than it.
        seed: base seed of MC-dropout members.
    """

    def __init__(self, net: nn.Module, task: Task, lr: float = 1e-3, weight_decay: float = 1e-4,
                 roi_size: Sequence[int] | None = None, seed: int = 0):
        super().__init__(net, task)
        self.save_hyperparameters(ignore=["net", "task"])

    @property
    def stochastic(self) -> bool:
        """Only with dropout (MC dropout) do repeated predictions differ."""
        return getattr(self.net, "config", {}).get("dropout", 0) > 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.task.supervised_loss(self.net, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=_size(batch))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, prediction = self.task.supervised_validation(self.net, batch)
        self.log("val/loss", loss, batch_size=_size(batch))
        for name, value in self.task.sample_metrics(prediction, batch).items():
            self.log(f"val/{name}", value, batch_size=_size(batch))

    def on_validation_epoch_end(self) -> None:
        self.task.end_validation(bool(getattr(self._trainer, "sanity_checking", False)))

    @torch.no_grad()
    def predict(self, inputs: dict[str, Any], *, ensemble: int = 1, seed: int | None = None,
                window: Sequence[int] | None = None, **ignored_sampling: Any) -> Tensor:
        """Predictions ``(N, B, C, *spatial)`` shaped like N diffusion ensemble members: one pass, or with
        ``ensemble`` > 1 and a network built with dropout, N seeded MC-dropout members. Sampler settings are
        accepted and ignored, so file-level inference treats every system alike."""
        if ensemble == 1 or not self.stochastic:
            return self._prediction(inputs, window)[None]
        return torch.stack(self._dropout_members(inputs, window, ensemble, seed))

    def _prediction(self, inputs: dict[str, Any], window: Sequence[int] | None) -> Tensor:
        return self.task.supervised_prediction(self.net, inputs, window, self.hparams.roi_size)

    def _dropout_members(self, inputs: dict[str, Any], window: Sequence[int] | None, members: int,
                         seed: int | None) -> list[Tensor]:
        dropouts = [m for m in self.net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        device = next(iter(inputs.values())).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seeded members that leave the global generator alone
            torch.manual_seed(self.hparams.seed if seed is None else seed)
            for module in dropouts:
                module.train()
            try:
                return [self._prediction(inputs, window) for _ in range(members)]
            finally:
                for module in dropouts:
                    module.eval()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def _size(batch: dict[str, Any]) -> int:
    return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])
