"""The block-causal attention mask: a frame of chunk c attends to every frame of chunks <= c (MATH.md section 7).

One implementation for every host. The mask is a boolean (S, S) tensor over the tokens (frame-major: the
``tokens_per_frame`` tokens of frame 0, then frame 1, ...), ``True`` where attention is allowed, the form PyTorch's
SDPA takes as ``attn_mask``. The hosts attend chunk by chunk instead (:mod:`distill_mixins.causal.attention`, whose
:func:`~distill_mixins.causal.require_spans` raises rather than fall back to full attention); the mask is the
reference their tests compare with, and serves a host that wants one SDPA call.
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


__all__ = ["block_causal_mask"]
