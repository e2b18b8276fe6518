"""Load checkpoints without running code hidden in them, and only intact ones.

Every load verifies the archive's checksums, then goes through ``torch.load(..., weights_only=True)``, which
refuses pickled Python objects other than tensors and plain containers. The network is rebuilt from the
``net_config`` every medidiff checkpoint carries, only as one of a closed list of classes with plain-data
arguments; the module's settings and the model-input contract are checked field by field before use.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medidiff.arguments import check_arguments, parameters
from medidiff.errors import MedidiffError
from medidiff.nets import ConditionalUNet, PlainUNet

# the closed list of networks a checkpoint may ask for
NETWORKS: dict[str, type[torch.nn.Module]] = {f"medidiff.nets.{c.__name__}": c for c in (ConditionalUNet, PlainUNet)}
SHARED_PREFIX = "denoiser.model."  # older checkpoints stored "net.*" twice, also under this prefix
LEGACY_RECORD_KEYS = ("net_config", "task", "module")  # bookkeeping older checkpoints kept in hyper_parameters


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True`` after its integrity is verified; clear errors
    for every failure."""
    path = Path(path)
    if not path.is_file():
        raise MedidiffError("checkpoint not found" if not path.exists() else "is not a regular file", path)
    if path.stat().st_size == 0:
        raise MedidiffError("is an empty file, not a checkpoint", path)
    verify_archive(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(err))
        names = f" (it names {found.group(1)})" if found else ""
        raise MedidiffError(f"refused to load: the checkpoint holds pickled Python objects{names} besides weights, "
                            "and loading them could run code; medidiff loads weights only", path) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise MedidiffError(f"is not a readable checkpoint ({str(err).splitlines()[0][:200]})", path) from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict) \
            or not isinstance(content.get("hyper_parameters"), dict):
        raise MedidiffError("is not a medidiff checkpoint (no state_dict / hyper_parameters)", path)
    return content


def verify_archive(path: Path) -> None:
    """``torch.save`` writes a zip archive with a CRC-32 of every record, which ``torch.load`` never checks: a
    damaged or altered weight loaded silently and changed every result. Check them all first."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise MedidiffError("is not a checkpoint (not a PyTorch zip archive written by torch.save)", path) from None
    if damaged is not None:
        raise MedidiffError(f"is damaged: the record {damaged.split('/', 1)[-1]} fails its checksum (the file "
                            "changed after it was written); use an intact copy", path)


def build_network(config: dict[str, Any], path: str | os.PathLike) -> torch.nn.Module:
    """Instantiate ``{"class_path", "init_args"}``: one of :data:`NETWORKS`, with plain-data arguments of the
    names medidiff writes (``net.config``) within bounds. Nothing in a checkpoint names a module, a URL or a
    download flag: MONAI networks such as HoVerNet download weights while they are built."""
    config = config if isinstance(config, dict) else {}
    class_path = str(config.get("class_path", ""))
    cls = NETWORKS.get(class_path)
    if cls is None:
        raise MedidiffError(f"refused network class '{class_path[:100]}': checkpoints are rebuilt only with "
                            f"{', '.join(NETWORKS)}", path)
    init_args = config.get("init_args", {})
    if not isinstance(init_args, dict):
        raise MedidiffError(f"network settings of {class_path} are not a mapping", path)
    check_arguments(parameters(cls), init_args, path, "network setting")
    try:
        return cls(**init_args)
    except (TypeError, ValueError, AssertionError) as err:
        raise MedidiffError(f"network settings do not fit {class_path} ({str(err)[:300]})", path) from None


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_checkpoint` of a checkpoint Lightning can resume: one written by ``medidiff fit``."""
    content = read_checkpoint(path)
    if "pytorch-lightning_version" not in content:
        raise MedidiffError("is an inference checkpoint (weights and settings only, as medidiff export writes): it "
                            "holds no training state to resume; give a checkpoint written by medidiff fit", path)
    return content


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with every load through :func:`read_training_checkpoint` (``weights_only``
    ignored) and every save atomic (:func:`save_checkpoint`): a full disk left a truncated ``last.ckpt``."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_training_checkpoint(path)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_checkpoint(checkpoint, path)


