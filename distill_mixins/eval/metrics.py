"""Distribution distances between sample sets."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein2(
    a: Tensor, b: Tensor, *, num_projections: int = 512, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-2 distance between equal-size sample sets a, b of shape (N, ...).

    ``sqrt(mean over random unit directions u of W2^2(<a, u>, <b, u>))``; 1D W2 by sorting.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein2 needs sample sets of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}: draw the same number of samples for both.")
    fa, fb = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    dirs = torch.randn(fa.shape[1], num_projections, dtype=torch.float64, generator=generator)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort((dirs.T @ fa.T).contiguous(), dim=1)  # (P, N): sorting rows is ~2x faster
    pb, _ = torch.sort((dirs.T @ fb.T).contiguous(), dim=1)
    return float((pa - pb).pow(2).mean().sqrt())
