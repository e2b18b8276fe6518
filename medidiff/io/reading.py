"""Read one scan or 2D image into a MONAI ``MetaTensor`` ``(C, *spatial)``: NIfTI (nibabel), ITK image files
(SimpleITK), 2D images (Pillow) and DICOM series folders (:mod:`medidiff.io.dicom`), with every check a file's
header and values must pass (truncation, corrupt bytes, voxel types, NaN/Inf, degenerate affines, dimensions,
channels, label values, the memory budget of :mod:`medidiff.io.limits`).
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from PIL import Image

from medidiff.errors import MedidiffError
from medidiff.io.dicom import _read_dicom_series, _read_itk
from medidiff.io.limits import _check_memory_budget, _special_kind

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_COLOUR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "P", "LA", "PA")
# Deflate cannot compress more than 1032:1, so a .nii.gz header claiming more voxel bytes than that is lying.
_MAX_DEFLATE_RATIO = 1032


def read(
    path: str | os.PathLike,
    *,
    kind: Literal["image", "label"] = "image",
    expected_ndim: int | None = None,
    channels: int | None = None,
) -> MetaTensor:
    """Read one scan or 2D image.

    Args:
        path: a NIfTI file, an ITK image file, a 2D image, or a folder holding one DICOM series.
        kind: ``"image"`` gives float32; ``"label"`` gives int64 and checks the values are integers.
        expected_ndim: number of spatial dimensions required (2 or 3); a 4D volume where 3D is
            expected is an error instead of being read as channels.
        channels: number of channels required, if known.

    Returns:
        ``MetaTensor`` ``(C, *spatial)`` with the metadata listed in the module docstring.

    Raises:
        MedidiffError: missing, unreadable or truncated file (any decoder error), a header claiming more
            data than the file holds, a DICOM series with an unreadable or missing slice, non-numeric voxel
            types, no voxels, NaN/Inf voxels or affine, a degenerate affine, wrong dimensionality or channel
            count, non-integer label values.
    """
    path = Path(path)
    if not path.exists():
        raise MedidiffError("file not found", path)
    if special := _special_kind(path):
        raise MedidiffError(f"is not a regular file ({special}); medidiff reads image files and DICOM folders", path)
    array, affine, extra = _read_any(path, kind)
    if array.size == 0:
        raise MedidiffError(f"holds no voxels (array shape {array.shape})", path)
    array = _channel_first(array, path, expected_ndim)
    if channels is not None and array.shape[0] != channels:
        raise MedidiffError(f"has {array.shape[0]} channel(s) but {channels} expected "
                            f"(array shape {tuple(array.shape)})", path)
    return _to_metatensor(_checked_values(array, path, kind), affine, path, extra)


def source_path(reference: Any) -> Path | None:
    """The file a ``MetaTensor`` (or path) was read from, or None when unknown."""
    if isinstance(reference, (str, os.PathLike)):
        return Path(reference)
    name = getattr(reference, "meta", {}).get("filename_or_obj")
    return Path(name) if isinstance(name, (str, os.PathLike)) and str(name) else None

def _read_any(path: Path, kind: str = "image") -> tuple[np.ndarray, np.ndarray, dict]:
    """Dispatch on the file type; returns (array in file axis order, 4x4 RAS affine, extra meta)."""
    name = path.name.lower()
    if path.is_dir():
        decode = _read_dicom_series
    elif name.endswith(NIFTI_SUFFIXES):
        decode = _read_nifti
    elif name.endswith(IMAGE_2D_SUFFIXES):
        decode = lambda p: (_read_2d(p, kind == "label"), np.eye(4), {"spacing_known": False})  # noqa: E731
    elif name.endswith(ITK_SUFFIXES) or name.endswith(".dcm"):
        decode = _read_itk_file
    else:
        raise MedidiffError(f"unknown file type; expected one of {NIFTI_SUFFIXES + IMAGE_2D_SUFFIXES + ITK_SUFFIXES}"
                            " or a DICOM folder", path)
    try:
        array, affine, extra = decode(path)
    except MedidiffError:
        raise
    except MemoryError:
        raise MedidiffError("is too large to read into memory", path) from None
    except (AttributeError, NameError, ImportError):
        raise  # a bug in the reading code, not a corrupt file
    except Exception as err:  # noqa: BLE001 - nibabel, gzip, Pillow and ITK raise many types on corrupt bytes
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise MedidiffError(f"cannot be read, the file looks corrupt or truncated "
                            f"({type(err).__name__}: {detail})", path) from err
    if array.dtype.kind not in "biuf":
        raise MedidiffError(f"has voxel type {array.dtype}; medidiff reads integer or floating-point images", path)
    if not np.isfinite(affine).all():
        raise MedidiffError("has a non-finite voxel-to-world transform in its header (pixdim, qform or sform)",
                            path)
    return np.asarray(array), affine, extra


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """NIfTI through nibabel, checking the header against the file size before any voxel is read."""
    img = nib.load(str(path))
    header = img.header
    shape, dtype = header.get_data_shape(), header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise MedidiffError(f"has voxel type {dtype} (NIfTI datatype {int(header['datatype'])}); medidiff reads "
                            "integer or floating-point images", path)
    claimed = int(header.get_data_offset()) + math.prod(int(n) for n in shape) * dtype.itemsize
    size = path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    if claimed > size * (_MAX_DEFLATE_RATIO if compressed else 1):
        raise MedidiffError(f"cannot be read, the file looks corrupt or truncated: its header claims "
                            f"{tuple(shape)} voxels of {dtype} ({claimed} bytes) but the file holds {size} bytes"
                            f"{' compressed' if compressed else ''}", path)
    _check_memory_budget(path, shape)
    if compressed:
        # decompress the whole stream so that gzip checks its CRC: nibabel reads only the bytes the header asks
        # for and never reaches the checksum, so flipped bytes inside the data came back as silent garbage
        img = nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))
    _check_voxel_size(type(img.header), path, compressed)
    codes = {"qform_code": int(header["qform_code"]), "sform_code": int(header["sform_code"])}
    return np.asanyarray(img.dataobj), img.affine.astype(np.float64), codes


def _check_voxel_size(header_class: Any, path: Path, compressed: bool) -> None:
    """A zero or negative voxel size in pixdim where no sform overrides it: nibabel silently makes it 1 mm."""
    with (gzip.open if compressed else open)(path, "rb") as f:
        raw = header_class.from_fileobj(f, check=False)  # as stored, before nibabel's fixes
    spatial = int(min(max(int(raw["dim"][0]), 1), 3))
    zooms = [float(z) for z in raw["pixdim"][1:1 + spatial]]
    if int(raw["sform_code"]) == 0 and any(not z > 0 for z in zooms):
        raise MedidiffError(f"has voxel size {tuple(zooms)} in its header (pixdim) and no sform to say otherwise; "
                            "set the real voxel size", path)


def _read_2d(path: Path, label: bool = False) -> np.ndarray:
    """Pillow image to ``(H, W)`` (grey) or ``(H, W, 3)`` (colour) — rows first, as on screen.

    A palette (GIF masks) or grey+alpha image whose colours are all grey is one channel of those grey values. A
    label map in a palette of colours gives its palette indices: the index is the class, the colour only shows it
    (DRIVE's second-observer masks are indices 0/1 drawn as (4, 2, 4) and (252, 254, 252)).
    """
    with _open_2d(path) as img:
        _refuse_frames(img, path)
        _check_memory_budget(path, img.size[::-1], 3 if img.mode in _COLOUR_MODES else 1)
        img.load()
        if img.mode in _COLOUR_MODES:
            rgb = np.asarray(img.convert("RGB"))
            grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
            if label and img.mode == "P" and not grey:
                return np.asarray(img)
            return rgb[..., 0] if grey and img.mode in ("P", "LA", "PA") else rgb
        return np.asarray(img.convert("F") if img.mode == "F" else img)


def _open_2d(path: Path) -> Image.Image:
    """Pillow's image, header only; its decompression-bomb guard (a warning above ``Image.MAX_IMAGE_PIXELS``, an
    error above twice that) as one error instead of a warning or a "corrupt" file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise MedidiffError(f"is refused as a possible decompression bomb ({err}); medidiff reads 2D images of "
                                f"up to {Image.MAX_IMAGE_PIXELS} pixels", path) from None


