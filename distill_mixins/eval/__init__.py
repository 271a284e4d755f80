"""Evaluation: distribution metrics (and, later, the visual sample grid)."""

from distill_mixins.eval.metrics import sliced_wasserstein2

__all__ = ["sliced_wasserstein2"]
