"""Chunks: blocks of latent frames that a causal student generates one after another (MATH.md section 7).

A clip of ``T`` latent frames splits into chunks of ``chunk_size`` frames; when ``T`` is not a multiple, the
*first* chunk takes the remainder (T = 7, chunk 3: frames [0, 1), [1, 4), [4, 7)), so every later chunk has the
full size (the published pipeline: 3-frame chunks of a 21-frame clip).
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_chunk_size(chunk_size: int, owner: str = "chunk_size") -> int:
    """``chunk_size`` if it is an int >= 1, else a ValueError naming ``owner``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{owner}={chunk_size!r}: give the number of latent frames per chunk, an int >= 1.")
    return chunk_size


def chunk_bounds(frames: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` frame ranges of the chunks of a ``frames``-frame clip, the remainder first."""
    check_chunk_size(chunk_size)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r}: a clip has an int >= 1 of latent frames.")
    first = frames % chunk_size or chunk_size
    starts = [0, *range(first, frames, chunk_size)]
    return [(s, min(frames, e)) for s, e in zip(starts, [*starts[1:], frames], strict=True)]


def frame_chunks(frames: int, chunk_size: int, device: torch.device | str | None = None) -> Tensor:
    """(T,) long: the chunk index of every frame."""
    ids = torch.empty(frames, dtype=torch.long, device=device)
    for index, (start, end) in enumerate(chunk_bounds(frames, chunk_size)):
        ids[start:end] = index
    return ids


def chunk_of_frame(frame: int, frames: int, chunk_size: int) -> tuple[int, int]:
    """The ``(start, end)`` of the chunk holding ``frame``."""
    for start, end in chunk_bounds(frames, chunk_size):
        if start <= frame < end:
            return start, end
    raise ValueError(f"frame {frame} is outside a clip of {frames} frames.")


__all__ = ["check_chunk_size", "chunk_bounds", "chunk_of_frame", "frame_chunks"]