def _refuse_frames(img: Image.Image, path: Path) -> None:
    """Only the first frame would be read, silently: which one was meant cannot be guessed."""
    count = getattr(img, "n_frames", 1)
    if count > 1:
        what = {"TIFF": "a multi-page TIFF", "GIF": "an animated GIF"}.get(img.format, f"a multi-frame {img.format}")
        raise MedidiffError(f"holds {count} frames ({what}); medidiff reads single-frame images: save the frame you "
                            "mean as its own file", path)


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header alone: the size, checked before the pixels are allocated
    _check_memory_budget(path, reader.GetSize(), reader.GetNumberOfComponents())
    return _read_itk(reader.Execute())


def _channel_first(array: np.ndarray, path: Path, expected_ndim: int | None) -> np.ndarray:
    """File layout to ``(C, *spatial)``: NIfTI channels are trailing (4th/5th dim), so are RGB ones."""
    is_2d_file = path.name.lower().endswith(IMAGE_2D_SUFFIXES)
    if array.ndim == 5 and array.shape[2:4] == (1, 1):  # NIfTI vector image of a 2D grid (X, Y, 1, 1, C)
        array, is_2d_file = array[:, :, 0, 0], True
    elif array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector image (X, Y, Z, 1, C)
        array = array[:, :, :, 0]
    if expected_ndim == 2 and not is_2d_file and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # a single-slice volume used as a 2D image
    spatial = 2 if is_2d_file else min(array.ndim, 3)
    if array.ndim < 2 or array.ndim > spatial + 1:
        raise MedidiffError(f"has unsupported array shape {array.shape}", path)
    if expected_ndim is not None and (spatial != expected_ndim or (not is_2d_file and array.ndim > spatial)):
        hint = " (a time series or multi-volume file? select one volume)" if array.ndim == 4 else ""
        raise MedidiffError(f"is a {array.ndim}D array of shape {array.shape} where a {expected_ndim}D "
                            f"image is expected{hint}", path)
    return array[None] if array.ndim == spatial else np.moveaxis(array, -1, 0)