def save_checkpoint(content: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file and a rename: an interrupted or failed write (disk full) leaves the
    previous checkpoint in place and no partial one; a failure is one :class:`MedidiffError`."""
    from medidiff.io import atomic_write

    try:
        return atomic_write(path, lambda temporary: torch.save(content, temporary))
    except RuntimeError as err:  # torch reports a failed write (ENOSPC) as a RuntimeError of its zip writer
        raise MedidiffError(f"could not be written ({str(err).splitlines()[0][:200]}); is the disk full?",
                            path) from None


def checkpoint_record(content: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """What the checkpoint says about itself: ``task``, ``module``, ``net_config`` and ``contract``.

    Written by :meth:`medidiff.lit.base.MedidiffModule.on_save_checkpoint` under ``"medidiff"``; checkpoints
    from before that kept the first three among the hyperparameters and had no contract.
    """
    record = content.get("medidiff")
    if isinstance(record, dict):
        return dict(record)
    hparams = content["hyper_parameters"]
    found = hparams.get("task")
    # checkpoints written before the "module" key existed were all diffusion segmenters
    module = hparams.get("module") or {"segmentation": "SegmentationDiffusion"}.get(found)
    return {"task": found, "module": module, "net_config": hparams.get("net_config", {}), "contract": None}


def load_module(path: str | os.PathLike, *, task: str | None = None, spatial_dims: int | None = None):
    """Rebuild a trained task module (in eval mode) and return it with the data module's settings.

    Args:
        path: a checkpoint written by ``medidiff fit`` (Lightning) or ``medidiff export``.
        task: if given, the checkpoint must be of this task.
        spatial_dims: if given, the network must be of this dimension.

    Returns:
        ``(module, data_hparams)``; ``data_hparams`` holds the card name, patch size etc. used in training, and
        ``module.contract`` the model-input contract (:mod:`medidiff.inference.contract`; rebuilt from the card
        for checkpoints that predate contracts).
    """
    from medidiff.data.cards import TASKS
    from medidiff.inference.contract import check_contract
    from medidiff.lit import MODULES

    content = read_checkpoint(path)
    record = checkpoint_record(content, path)
    module_name = record.get("module")
    if not isinstance(module_name, str) or module_name not in MODULES:
        raise MedidiffError(f"names no known medidiff module (module={module_name!r})", path)
    if task is not None and record.get("task") != task:
        raise MedidiffError(f"is a {record.get('task')} checkpoint, not a {task} one", path)
    net = build_network(record.get("net_config", {}), path)
    if spatial_dims is not None and getattr(net, "spatial_dims", spatial_dims) != spatial_dims:
        raise MedidiffError(f"holds a {net.spatial_dims}D network but the input is {spatial_dims}D", path)
    options = module_settings(content["hyper_parameters"], MODULES[module_name], path)
    try:
        module = MODULES[module_name](net=net, **options)
    except (TypeError, ValueError) as err:  # a combination of settings the module refuses
        raise MedidiffError(f"settings do not fit {module_name} in this medidiff version ({str(err)[:300]})",
                            path) from None
    # the denoiser used to be stored beside the network: the very same weights, kept once now
    state = {k: v for k, v in content["state_dict"].items() if not k.startswith(SHARED_PREFIX)}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise MedidiffError(f"weights do not fit the network they claim ({str(err)[:300]})", path) from None
    if missing or unexpected:
        raise MedidiffError(f"weights do not fit the network they claim (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})", path)
    broken = [name for name, tensor in module.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise MedidiffError(f"holds NaN or infinite weights ({', '.join(broken[:3])}); the training diverged or the "
                            "file is damaged", path)
    data_hparams = data_settings(content.get("datamodule_hyper_parameters", {}), path)
    module.contract = record.get("contract") or _legacy_contract(data_hparams, module, path)
    if module.contract is not None:
        check_contract(module.contract, path, TASKS)
    return module.eval(), data_hparams


def data_settings(hparams: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The data module's settings recorded in a checkpoint (rebuilt by ``export --refresh-contract``), checked."""
    from medidiff.data.datamodule import MedicalDataModule

    if not isinstance(hparams, dict):
        raise MedidiffError("its data settings are not a mapping", path)
    settings = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    check_arguments(parameters(MedicalDataModule), settings, path, "data setting")
    return settings


# settings that name files to read: used once when training starts, never when a checkpoint is loaded
FILE_SETTINGS = ("teacher_ckpt", "predictor_ckpt")


def module_settings(hparams: dict[str, Any], cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's hyperparameters as constructor arguments of ``cls``, each checked against its type and
    bounds; settings that would make medidiff read another file are refused."""
    options = {k: v for k, v in hparams.items() if not str(k).startswith("_") and k not in LEGACY_RECORD_KEYS}
    for key in FILE_SETTINGS:
        if options.get(key) is not None:
            raise MedidiffError(f"names a file to load ({key}={str(options[key])[:100]!r}); a checkpoint never makes "
                                "medidiff read other files", path)
    accepted = {name: kind for name, kind in parameters(cls).items() if name != "net"}
    check_arguments(accepted, options, path)
    return options


def _legacy_contract(data_hparams: dict[str, Any], module: Any, path: str | os.PathLike) -> dict[str, Any] | None:
    from medidiff.inference.contract import legacy_contract

    if "card" not in data_hparams:
        return None
    try:
        return legacy_contract(data_hparams, module)
    except MedidiffError as err:
        raise MedidiffError(f"predates model-input contracts and its card cannot be found ({err})", path) from None


def refresh_contract(module, data_hparams: dict[str, Any], steps: list[int] | None = None) -> dict[str, Any]:
    """Rebuild ``module.contract`` from the data it was trained on (the card's training files give the
    intensity profile), and with ``steps``, choose the sampler step count again on the card's validation split
    (every validation batch sampled at each count; the best by the task's metric is recorded).

    For checkpoints that predate contracts, or trained without ``val_steps``.
    """
    import lightning as L

    from medidiff.data.datamodule import MedicalDataModule
    from medidiff.inference.contract import build_contract

    settings = {k: v for k, v in data_hparams.items() if not k.startswith("_")}
    datamodule = MedicalDataModule(**settings)
    if steps:
        saved = {key: module.hparams.get(key) for key in ("val_steps", "val_sampling_batches")}
        module.hparams.val_steps, module.hparams.val_sampling_batches = sorted(set(steps)), 10**6
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        try:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        finally:
            module.hparams.update(saved)
    module.contract = build_contract(datamodule, module) | {"sampling": module.contract_sampling()}
    return module.contract


def export(module, data_hparams: dict[str, Any], path: str | os.PathLike, half: bool = True) -> Path:
    """Write a small inference checkpoint: weights and settings only, no optimizer state (atomic).

    With ``half`` the floating-point weights are stored as float16 (half the size; ``load_state_dict`` casts
    them back to the module's float32 parameters, a relative change of about 1e-3 per weight).
    """
    path = Path(path)
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in module.state_dict().items()}
    hparams = {k: v for k, v in module.hparams.items() if k not in LEGACY_RECORD_KEYS}
    content = {"state_dict": state, "hyper_parameters": hparams, "medidiff": module.checkpoint_record(),
               "datamodule_hyper_parameters": dict(data_hparams)}
    return save_checkpoint(content, path)
