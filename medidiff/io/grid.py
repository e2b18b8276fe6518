"""Voxel grids: whether two images share one (:func:`grid_problem`: the one rule behind :func:`check_pair` in
training and the prediction/reference check of :mod:`medidiff.metrics.evaluate`), exact reorientation onto another
image's axis order, and the affine of a resampled grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import MetaTensor

from medidiff.errors import MedidiffError
from medidiff.io.reading import _to_metatensor, source_path

SPACING_TOLERANCE = 1e-4  # relative, plus the same in mm: voxel sizes that differ by more are another grid
TURN_TOLERANCE = 0.1  # degrees between corresponding voxel axes


def grid_problem(image: Any, reference: Any, *, atol: float = 1e-3, origin_atol: float | None = None) -> str | None:
    """The first way ``image``'s voxel grid differs from ``reference``'s, in words, or None when they share one.

    Checked in this order, on ``(C, *spatial)`` images with an ``affine`` (``MetaTensor``; identity without):
    the spatial shape; the voxel size (``SPACING_TOLERANCE`` relative plus as many mm); the axis codes (e.g.
    ``LAS`` against ``RAS``); the voxel axes, turned by more than ``TURN_TOLERANCE`` degrees or an entry of the
    affine's 3x3 block off by more than ``atol`` mm; the origin, farther than ``origin_atol`` mm (default
    ``atol``) from the reference's.
    """
    shape, ref_shape = tuple(image.shape[1:]), tuple(reference.shape[1:])
    if shape != ref_shape:
        return f"shape {shape} differs from {ref_shape}"
    a, b = _affine(image), _affine(reference)
    spacing, ref_spacing = _spacing(a, len(shape)), _spacing(b, len(shape))
    if not np.allclose(spacing, ref_spacing, rtol=SPACING_TOLERANCE, atol=SPACING_TOLERANCE):
        return f"spacing {spacing} differs from {ref_spacing}"
    codes, ref_codes = _axis_codes(a, len(shape)), _axis_codes(b, len(shape))
    if codes != ref_codes:
        return f"orientation {codes} differs from {ref_codes}"
    problem = _axes_problem(a[:3, :3], b[:3, :3], atol)
    if problem:
        return problem
    # same shape, spacing and axes yet shifted (e.g. two different crops): voxel-wise comparison is meaningless
    origin, ref_origin = a[:3, 3], b[:3, 3]
    shift = float(np.linalg.norm(origin - ref_origin))
    if shift > (atol if origin_atol is None else origin_atol):
        distance = f"{shift:.2f}" if shift >= 0.01 else f"{shift:.2g}"
        return f"origin {np.round(origin, 2).tolist()} lies {distance} mm from {np.round(ref_origin, 2).tolist()}"
    return None


def _affine(image: Any) -> np.ndarray:
    """The 4x4 voxel-to-world affine of an image (a 2D one's 3x3 embedded); identity when it has none."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return np.eye(4)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape == (4, 4):
        return affine
    n = affine.shape[0] - 1
    out = np.eye(4)
    out[:n, :n], out[:n, 3] = affine[:n, :n], affine[:n, n]
    return out


def _spacing(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel size along each of the first ``ndim`` axes, as :func:`medidiff.io.read` records it."""
    return tuple(float(s) for s in np.sqrt((affine[:ndim, :ndim] ** 2).sum(axis=0)))


def _axis_codes(affine: np.ndarray, ndim: int) -> str:
    """Where the voxel axes point (e.g. ``"LAS"``), as :func:`medidiff.io.read` records the orientation."""
    return "".join(code or "?" for code in nib.aff2axcodes(affine))[:ndim]


def _axes_problem(axes: np.ndarray, ref_axes: np.ndarray, atol: float) -> str | None:
    """Voxel axes (3x3, columns) with the same codes yet turned (an oblique re-slice), or off by more than
    ``atol`` mm in an entry: voxel-wise comparison would be meaningless."""
    directions = [m / np.where(np.linalg.norm(m, axis=0) > 0, np.linalg.norm(m, axis=0), 1.0) for m in (axes, ref_axes)]
    turn = float(np.degrees(np.arccos(np.clip(np.min(np.sum(directions[0] * directions[1], axis=0)), -1, 1))))
    if turn > TURN_TOLERANCE:
        return f"voxel axes (direction) are turned by {turn:.1f} degrees against those"
    if not np.allclose(axes, ref_axes, rtol=0.0, atol=atol):
        return (f"voxel axes {_fmt(axes)} differ from {_fmt(ref_axes)} by up to "
                f"{np.abs(axes - ref_axes).max():.4g} mm")
    return None


def check_pair(image: MetaTensor, label: MetaTensor, *, atol: float = 1e-3, what: str = "label") -> None:
    """Check that an image and its label map (or a second source, ``what="source"``) share one voxel grid
    (:func:`grid_problem`, with ``atol`` mm for the voxel axes and the origin alike).

    Args:
        image: ``(C, *spatial)`` as returned by :func:`read`.
        label: ``(1, *spatial)``.
        atol: tolerance on affine entries, in mm.
        what: what the second file is, for the message.

    Raises:
        MedidiffError: naming the second file, when spatial shapes or affines differ.
    """
    problem = grid_problem(label, image, atol=atol)
    if problem is None:
        return
    where, other = source_path(label), source_path(image)
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise MedidiffError(f"{what} shape {tuple(label.shape[1:])} differs from image shape "
                            f"{tuple(image.shape[1:])} ({other})", where)
    a, b = _affine(image), _affine(label)
    raise MedidiffError(f"{what} affine differs from the image's ({other}) by up to {np.abs(a - b).max():.4g} mm; "
                        f"they are not on the same grid ({problem}; image origin {_fmt(a[:3, 3])}, voxel axes "
                        f"{_fmt(a[:3, :3])}; label origin {_fmt(b[:3, 3])}, voxel axes {_fmt(b[:3, :3])})", where)


def _fmt(values: np.ndarray) -> str:
    return np.array2string(np.round(np.asarray(values, dtype=float), 4), separator=", ").replace("\n", "")

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
