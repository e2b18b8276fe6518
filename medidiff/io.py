"""Read scans into MONAI ``MetaTensor`` s and write results that line up with them (nnU-Net style: the
reader returns the properties, the writer takes them back).

``read`` gives ``(C, *spatial)`` with ``meta``: ``affine`` (voxel -> RAS world, as NIfTI and MONAI use),
``pixdim`` (NIfTI-style), ``spacing``, ``orientation`` (e.g. ``"LAS"``), ``spatial_shape``, ``filename_or_obj``.
Formats: NIfTI (nibabel), a DICOM series folder and ``.mha``/``.nrrd`` (SimpleITK), 2D PNG/TIF/GIF/JPEG/BMP
(Pillow; ``(C, H, W)``, identity affine, spacing 1). User errors raise :class:`MedidiffError` naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from PIL import Image

from medidiff.errors import MedidiffError

__all__ = ["read", "write", "write_png", "write_json", "atomic_write", "check_pair", "source_path"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_COLOUR_MODES = ("RGB", "RGBA", "CMYK", "YCbCr", "P", "LA", "PA")
BUDGET_VARIABLE = "MEDIDIFF_MAX_IMAGE_BYTES"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
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


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    for entry in sorted(folder.iterdir()):
        if _special_kind(entry):  # GDCM finds no series at all in a folder holding one
            raise MedidiffError(f"is not a regular file ({_special_kind(entry)}) but sits in the DICOM series folder "
                                f"{folder}; move it out", entry)
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise MedidiffError("no DICOM series found in this folder (empty, or files are not DICOM)", folder)
    file_lists = [reader.GetGDCMSeriesFileNames(str(folder), s) for s in series]
    _refuse_unreadable_slices(folder, {Path(f).name for files in file_lists for f in files})
    if len(file_lists) > 1:  # which one was meant cannot be guessed; picking one scored the wrong scan
        sizes = ", ".join(f"{len(files)} slices" for files in file_lists)
        raise MedidiffError(f"holds {len(file_lists)} DICOM series ({sizes}); put each series in a folder of its "
                            "own", folder)
    files = file_lists[0]
    _check_slice_sizes(files, folder)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.GlobalWarningDisplayOff()  # uneven slices: refused below, with the file names
    try:
        image = reader.Execute()
    except RuntimeError as err:
        bad = next((Path(f) for f in files if not _itk_readable(f)), folder)
        detail = (str(err).strip().splitlines() or [""])[-1][:200]
        raise MedidiffError(f"cannot be read, the DICOM slice looks corrupt or truncated ({detail})", bad) from err
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    _check_slice_spacing(reader, files, image, folder)
    array, affine, extra = _read_itk(image)
    if reader.HasMetaDataKey(0, "0008|0060"):
        extra["modality"] = reader.GetMetaData(0, "0008|0060").strip()
    extra["dicom_files"] = len(files)
    return array, affine, extra


def _check_slice_sizes(files: list[str], folder: Path) -> None:
    """From the headers, before any pixel is read: every slice the size of the others (GDCM files a scout or a
    slice of another scan with the same series UID into the series, then fails to stack it), and the volume
    within the memory budget."""
    sizes = [_dicom_header_size(file) for file in files]
    (columns, rows, _, components), _ = Counter(sizes).most_common(1)[0]
    for file, size in zip(files, sizes):
        if size[:2] != (columns, rows):
            raise MedidiffError(f"is {size[0]} x {size[1]} where the other slices of the series are {columns} x "
                                f"{rows}; it belongs to another scan (or is a scout): move it out of {folder}", file)
    _check_memory_budget(folder, (columns, rows, sum(size[2] for size in sizes)), components)


def _dicom_header_size(file: str) -> tuple[int, int, int, int]:
    """(columns, rows, frames, components) of a DICOM file, from its header alone."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise MedidiffError("cannot be read, the DICOM slice looks corrupt or truncated", file) from err
    return (*reader.GetSize(), 1)[:3] + (reader.GetNumberOfComponents(),)


def is_dicom_folder(path: str | os.PathLike, probe: int = 8) -> bool:
    """True for a folder whose files are DICOM (by the ``DICM`` preamble, whatever their names)."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")][:probe]
    return any(_looks_like_dicom(p) for p in files)


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _refuse_unreadable_slices(folder: Path, in_series: set[str]) -> None:
    """A DICOM file GDCM could not parse is silently left out of the series, leaving a gap: refuse it."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name in in_series or not path.is_file():
            continue
        if _looks_like_dicom(path):
            raise MedidiffError(f"is not a readable DICOM file (corrupt or truncated) but sits in the series "
                                f"folder {folder}; the volume would miss this slice", path)


def _itk_readable(file: str) -> bool:
    try:
        sitk.ReadImage(file)
        return True
    except RuntimeError:
        return False


