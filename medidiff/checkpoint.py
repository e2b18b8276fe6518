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
from medidiff.io import atomic_write
from medidiff.nets import ConditionalUNet, PlainUNet

# the closed list of networks a checkpoint may ask for
NETWORKS: dict[str, type[torch.nn.Module]] = {f"medidiff.nets.{c.__name__}": c for c in (ConditionalUNet, PlainUNet)}


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
    try:
        return atomic_write(path, lambda temporary: torch.save(content, temporary))
    except RuntimeError as err:  # torch reports a failed write (ENOSPC) as a RuntimeError of its zip writer
        raise MedidiffError(f"could not be written ({str(err).splitlines()[0][:200]}); is the disk full?",
                            path) from None
