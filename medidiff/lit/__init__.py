"""Systems: LightningModules that train and sample a network for a task, held by composition.

- :class:`DiffusionModule`: conditional diffusion (the objective, the training step, sampling);
- :class:`SupervisedModule`: the supervised baselines (UNet segmentation, regression UNet);
- :class:`ResidualDiffusion`: diffusion of the residual over a supervised predictor;
- :class:`DistillationModule`: a few-step student of a trained diffusion model;
- :mod:`~medidiff.lit.registry`: the systems a checkpoint may name and how one is rebuilt from it.
"""

from medidiff.lit.diffusion import DiffusionModule, DiffusionSettings
from medidiff.lit.distill import DistillationModule
from medidiff.lit.residual import ResidualDiffusion
from medidiff.lit.supervised import SupervisedModule

__all__ = ["DiffusionModule", "DiffusionSettings", "DistillationModule", "ResidualDiffusion", "SupervisedModule"]
