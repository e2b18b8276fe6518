"""Write results that line up with the scans they came from: NIfTI carrying the reference's geometry (both its
qform and sform), preview PNGs and strict JSON, every file atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from PIL import Image

from medidiff.errors import MedidiffError
from medidiff.io.grid import respaced_affine
from medidiff.io.reading import NIFTI_SUFFIXES, read, source_path

# A prefix of medidiff's own: a pattern like ``.<name>.<8 characters><suffix>`` also matched users' hidden files.
_PARTIAL_PREFIX = ".medidiff-partial-"


def write(
    array: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    like: MetaTensor | str | os.PathLike | None = None,
    spacing: tuple[float, ...] | None = None,
) -> Path:
    """Write a result as NIfTI carrying the reference's geometry.

    Args:
        array: ``(C, *spatial)`` or ``(*spatial)`` for a single channel; several channels become
            a 4D NIfTI with channels last. Integer arrays are stored as integers, others as float32.
        path: output file, ``.nii`` or ``.nii.gz``; parent folders are created.
        like: reference scan (``MetaTensor`` or a path ``read`` accepts) whose affine is taken back;
            when None, ``array``'s own affine (if it is a ``MetaTensor``) or identity is used.
        spacing: new voxel size for a resampled output (super-resolution): the direction is kept,
            the voxel size replaced and the origin moved so the field of view's outer edges stay put.

    Returns:
        the path written.
    """
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise MedidiffError("output must be a NIfTI file ending in .nii or .nii.gz", path)
    reference = like if like is not None else (array if isinstance(array, MetaTensor) else None)
    for source in {source_path(reference), source_path(array)}:
        _refuse_overwrite(path, source)
    data = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    affine, ref_shape = _reference_geometry(reference)
    data = _drop_channel_axis(data, ref_shape, resampled=spacing is not None, path=path)
    (qform, qform_code), (sform, sform_code) = _reference_forms(reference, affine)
    if spacing is not None:
        affine, qform, sform = (None if a is None else respaced_affine(a, spacing) for a in (affine, qform, sform))
    data = data.astype(np.float32) if not np.issubdtype(data.dtype, np.integer) else _small_int(data)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    atomic_write(path, lambda tmp: nib.save(image, tmp))
    return path


def _drop_channel_axis(data: np.ndarray, ref_shape: tuple[int, ...] | None, *, resampled: bool,
                       path: Path) -> np.ndarray:
    """``(C, *spatial)`` or ``(*spatial)`` to NIfTI layout ``(*spatial[, C])``, checked against the reference."""
    if ref_shape is None:  # no reference: up to 3 dims are spatial, a 4th leading one is channels
        channel_first = data.ndim == 4
    elif data.shape == ref_shape or (resampled and data.ndim == len(ref_shape)):
        channel_first = False
    elif data.shape[1:] == ref_shape or (resampled and data.ndim == len(ref_shape) + 1):
        channel_first = True
    else:
        raise MedidiffError(f"array shape {data.shape} does not match the reference grid {ref_shape}; invert "
                            "the transforms first, or pass spacing= for a resampled output", path)
    if not channel_first:
        return data
    if data.shape[0] == 1:
        return data[0]
    channels_last = np.moveaxis(data, 0, -1)
    # several channels on a 2D grid: the NIfTI vector layout (X, Y, 1, 1, C), which reads back as 2D
    return channels_last[:, :, None, None] if data.ndim == 3 else channels_last


def write_png(array2d: torch.Tensor | np.ndarray, path: str | os.PathLike,
              *, value_range: tuple[float, float] | None = None) -> Path:
    """Write a 2D preview PNG.

    Args:
        array2d: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)``; rows first, as ``read`` returns 2D images.
        path: output ``.png``.
        value_range: intensities mapped to 0..255; default: the array's min and max (uint8 as is).
    """
    data = np.asarray(array2d.detach().cpu() if isinstance(array2d, torch.Tensor) else array2d)
    if data.ndim == 3:
        data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[-1] != 3):
        raise ValueError(f"write_png needs (H, W), (1, H, W) or (3, H, W), got shape {np.shape(array2d)}")
    if data.dtype != np.uint8 or value_range is not None:
        lo, hi = value_range or (float(np.nanmin(data)), float(np.nanmax(data)))
        data = np.clip((data.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
        data = np.round(np.nan_to_num(data) * 255).astype(np.uint8)
    path = Path(path)
    atomic_write(path, lambda tmp: Image.fromarray(data).save(tmp, format="PNG"))
    return path


def _reference_geometry(reference: Any) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """(4x4 affine, spatial shape) of a MetaTensor or a file; identity and None when unknown."""
    if reference is None:
        return np.eye(4), None
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file():
            try:
                header = nib.load(str(path))  # header only: no voxel data read
            except Exception as err:  # noqa: BLE001 - nibabel raises many types on a corrupt header
                raise MedidiffError(f"cannot be read ({type(err).__name__}: {err})", path) from err
            return header.affine.astype(np.float64), tuple(header.shape[:3])
        reference = read(path)
    affine = getattr(reference, "affine", None)
    shape = tuple(reference.shape[1:]) if hasattr(reference, "shape") else None
    return (np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)), shape


def _reference_forms(reference: Any, affine: np.ndarray) -> tuple[tuple[np.ndarray | None, int], ...]:
    """``((qform, code), (sform, code))`` to write: a NIfTI reference's own two, each kept, since they may differ
    (ITK-based tools place a scan by its qform, nibabel and MONAI by its sform); otherwise ``affine`` as both."""
    header = _nifti_header(reference, affine)
    if header is None:
        return tuple((affine, code) for code in _header_codes(reference))
    return tuple((form, int(code)) for form, code in (header.get_qform(coded=True), header.get_sform(coded=True)))


def _nifti_header(reference: Any, affine: np.ndarray) -> Any:
    """The header of the NIfTI file ``reference`` is or was read from, unless its geometry has changed since
    (reoriented or resampled: the file's forms no longer place it)."""
    path = source_path(reference)
    if path is None or not path.name.lower().endswith(NIFTI_SUFFIXES) or not path.is_file():
        return None
    header = nib.load(str(path)).header
    if isinstance(reference, (str, os.PathLike)):
        return header
    same = affine.shape == (4, 4) and np.allclose(header.get_best_affine(), affine, atol=1e-4)
    return header if same else None


def _header_codes(reference: Any) -> tuple[int, int]:
    """The qform and sform codes of a NIfTI reference (file or MetaTensor read from one), so outputs keep them;
    otherwise 1 and 1 (both forms "scanner", so ITK-based viewers agree)."""
    path = source_path(reference)
    meta = getattr(reference, "meta", {})
    if "qform_code" in meta and "sform_code" in meta:
        return int(meta["qform_code"]), int(meta["sform_code"])
    if path is not None and path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file():
        header = nib.load(str(path)).header
        return int(header["qform_code"]), int(header["sform_code"])
    return 1, 1


def _small_int(data: np.ndarray) -> np.ndarray:
    for dtype in (np.uint8, np.int16, np.int32):
        if data.min() >= np.iinfo(dtype).min and data.max() <= np.iinfo(dtype).max:
            return data.astype(dtype)
    return data.astype(np.int64)


def _refuse_overwrite(path: Path, source: Path | None) -> None:
    if source is None or not source.exists():
        return
    target = path.resolve()
    if source.is_dir() and source.resolve() in target.parents:
        raise MedidiffError(f"refusing to write into the input DICOM folder {source}", path)
    if target == source.resolve() or (path.exists() and os.path.samefile(path, source)):
        raise MedidiffError("refusing to overwrite the input file; choose another output path", path)


def atomic_write(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Write a file through a temporary file in the same folder, then rename: readers never see half a file,
    an interrupted write leaves none (a killed process can leave a ``.medidiff-partial-<name>.*`` temporary, which
    :func:`clear_partial_writes` removes), and the file gets the permissions of any new file (the umask), not the
    temporary's 0600.

    Args:
        path: the file to write; missing parent folders are created.
        save: writes the content to the temporary path it is given.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MedidiffError(f"cannot create the output folder {path.parent} ({err.strerror})", path) from None
    if not os.access(path.parent, os.W_OK):
        raise MedidiffError(f"the output folder {path.parent} is not writable", path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_PARTIAL_PREFIX}{path.name[:120]}.", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise MedidiffError(f"output folder is not writable ({err.strerror})", path.parent) from None
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise MedidiffError(f"could not be written ({err.strerror or err})", path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

def clear_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Remove what :func:`atomic_write` leaves when its process is killed (``kill -9``, power loss):
    ``.medidiff-partial-<name>.<8 random characters><suffix>`` temporaries anywhere below ``folder``."""
    removed = []
    for path in Path(folder).rglob(f"{_PARTIAL_PREFIX}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_json(path: str | os.PathLike, content: Any) -> Path:
    """Strict JSON (NaN and infinities as null), written atomically."""
    import json

    text = json.dumps(strict_json(content), indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def strict_json(obj: Any) -> Any:
    """``obj`` as :func:`write_json` stores it: NaN and infinities as None, numpy scalars as Python numbers, paths
    as text, tuples as lists and mapping keys as text (compare settings with a stored result through it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return strict_json(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj




def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
