"""Block-causal attention chunk by chunk: no (S, S) mask (MATH.md section 7).

The queries of chunk c attend to the keys of every frame of chunks <= c, i.e. to the key *prefix* that ends where
chunk c ends. :func:`block_causal_attention` runs one attention call per chunk on that prefix through the library's
dispatch (flash-attn or SDPA, no mask: flash-compatible), instead of one call with a dense boolean mask, which is
S^2 bytes (about 1 GiB at Wan's published 21 frames x 1,560 tokens). The result equals the masked attention
(:func:`~distill_mixins.causal.mask.block_causal_mask`; tests/test_causal_core.py).

:func:`require_spans` is what a block-causal forward calls: it raises when the chunk layout cannot be built, so a
causal forward never falls back to full attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill_mixins.causal.chunks import chunk_bounds
from distill_mixins.parallel.attention import attention


@dataclass(frozen=True)
class BlockCausalSpans:
    """The token ranges ``(start, end)`` of the chunks of a sequence of ``tokens`` frame-major tokens: the queries
    ``start .. end - 1`` attend to the keys ``0 .. end - 1``."""

    spans: tuple[tuple[int, int], ...]
    tokens: int


def block_causal_spans(frames: int, chunk_size: int, tokens_per_frame: int = 1) -> BlockCausalSpans:
    """The chunks' token ranges of ``frames`` frames of ``tokens_per_frame`` tokens (the remainder chunk first)."""
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame={tokens_per_frame!r}: give an int >= 1.")
    spans = tuple((s * tokens_per_frame, e * tokens_per_frame) for s, e in chunk_bounds(frames, chunk_size))
    return BlockCausalSpans(spans, frames * tokens_per_frame)


def require_spans(frames: int, chunk_size: int, tokens_per_frame: int) -> BlockCausalSpans:
    """:func:`block_causal_spans`, or a RuntimeError when it cannot be built: never full attention instead."""
    try:
        spans = block_causal_spans(frames, chunk_size, tokens_per_frame)
    except Exception as error:  # noqa: BLE001 - re-raised with what it means for the caller
        raise RuntimeError(
            f"the block-causal layout of {frames} frames in chunks of {chunk_size} could not be built ({error}); a "
            "causal forward does not fall back to full attention."
        ) from error
    size = frames * tokens_per_frame
    if not isinstance(spans, BlockCausalSpans) or spans.tokens != size or not spans.spans or spans.spans[-1][1] != size:
        raise RuntimeError(
            f"the block-causal layout of {frames} frames is {spans!r}, not chunks covering {size} tokens; a causal "
            "forward does not fall back to full attention."
        )
    return spans


def block_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, spans: BlockCausalSpans, *, layout: str = "bhsd", scale: float | None = None
) -> Tensor:
    """Attention of ``q`` over ``k``, ``v`` (``layout`` ``bhsd`` or ``bshd``, the same sequence length
    ``spans.tokens``) where the queries of each chunk see the keys up to the chunk's end; same layout out."""
    seq = 2 if layout == "bhsd" else 1
    if not q.shape[seq] == k.shape[seq] == spans.tokens:
        raise ValueError(
            f"block_causal_attention: q and k hold {q.shape[seq]} and {k.shape[seq]} tokens, the layout "
            f"{spans.tokens}."
        )
    outs = [attention(q.narrow(seq, s, e - s), k.narrow(seq, 0, e), v.narrow(seq, 0, e), layout=layout, scale=scale)
            for s, e in spans.spans]
    return torch.cat(outs, dim=seq)


__all__ = ["BlockCausalSpans", "block_causal_attention", "block_causal_spans", "require_spans"]
