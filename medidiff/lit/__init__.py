"""Task LightningModules: one base class, one thin subclass per task."""

from medidiff.lit.base import DiffusionModule
from medidiff.lit.segmentation import SegmentationDiffusion

TASKS: dict[str, type[DiffusionModule]] = {"segmentation": SegmentationDiffusion}

__all__ = ["TASKS", "DiffusionModule", "SegmentationDiffusion"]
