"""The systems a checkpoint may name, and how one is rebuilt from its checkpoint alone.

A checkpoint's ``medidiff`` record (:meth:`medidiff.lit.system.System.checkpoint_record`) names the system class,
the task and its settings, the network (``net_config``), the system's settings and the model-input contract.
Rebuilding looks every name up in a closed list (:data:`SYSTEMS`, :data:`medidiff.tasks.REGISTRY`,
:data:`medidiff.checkpoint.NETWORKS`) and checks every setting against the signature that receives it: a
checkpoint can choose among known classes, never name code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medidiff.arguments import check_arguments, parameters
from medidiff.callbacks import ChooseSteps
from medidiff.checkpoint import build_network, read_checkpoint, save_checkpoint
from medidiff.data.datamodule import MedicalDataModule
from medidiff.errors import MedidiffError
from medidiff.inference.contract import check_contract
from medidiff.lit.diffusion import DiffusionModule
from medidiff.lit.residual import ResidualDiffusion
from medidiff.lit.supervised import SupervisedModule
from medidiff.lit.system import System
from medidiff.tasks import REGISTRY, Task

SYSTEMS: dict[str, type[System]] = {cls.__name__: cls for cls in (DiffusionModule, SupervisedModule,
                                                                   ResidualDiffusion)}
# settings that name files to read: used once when training starts, never when a checkpoint is loaded
FILE_SETTINGS = ("teacher_ckpt", "predictor_ckpt")


def system_named(class_path: str) -> type[System] | None:
    """The system a configuration's ``class_path`` names (``medidiff.lit.DiffusionModule`` or the class's own module
    path), or None; :class:`~medidiff.lit.distill.DistillationModule` counts as the diffusion system it trains."""
    name = class_path.rpartition(".")[2]
    cls = SYSTEMS.get("DiffusionModule" if name == "DistillationModule" else name)
    return cls if cls is not None and class_path.startswith("medidiff.lit") else None


def load_system(path: str | os.PathLike, *, task: str | None = None) -> tuple[System, dict[str, Any]]:
    """A trained system (in eval mode) from a checkpoint written by ``medidiff fit`` or ``export``, and the data
    module's settings it was trained with; ``task``, if given, must be the checkpoint's task."""
    content = read_checkpoint(path)
    record = content.get("medidiff")
    if not isinstance(record, dict) or record.get("format") != 2:
        raise MedidiffError("is not a medidiff checkpoint of this version (no system record); export it again with "
                            "this version, or train anew", path)
    system = rebuild(record, path, task)
    load_weights(system, content["state_dict"], path)
    system.contract = record.get("contract")
    if system.contract is None:
        raise MedidiffError("holds no model-input contract; export it again from a checkpoint written by medidiff "
                            "fit", path)
    check_contract(system.contract, path, REGISTRY)
    system.validated_sampling = system.contract.get("sampling")
    return system.eval(), data_settings(content.get("datamodule_hyper_parameters", {}), path)


def rebuild(record: dict[str, Any], path: str | os.PathLike, task: str | None = None) -> System:
    """The system a record describes, with fresh weights."""
    name, saved = record.get("system"), record.get("task")
    if not isinstance(name, str) or name not in SYSTEMS:
        raise MedidiffError(f"names no known medidiff system (system={name!r})", path)
    if not isinstance(saved, dict) or saved.get("name") not in REGISTRY:
        raise MedidiffError(f"names no known task ({saved!r})", path)
    if task is not None and saved["name"] != task:
        raise MedidiffError(f"is a {saved['name']} checkpoint, not a {task} one", path)
    net = build_network(record.get("net_config", {}), path)
    settings = system_settings(record.get("settings"), SYSTEMS[name], path)
    try:
        return SYSTEMS[name](net=net, task=rebuild_task(saved, path), **settings)
    except (TypeError, ValueError) as err:  # a combination of settings the system refuses
        raise MedidiffError(f"settings do not fit {name} in this medidiff version ({str(err)[:300]})", path) from None


def rebuild_task(saved: dict[str, Any], path: str | os.PathLike) -> Task:
    cls = REGISTRY[saved["name"]]
    settings = saved.get("settings") or {}
    if not isinstance(settings, dict):
        raise MedidiffError("its task settings are not a mapping", path)
    check_arguments(parameters(cls), settings, path, "task setting")
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:
        raise MedidiffError(f"task settings do not fit {cls.__name__} ({str(err)[:300]})", path) from None


def system_settings(settings: Any, cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """A record's system settings as constructor arguments of ``cls``, each checked against its type and bounds;
    settings that would make medidiff read another file are refused."""
    if not isinstance(settings, dict):
        raise MedidiffError("its system settings are not a mapping", path)
    for key in FILE_SETTINGS:
        if settings.get(key) is not None:
            raise MedidiffError(f"names a file to load ({key}={str(settings[key])[:100]!r}); a checkpoint never makes "
                                "medidiff read other files", path)
    accepted = {name: kind for name, kind in parameters(cls).items() if name not in ("net", "task", "settings")}
    check_arguments(accepted, settings, path)
    return dict(settings)


def data_settings(hparams: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The data module's settings recorded in a checkpoint (used again by ``export --validate-steps``), checked."""
    if not isinstance(hparams, dict):
        raise MedidiffError("its data settings are not a mapping", path)
    settings = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    check_arguments(parameters(MedicalDataModule), settings, path, "data setting")
    return settings


def load_weights(system: System, state: dict[str, Any], path: str | os.PathLike) -> None:
    try:
        missing, unexpected = system.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise MedidiffError(f"weights do not fit the network they claim ({str(err)[:300]})", path) from None
    if missing or unexpected:
        raise MedidiffError(f"weights do not fit the network they claim (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})", path)
    broken = [name for name, tensor in system.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise MedidiffError(f"holds NaN or infinite weights ({', '.join(broken[:3])}); the training diverged or the "
                            "file is damaged", path)


def export(system: System, data: dict[str, Any], path: str | os.PathLike, half: bool = True) -> Path:
    """Write a small inference checkpoint: weights, the system record and the data settings, no optimizer state
    (atomic). With ``half`` the floating-point weights are stored as float16 (half the size; loading casts them
    back to float32, a relative change of about 1e-3 per weight)."""
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in system.state_dict().items()}
    content = {"state_dict": state, "hyper_parameters": system.settings(), "medidiff": system.checkpoint_record(),
               "datamodule_hyper_parameters": dict(data)}
    return save_checkpoint(content, path)


def validate_steps(system: System, data: dict[str, Any], steps: list[int]) -> dict[str, Any]:
    """Choose the sampler step count again on the card's validation split (every validation batch sampled at each
    count, :class:`~medidiff.callbacks.ChooseSteps`) and record it in the system's contract."""

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ChooseSteps(sorted(set(steps)), batches=10**6)])
    trainer.validate(system, datamodule=MedicalDataModule(**data), verbose=False)
    system.contract = system.contract | {"sampling": system.contract_sampling()}
    return system.contract
