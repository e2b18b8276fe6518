"""The shared diffusion core: schedules, the denoiser wrapper, samplers, guidance and operators.

Torch only: nothing here imports MONAI or Lightning, so the core can be tested and reused alone.
"""

from medidiff.core.denoiser import DiscreteDenoiser, FlowDenoiser, append_dims
from medidiff.core.guidance import (
    ClassifierFreeGuidance,
    DownsampleConsistency,
    GradientStep,
    KSpaceConsistency,
    clamp_hook,
    compose_hooks,
    drop_condition,
)
from medidiff.core.samplers import SAMPLERS, get_sampler, nfe_of, steps_for_nfe
from medidiff.core.schedules import beta_schedule, karras_sigmas

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "DiscreteDenoiser",
    "FlowDenoiser",
    "DownsampleConsistency",
    "GradientStep",
    "KSpaceConsistency",
    "append_dims",
    "beta_schedule",
    "clamp_hook",
    "compose_hooks",
    "drop_condition",
    "get_sampler",
    "karras_sigmas",
    "nfe_of",
    "steps_for_nfe",
]
