"""The part of diffusers' ``WanAttnProcessor`` that the library's own Wan self-attention processors share (context
parallel in :mod:`distill_mixins.hosts.context_parallel`, block-causal in :mod:`distill_mixins.hosts.wan_causal`):
everything before the attention itself."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def wan_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding of x (B, S, H, D): pairs (x[..., 2i], x[..., 2i+1]) rotated by the angles that cos/sin
    (1, S, 1, D) repeat at 2i and 2i+1; computed in the tables' dtype, returned in x's."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def wan_self_attention_qkv(
    attn: nn.Module, hidden_states: Tensor, rotary_emb: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """What diffusers' ``WanAttnProcessor`` computes before self-attention, for the library's processors (context
    parallel, causal): projections (fused or not), RMS norm of q and k across heads, heads split, rotary embedding.
    hidden_states (B, S, dim) -> q, k, v (B, S, H, D)."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        q, k = wan_rope(q, *rotary_emb), wan_rope(k, *rotary_emb)
    return q, k, v
