"""Known-answer tools: an exact Gaussian-mixture teacher, toy hosts, a tiny neural denoiser."""

from distill_mixins.testing.gmm import GaussianMixture, ring_mixture
from distill_mixins.testing.hosts import (
    FORMS,
    GMMDenoiserNet,
    MLPDenoiser,
    ToyHost,
    analytic_host_args,
    mixture_batch,
)

__all__ = [
    "FORMS",
    "GMMDenoiserNet",
    "GaussianMixture",
    "MLPDenoiser",
    "ToyHost",
    "analytic_host_args",
    "mixture_batch",
    "ring_mixture",
]
