"""What every medidiff system shares: a network and a task held by composition, plain tensors in training, the
model-input contract built when fitting starts, and the checkpoint record that rebuilds the system.

A *system* is a LightningModule that trains and predicts with a network for a task (LightningCLI's
``class_path`` / ``init_args``): :class:`~medidiff.lit.diffusion.DiffusionModule`,
:class:`~medidiff.lit.supervised.SupervisedModule` and :class:`~medidiff.lit.residual.ResidualDiffusion`. Every
system has one prediction method, ``predict(inputs, **sampling) -> (N, B, C, *spatial)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from monai.data import MetaTensor
from torch import nn

from medidiff.errors import MedidiffError
from medidiff.inference.contract import build_contract
from medidiff.tasks import Task


class System(L.LightningModule):
    """Base of the systems.

    Args:
        net: the network (``class_path`` / ``init_args`` in a configuration).
        task: the task (``class_path: medidiff.tasks.Segmentation`` ...).
    """

    iterative: ClassVar[bool] = False  # predictions take sampler steps (progress is reported per step)

    def __init__(self, net: nn.Module, task: Task):
        super().__init__()
        self.net, self.task = net, task
        self.contract: dict[str, Any] | None = None
        self.validated_sampling: dict[str, Any] | None = None  # the step count validation chose (ChooseSteps)

    @classmethod
    def condition_channels(cls, task_channels: int, diffused_channels: int) -> int:
        """Condition channels of this system's network for a task's condition and diffused target."""
        return task_channels

    @property
    def spatial_dims(self) -> int:
        return int(self.net.spatial_dims)

    @property
    def stochastic(self) -> bool:
        """Whether repeated predictions differ (ensembles draw independent members)."""
        return True

    def settings(self) -> dict[str, Any]:
        """The constructor arguments besides ``net`` and ``task``, as plain data (a checkpoint rebuilds with them)."""
        return {k: v for k, v in self.hparams.items() if not str(k).startswith("_")}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training and validation need no metadata: every op on a MetaTensor goes through Python metadata
        tracking, which made a training step several times slower."""
        return plain_tensors(batch)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "card"):
            self.contract = build_contract(datamodule, self) | {"sampling": self.contract_sampling()}

    def contract_sampling(self) -> dict[str, Any] | None:
        """The sampler settings recorded in the contract (diffusion systems: the validation's choice)."""
        return None

    def checkpoint_record(self) -> dict[str, Any]:
        """How to rebuild this system from a checkpoint alone (see :mod:`medidiff.lit.registry`)."""
        contract = self.contract
        if contract is not None:
            contract = contract | {"sampling": self.contract_sampling() or contract.get("sampling")}
        return {"format": 2, "system": self.record_name(), "task": {"name": self.task.name,
                "settings": dict(self.task.config)}, "net_config": net_config(self.net),
                "settings": self.settings(), "contract": contract}

    def record_name(self) -> str:
        return type(self).__name__

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["medidiff"] = self.checkpoint_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming builds from the configuration, never from the checkpoint: the two must agree."""
        record = checkpoint.get("medidiff") or {}
        saved, mine = record.get("net_config"), net_config(self.net)
        if saved and saved != mine:
            raise MedidiffError(f"the checkpoint holds the network {saved}, the configuration builds {mine}; resume "
                                "with the configuration the checkpoint was trained with")
        self.contract = record.get("contract")
        sampling = (self.contract or {}).get("sampling") or {}
        if sampling.get("chosen_by") == "validation":
            self.validated_sampling = sampling


def net_config(net: nn.Module) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a network that records its arguments in ``net.config``."""
    cls = type(net)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(getattr(net, "config", {}))}


def plain_tensors(batch: Any) -> Any:
    """MONAI MetaTensors as plain tensors, throughout a batch."""
    if isinstance(batch, MetaTensor):
        return batch.as_tensor()
    if isinstance(batch, dict):
        return {key: plain_tensors(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(plain_tensors(value) for value in batch)
    return batch
