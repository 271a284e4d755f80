"""The energy score: a per-condition distribution term on real clips that a one-step student can train with.

For m student samples ``x_1..x_m`` of one condition (different noises) and one real clip ``y`` of that condition,

```
ES = 1/m sum_i ||x_i - y||^beta  -  1/(2 m (m - 1)) sum_{i != j} ||x_i - x_j||^beta,    0 < beta < 2
```

(Gneiting & Raftery 2007, "Strictly Proper Scoring Rules, Prediction, and Estimation", eq. 22). It is strictly
proper for every such beta: its expectation over ``y`` is smallest exactly when the samples' distribution is
``y``'s, so a generator trained on it learns the conditional distribution, not its mean (as "engression", Shen &
Meinshausen 2024, arXiv 2307.00835, and the scoring-rule diffusion models of De Bortoli et al. 2025, arXiv
2502.02483, train theirs). Unlike an L2 regression it does not blur between modes (a sample halfway between two
modes scores as badly as a collapsed one), and unlike the DMD gradient it sees per-condition collapse: the second
term rewards two samples of one condition for differing, with a unit-length gradient even when they nearly coincide
(beta = 1).

``beta`` sets what a sample between two modes costs. Two modes a distance d apart, each drawn with probability
1/2: two samples at their midpoint score ``(d/2)^beta`` in expectation, two samples at one mode ``d^beta / 2``,
one at each 0. At beta = 1 the midpoint costs what collapse costs; below 1 (a concave power) it costs more, so the
score pushes a sample between two modes towards one of them harder.

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


def check_beta(beta: float, owner: str) -> float:
    """``beta`` as a float, or a ValueError naming ``owner`` unless 0 < beta < 2 (where the score is strictly
    proper)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 2:
        raise ValueError(f"{owner}={beta!r} must be in (0, 2), where the energy score is strictly proper (1: the "
                         "distance itself; < 1 prefers committing to a mode over a sample between two).")
    return float(beta)


def _power(d: Tensor, beta: float) -> Tensor:
    """``d ** beta`` with a finite gradient at d = 0 (where a power below 1 has an infinite one): 0 there."""
    if beta == 1.0:
        return d
    return torch.where(d > 0, d.clamp_min(1e-12) ** beta, torch.zeros_like(d))


def energy_score(samples: Sequence[Tensor], y: Tensor, beta: float = 1.0) -> Tensor:
    """``ES`` per condition (B,): ``samples`` m >= 2 tensors (B, C, T, H, W), sample i of every condition from its
    own noise; ``y`` (B, C, T, H, W) one real clip per condition; distances to the power ``beta`` in (0, 2)
    (Gneiting & Raftery 2007, eq. 22)."""
    beta = check_beta(beta, "energy_score beta")
    m = len(samples)
    if m < 2:
        raise ValueError(f"energy_score needs at least 2 samples per condition (got {m}): the second term compares "
                         "samples of one condition with each other.")
    attract = sum(_power(rms_distance(x, y), beta) for x in samples) / m
    pairs = (_power(rms_distance(samples[i], samples[j]), beta) for i in range(m) for j in range(i + 1, m))
    return attract - sum(pairs) / (m * (m - 1))


__all__ = ["check_beta", "energy_score", "rms_distance"]
