"""Read scans into MONAI ``MetaTensor`` s and write results that line up with them (nnU-Net style: the
reader returns the properties, the writer takes them back).

``read`` gives ``(C, *spatial)`` with ``meta``: ``affine`` (voxel -> RAS world, as NIfTI and MONAI use),
``pixdim`` (NIfTI-style), ``spacing``, ``orientation`` (e.g. ``"LAS"``), ``spatial_shape``, ``filename_or_obj``.
Formats: NIfTI (nibabel), a DICOM series folder and ``.mha``/``.nrrd`` (SimpleITK), 2D PNG/TIF/GIF/JPEG/BMP
(Pillow; ``(C, H, W)``, identity affine, spacing 1). User errors raise :class:`MedidiffError` naming the file.

Modules: :mod:`~medidiff.io.reading` (``read`` and the checks of a file's header and values),
:mod:`~medidiff.io.dicom` (DICOM series), :mod:`~medidiff.io.limits` (regular files only, the memory budget),
:mod:`~medidiff.io.grid` (``grid_problem``, ``check_pair``, ``reorient_like``, ``respaced_affine``) and
:mod:`~medidiff.io.writing` (``write``, ``write_png``, ``write_json``, ``atomic_write``); everything public is
importable from ``medidiff.io`` itself.
"""

from medidiff.io.dicom import is_dicom_folder
from medidiff.io.grid import check_pair, grid_problem, reorient_like, respaced_affine
from medidiff.io.limits import BUDGET_VARIABLE
from medidiff.io.reading import IMAGE_2D_SUFFIXES, ITK_SUFFIXES, NIFTI_SUFFIXES, read, source_path
from medidiff.io.writing import (
    atomic_write,
    clear_partial_writes,
    strict_json,
    write,
    write_json,
    write_png,
)

__all__ = ["read", "write", "write_png", "write_json", "atomic_write", "check_pair", "source_path",
           "grid_problem", "reorient_like", "respaced_affine", "is_dicom_folder", "clear_partial_writes",
           "strict_json", "NIFTI_SUFFIXES", "IMAGE_2D_SUFFIXES", "ITK_SUFFIXES", "BUDGET_VARIABLE"]
