"""Pictures people would rather look at than read: PNG panels and a Markdown report.

A panel shows one case side by side — input | condition | result | uncertainty | reference — using the
middle slice (or the slice with most foreground) of 3D volumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np


def middle_slice(volume: np.ndarray, axis: int = -1, weight: np.ndarray | None = None) -> np.ndarray:
    """A 2D view of a 2D or 3D array ``(*spatial)``: the slice with most ``weight`` (else the middle)."""
    volume = np.asarray(volume)
    if volume.ndim == 2:
        return volume
    axis = axis % volume.ndim
    if weight is not None and np.any(weight):
        index = int(np.argmax(np.asarray(weight).sum(axis=tuple(a for a in range(volume.ndim) if a != axis))))
    else:
        index = volume.shape[axis] // 2
    return np.take(volume, index, axis=axis)


def panel(images: Sequence[tuple[str, np.ndarray, str]], path: str | os.PathLike, title: str = "") -> Path:
    """Save images side by side.

    Args:
        images: ``(caption, array2d, kind)`` with kind ``image`` (grey), ``label`` (class colours),
            ``uncertainty`` (heat map) or ``rgb`` ``(H, W, 3)`` in [0, 1].
        path: the PNG to write (atomically).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.9), squeeze=False)
    for ax, (caption, array, kind) in zip(axes[0], images):
        # rows of a NIfTI slice run along x: transpose so that the picture is upright like in a viewer
        shown = np.asarray(array)
        shown = np.rot90(shown) if kind != "rgb" else shown
        cmap = {"image": "gray", "label": "tab10", "uncertainty": "magma"}.get(kind)
        limits = {"label": (0, 9)}.get(kind, (None, None))
        # very flat views (a few thick slices seen from the side) are stretched so that they stay visible
        aspect = "auto" if shown.shape[0] * 3 < shown.shape[1] else "equal"
        ax.imshow(shown, cmap=cmap, vmin=limits[0], vmax=limits[1], interpolation="nearest", aspect=aspect)
        ax.set_title(caption, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(temporary, dpi=90)
    plt.close(fig)
    os.replace(temporary, path)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts), floats with 3 decimals."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_logs(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Training curves from a Lightning CSV log (``metrics.csv``): one panel per logged quantity, against step."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medidiff.errors import MedidiffError

    try:
        rows = list(csv.DictReader(open(metrics_csv)))
    except OSError as err:
        raise MedidiffError(f"cannot read the training log ({err.strerror})", metrics_csv) from None
    names = [k for k in (rows[0] if rows else {}) if k not in ("epoch", "step")]
    if not names:
        raise MedidiffError("has no logged metrics (expected Lightning's CSVLogger metrics.csv)", metrics_csv)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
