"""Known-answer tools: an exact Gaussian-mixture teacher, toy hosts, a tiny neural denoiser, a tiny video DiT that can
run context-parallel."""

from distill_mixins.testing.gmm import GaussianMixture, ring_mixture
from distill_mixins.testing.hosts import (
    FORMS,
    GMMDenoiserNet,
    MLPDenoiser,
    ToyHost,
    analytic_host_args,
    mixture_batch,
)
from distill_mixins.testing.transformer import DiTHost, TinyVideoDiT

__all__ = [
    "DiTHost",
    "FORMS",
    "GMMDenoiserNet",
    "GaussianMixture",
    "MLPDenoiser",
    "TinyVideoDiT",
    "ToyHost",
    "analytic_host_args",
    "mixture_batch",
    "ring_mixture",
]