def _check_slice_spacing(reader: sitk.ImageSeriesReader, files: list[str], image: sitk.Image,
                         folder: Path) -> None:
    """Slices must be evenly spaced along the slice normal, else one is missing (ITK would only warn)."""
    if len(files) < 3 or image.GetDimension() != 3:
        return
    try:
        positions = [[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                     for i in range(len(files))]
    except (RuntimeError, ValueError):
        return  # no usable ImagePositionPatient: nothing to check against
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps = np.diff(np.asarray(positions) @ normal)
    usual = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - usual)))
    if abs(usual) < 1e-6 or abs(steps[worst] - usual) > 0.1 * abs(usual):
        first, second = Path(files[worst]).name, Path(files[worst + 1]).name
        raise MedidiffError(f"DICOM slices are not evenly spaced: {abs(steps[worst]):.3g} mm between {first} and "
                            f"{second} where {abs(usual):.3g} mm is usual; a slice is missing or unreadable", folder)


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header alone: the size, checked before the pixels are allocated
    _check_memory_budget(path, reader.GetSize(), reader.GetNumberOfComponents())
    return _read_itk(reader.Execute())


def _read_itk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray, dict]:
    """SimpleITK image (LPS, array z-y-x) to an x-y-z array with a RAS affine."""
    ndim = img.GetDimension()
    array = sitk.GetArrayFromImage(img)  # (z, y, x[, components])
    vector = img.GetNumberOfComponentsPerPixel() > 1
    order = tuple(range(ndim))[::-1] + ((ndim,) if vector else ())
    array = np.transpose(array, order)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(4)
    affine[:ndim, :ndim] = direction @ np.diag(img.GetSpacing())
    affine[:ndim, 3] = img.GetOrigin()
    return array, _LPS_TO_RAS @ affine, {}


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


def reorient_like(image: MetaTensor, like: MetaTensor) -> MetaTensor:
    """``image`` with its voxel axes flipped and permuted onto ``like``'s axis codes — exact, no interpolation
    (the same voxels, stored in another order; e.g. a label map saved LAS beside its LPS series). Images whose
    axis codes already agree, and 2D images, are returned unchanged."""
    if image.meta.get("orientation") == like.meta.get("orientation") or image.ndim != 4:
        return image
    from nibabel import orientations

    affine = np.asarray(image.affine, dtype=float)
    transform = orientations.ornt_transform(orientations.io_orientation(affine),
                                            orientations.io_orientation(np.asarray(like.affine, dtype=float)))
    array = np.asarray(image)
    moved = np.stack([orientations.apply_orientation(channel, transform) for channel in array])
    new_affine = affine @ orientations.inv_ornt_aff(transform, array.shape[1:])
    extra = {k: v for k, v in image.meta.items() if k == "spacing_known"}
    return _to_metatensor(moved, new_affine, Path(image.meta["filename_or_obj"]), extra)


# ----------------------------------------------------------------------------------------- writing


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


def respaced_affine(affine: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Affine with the same direction and field-of-view edge but a new voxel size.

    Voxel centres sit half a voxel inside the field-of-view edge, so the origin (centre of voxel 0)
    moves by ``direction * (new - old) / 2``.
    """
    affine = np.asarray(affine, dtype=np.float64)
    n = len(spacing)
    old = np.sqrt((affine[:n, :n] ** 2).sum(axis=0))
    direction = affine[:n, :n] / old
    out = affine.copy()
    out[:n, :n] = direction * np.asarray(spacing, dtype=np.float64)
    out[:n, 3] = affine[:n, 3] + direction @ ((np.asarray(spacing) - old) / 2)
    return out


def check_pair(image: MetaTensor, label: MetaTensor, *, atol: float = 1e-3, what: str = "label") -> None:
    """Check that an image and its label map (or a second source, ``what="source"``) share one voxel grid.

    Args:
        image: ``(C, *spatial)`` as returned by :func:`read`.
        label: ``(1, *spatial)``.
        atol: tolerance on affine entries, in mm.
        what: what the second file is, for the message.

    Raises:
        MedidiffError: naming the second file, when spatial shapes or affines differ.
    """
    where, other = source_path(label), source_path(image)
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise MedidiffError(f"{what} shape {tuple(label.shape[1:])} differs from image shape "
                            f"{tuple(image.shape[1:])} ({other})", where)
    a, b = _reference_geometry(image)[0], _reference_geometry(label)[0]
    if not np.allclose(a, b, atol=atol):
        raise MedidiffError(f"{what} affine differs from the image's ({other}) by up to "
                            f"{np.abs(a - b).max():.4g} mm; they are not on the same grid (image origin "
                            f"{_fmt(a[:3, 3])}, voxel axes {_fmt(a[:3, :3])}; label origin {_fmt(b[:3, 3])}, "
                            f"voxel axes {_fmt(b[:3, :3])})", where)


def _fmt(values: np.ndarray) -> str:
    return np.array2string(np.round(np.asarray(values, dtype=float), 4), separator=", ").replace("\n", "")


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


# A prefix of medidiff's own: a pattern like ``.<name>.<8 characters><suffix>`` also matched users' hidden files.
_PARTIAL_PREFIX = ".medidiff-partial-"


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

    text = json.dumps(_strict_json(content), indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _strict_json(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _strict_json(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
