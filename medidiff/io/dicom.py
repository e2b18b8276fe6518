"""DICOM series folders (SimpleITK / GDCM) and the conversion of any SimpleITK image to medidiff's layout.

A series is read only when it is complete and unambiguous: one series per folder, every file a readable slice of
the same size, slices evenly spaced along their normal; otherwise :class:`MedidiffError` names the file.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medidiff.errors import MedidiffError
from medidiff.io.limits import _check_memory_budget, _special_kind

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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

