"""Distillation methods: one method, one file."""

from distill_mixins.methods.dmd2 import DMD2Config, DMD2Mixin
from distill_mixins.methods.kd import KDConfig, KDMixin
from distill_mixins.methods.rcm import RCMConfig, RCMMixin
from distill_mixins.methods.refined_kd import RefinedKDConfig, RefinedKDMixin
from distill_mixins.methods.scm import SCMConfig, SCMMixin

__all__ = [
    "DMD2Config", "DMD2Mixin", "KDConfig", "KDMixin", "RCMConfig", "RCMMixin", "RefinedKDConfig", "RefinedKDMixin",
    "SCMConfig", "SCMMixin",
]
