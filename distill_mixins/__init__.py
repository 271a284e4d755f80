"""distill-mixins: distill multi-step video diffusion teachers into 1-4 step students.

Compose a method mixin before your own model class::

    class MyDistill(KDMixin, MyVideo2WorldModel): ...
    model = MyDistill(<host args>, distill=KDConfig())
"""

from distill_mixins.config import DistillConfig, EMAConfig, LoraSpec, OptimizerConfig, TimeSamplerConfig
from distill_mixins.contract import ContextParallelHost, DenoiseAdapterMixin, DiffusionHost, FrameConditioning
from distill_mixins.core import DistillationCoreMixin, DistillBatch
from distill_mixins.discriminator import DiscriminatorConfig
from distill_mixins.methods import (
    DMD2Config,
    DMD2Mixin,
    KDConfig,
    KDMixin,
    RCMConfig,
    RCMMixin,
    RefinedKDConfig,
    RefinedKDMixin,
    SCMConfig,
    SCMMixin,
)
from distill_mixins.trigflow import Denoised, TrigFlowMixin

__version__ = "0.1.0"

__all__ = [
    "ContextParallelHost",
    "DMD2Config",
    "DMD2Mixin",
    "DenoiseAdapterMixin",
    "Denoised",
    "DiffusionHost",
    "DiscriminatorConfig",
    "DistillBatch",
    "DistillConfig",
    "DistillationCoreMixin",
    "EMAConfig",
    "FrameConditioning",
    "KDConfig",
    "KDMixin",
    "LoraSpec",
    "OptimizerConfig",
    "RCMConfig",
    "RCMMixin",
    "RefinedKDConfig",
    "RefinedKDMixin",
    "SCMConfig",
    "SCMMixin",
    "TimeSamplerConfig",
    "TrigFlowMixin",
]