def _checked_values(array: np.ndarray, path: Path, kind: str) -> np.ndarray:
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
            raise MedidiffError(f"contains {nan} NaN and {inf} infinite voxel(s); fix or mask them first", path)
        limit = np.iinfo(np.int32).max if kind == "label" else np.finfo(np.float32).max
        if array.size and np.abs(array).max() > limit:
            raise MedidiffError(f"holds values beyond {'int32' if kind == 'label' else 'float32'} range "
                                f"(|max| {float(np.abs(array).max()):.3g}); check the header's scaling", path)
    if kind == "label":
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise MedidiffError("is read as a label map but holds non-integer values", path)
        return array.astype(np.int64)
    return array.astype(np.float32)


def _to_metatensor(array: np.ndarray, affine: np.ndarray, path: Path, extra: dict) -> MetaTensor:
    spatial_ndim = array.ndim - 1
    spacing = np.sqrt((affine[:spatial_ndim, :spatial_ndim] ** 2).sum(axis=0))
    volume = abs(np.linalg.det(affine[:spatial_ndim, :spatial_ndim]))
    if not (spacing > 0).all() or volume < 1e-12 * spacing.prod():
        raise MedidiffError(f"has a degenerate voxel-to-world transform (voxel size {tuple(spacing.round(6))}, "
                            "axes not independent); fix pixdim / qform / sform in the header", path)
    pixdim = np.ones(8)
    pixdim[1 : 1 + spatial_ndim] = spacing
    meta = {
        "filename_or_obj": str(path),
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(array.shape[1:]),
        "original_channel_dim": 0,
        "pixdim": pixdim,
        "spacing": tuple(float(s) for s in spacing),
        "orientation": "".join(code or "?" for code in nib.aff2axcodes(affine))[:spatial_ndim],
        "space": "RAS",
        **extra,
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.as_tensor(affine), meta=meta)
