"""What :func:`medidiff.io.read` agrees to open: regular files and folders only, and images within a memory
budget (``$MEDIDIFF_MAX_IMAGE_BYTES``), judged from their headers before any voxel is allocated."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from medidiff.errors import MedidiffError

BUDGET_VARIABLE = "MEDIDIFF_MAX_IMAGE_BYTES"


def _special_kind(path: Path) -> str | None:
    """"a FIFO", "a device" or "a socket" for what is neither a regular file nor a folder: opening a FIFO blocks
    until something writes to it, so this is asked of the entry itself, before anything opens it."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _memory_budget() -> int:
    """Bytes one image may take as float32: ``$MEDIDIFF_MAX_IMAGE_BYTES``, else a quarter of the physical memory
    (an image is copied a few times on its way through preprocessing and the network)."""
    value = os.environ.get(BUDGET_VARIABLE, "").strip()
    if not value:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    try:
        budget = int(float(value))
    except (ValueError, OverflowError):
        budget = 0
    if budget <= 0:
        raise MedidiffError(f"{BUDGET_VARIABLE}={value!r} is not a positive number of bytes")
    return budget


def _check_memory_budget(path: Path, shape: tuple[int, ...], channels: int = 1) -> None:
    """Refuse an image larger than the budget from its declared size, before any voxel is allocated: a small file
    can declare far more (zeros deflate 1000:1), and running out of memory midway is a crash, not a message."""
    shape = tuple(int(n) for n in shape)
    needed, budget = math.prod(shape) * max(int(channels), 1) * 4, _memory_budget()
    if needed > budget:
        many = f" x {channels} channels" if channels > 1 else ""
        raise MedidiffError(f"declares {shape} voxels{many} ({needed / 1e9:.3g} GB as float32), more than the memory "
                            f"budget of {budget / 1e9:.3g} GB per image (a quarter of this machine's memory unless "
                            f"{BUDGET_VARIABLE} sets it, in bytes)", path)
