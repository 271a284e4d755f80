"""Evaluation: distribution metrics (and, later, the visual sample grid)."""

from distill_mixins.eval.metrics import sliced_wasserstein2
from distill_mixins.eval.visual import VisualPaths, clip_animation, sample_grid, write_gif, write_training_visual

__all__ = ["sliced_wasserstein2"]
__all__ += ["VisualPaths", "clip_animation", "sample_grid", "write_gif", "write_training_visual"]
