"""The per-chunk time sampler of CausalKD (MATH.md section 7): one step index per sample and chunk.

Each chunk of each sample draws ``k ~ U{0 .. K}`` (``K`` = clean) from the step's draws, so every rank of a data-
or context-parallel run draws alike (:mod:`distill_mixins.draws`); the frames of a chunk share it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_mixins.causal.chunks import chunk_bounds
from distill_mixins.draws import Draws


def chunk_step_indices(
    draws: Draws, batch_size: int, frames: int, chunk_size: int, num_steps: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, T) long: per sample and chunk a step index uniform on ``0 .. num_steps`` (``num_steps``: clean),
    constant within each chunk (:func:`~distill_mixins.causal.chunks.chunk_bounds`: the remainder chunk first)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: give the student's number of steps K, an int >= 1.")
    bounds = chunk_bounds(frames, chunk_size)
    indices = draws.randint(0, num_steps + 1, batch_size, len(bounds))  # (B, chunks)
    sizes = torch.tensor([end - start for start, end in bounds])
    return indices.repeat_interleave(sizes, dim=1).to(device)


def step_times(
    indices: Tensor, schedule: Tensor, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Times (B, T) of step ``indices`` (B, T) on the descending ``schedule`` (K,) of TrigFlow times, index ``K``
    meaning clean (time 0)."""
    grid = torch.cat([schedule.to(torch.float64).cpu(), torch.zeros(1, dtype=torch.float64)])
    if int(indices.max()) >= grid.numel() or int(indices.min()) < 0:
        raise ValueError(f"step indices must lie in 0..{grid.numel() - 1} (K = {grid.numel() - 1} is clean).")
    return grid[indices.cpu()].to(dtype=dtype, device=device if device is not None else indices.device)


__all__ = ["chunk_step_indices", "step_times"]
