"""Task LightningModules: one diffusion base class, one thin subclass per task, and the UNet baseline."""

from medidiff.lit.base import DiffusionModule
from medidiff.lit.baseline import UNetSegmenter
from medidiff.lit.fusion import FusionDiffusion
from medidiff.lit.image import RestorationDiffusion, SuperResDiffusion
from medidiff.lit.regression import RestorationUNet, SuperResUNet
from medidiff.lit.residual import ResidualSegmentationDiffusion
from medidiff.lit.segmentation import SegmentationDiffusion

# The modules a checkpoint may name: loading never imports a class from a name stored in a file.
MODULES = {cls.__name__: cls for cls in (SegmentationDiffusion, UNetSegmenter, RestorationDiffusion,
                                         SuperResDiffusion, FusionDiffusion, RestorationUNet, SuperResUNet,
                                         ResidualSegmentationDiffusion)}

__all__ = ["MODULES", "DiffusionModule", "FusionDiffusion", "RestorationDiffusion", "RestorationUNet",
           "ResidualSegmentationDiffusion", "SegmentationDiffusion", "SuperResDiffusion", "SuperResUNet",
           "UNetSegmenter"]
