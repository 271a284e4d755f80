"""The energy score: a per-condition distribution term on real clips that a one-step student can train with.

For m student samples ``x_1..x_m`` of one condition (different noises) and one real clip ``y`` of that condition,

```
ES = 1/m sum_i ||x_i - y||  -  1/(2 m (m - 1)) sum_{i != j} ||x_i - x_j||
```

(Gneiting & Raftery 2007, "Strictly Proper Scoring Rules, Prediction, and Estimation", eq. 22, beta = 1). It is
strictly proper: its expectation over ``y`` is smallest exactly when the samples' distribution is ``y``'s, so a
generator trained on it learns the conditional distribution, not its mean (as "engression", Shen & Meinshausen
2024, arXiv 2307.00835, and the scoring-rule diffusion models of De Bortoli et al. 2025, arXiv 2502.02483, train
theirs). Unlike an L2 regression it does not blur between modes (a sample halfway between two modes scores as
badly as a collapsed one), and unlike the DMD gradient it sees per-condition collapse: the second term rewards two
samples of one condition for differing, with a unit-length gradient even when they nearly coincide.

Distances here are RMS over (C, T, H, W) (the norm divided by ``sqrt(C T H W)``), so a term's weight does not
depend on the clip size. Measured on the toy demo: docs/methods/dmd2.md ("Energy-score term").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample RMS distance (B,) between two (B, ...) tensors, computed in float32 or wider."""
    diff = (a - b).flatten(1)
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    return diff.norm(dim=1) / math.sqrt(diff.shape[1])


def energy_score(samples: Sequence[Tensor], y: Tensor) -> Tensor:
    """``ES`` per condition (B,): ``samples`` m >= 2 tensors (B, C, T, H, W), sample i of every condition from its
    own noise; ``y`` (B, C, T, H, W) one real clip per condition (Gneiting & Raftery 2007, eq. 22)."""
    m = len(samples)
    if m < 2:
        raise ValueError(f"energy_score needs at least 2 samples per condition (got {m}): the second term compares "
                         "samples of one condition with each other.")
    attract = sum(rms_distance(x, y) for x in samples) / m
    repel = sum(rms_distance(samples[i], samples[j]) for i in range(m) for j in range(i + 1, m)) / (m * (m - 1))
    return attract - repel


__all__ = ["energy_score", "rms_distance"]
