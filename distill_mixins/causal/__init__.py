"""Causal (chunk-by-chunk) students: chunks, the block-causal mask, the KV cache, the per-chunk time sampler,
streaming inference.

One implementation serves every causal host (ARCHITECTURE.md, "Causal students"; MATH.md section 7).
"""

from distill_mixins.causal.attention import (
    BlockCausalSpans,
    block_causal_attention,
    block_causal_spans,
    require_spans,
)
from distill_mixins.causal.chunks import check_chunk_size, chunk_bounds, chunk_of_frame, frame_chunks
from distill_mixins.causal.kv_cache import KVCache
from distill_mixins.causal.mask import block_causal_mask
from distill_mixins.causal.streaming import (
    StreamedChunk,
    causal_denoiser,
    generate_causal,
    stream_causal,
    stream_causal_uncached,
)
from distill_mixins.causal.time_sampler import chunk_step_indices, step_times
from distill_mixins.causal.windows import extend_condition, window_condition

__all__ = [
    "BlockCausalSpans",
    "KVCache",
    "StreamedChunk",
    "block_causal_attention",
    "block_causal_mask",
    "block_causal_spans",
    "causal_denoiser",
    "check_chunk_size",
    "chunk_bounds",
    "chunk_of_frame",
    "chunk_step_indices",
    "extend_condition",
    "frame_chunks",
    "generate_causal",
    "require_spans",
    "step_times",
    "stream_causal",
    "stream_causal_uncached",
    "window_condition",
]
