"""The block-causal attention mask: a frame of chunk c attends to every frame of chunks <= c (MATH.md section 7).

One implementation for every host. The mask is a boolean (S, S) tensor over the tokens (frame-major: the
``tokens_per_frame`` tokens of frame 0, then frame 1, ...), ``True`` where attention is allowed, the form PyTorch's
SDPA takes as ``attn_mask``. :func:`require_mask` is what a full-sequence causal forward calls: it raises when no
mask can be built, so a causal forward never falls back to full attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_mixins.causal.chunks import frame_chunks


def block_causal_mask(
    frames: int, chunk_size: int, tokens_per_frame: int = 1, device: torch.device | str | None = None
) -> Tensor:
    """(S, S) bool, S = frames * tokens_per_frame: query token i may attend to key token j iff chunk(j) <= chunk(i)."""
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame={tokens_per_frame!r}: give an int >= 1.")
    chunk = frame_chunks(frames, chunk_size, device).repeat_interleave(tokens_per_frame)
    return chunk[None, :] <= chunk[:, None]


def require_mask(frames: int, chunk_size: int, tokens_per_frame: int, device: torch.device | str | None) -> Tensor:
    """:func:`block_causal_mask`, or a RuntimeError when it cannot be built: never full attention instead."""
    try:
        mask = block_causal_mask(frames, chunk_size, tokens_per_frame, device)
    except Exception as error:  # noqa: BLE001 - re-raised with what it means for the caller
        raise RuntimeError(
            f"the block-causal mask for {frames} frames in chunks of {chunk_size} could not be built ({error}); a "
            "causal forward does not fall back to full attention."
        ) from error
    size = frames * tokens_per_frame
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (size, size):
        raise RuntimeError(
            f"the block-causal mask for {frames} frames is {type(mask).__name__} "
            f"{tuple(getattr(mask, 'shape', ()))}, not a ({size}, {size}) bool tensor; a causal forward does not "
            "fall back to full attention."
        )
    return mask


__all__ = ["block_causal_mask", "require_mask"]
