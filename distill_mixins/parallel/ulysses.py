"""Ulysses context parallelism: attention over a sequence split across the ranks of a context-parallel (CP) group.

Every rank of a CP group of size ``P`` holds a contiguous chunk of the tokens, in rank order (rank ``r`` holds
tokens ``[r * S / P, (r + 1) * S / P)``, see :func:`split_sequence`). Attention needs every token, so
:func:`ulysses_attention` exchanges, with one ``all_to_all_single`` per tensor, the sequence split for a head split
(:func:`seq_to_head`): each rank then holds all ``S`` tokens of ``H / P`` heads, runs ordinary full-sequence
attention over its heads, and exchanges back (:func:`head_to_seq`) so that it holds all heads of its own tokens
again. Everything outside attention (norms, linears, MLPs) is per token and runs on the local chunk unchanged.
The backward of each exchange is the reverse exchange (an all-to-all is a permutation of the data, whose adjoint is
its inverse), so gradients flow across ranks exactly.

Requirements: ``P`` divides the number of heads of q, k and v, and every rank holds the same number of tokens
(pad the sequence to a multiple of ``P`` before :func:`split_sequence`). Both are checked with a clear
``ValueError``, raised on every rank alike (the shapes are compared through one small all-gather first, so no
rank is left waiting in a collective the others skipped).

Gradient conventions (how a CP group's gradients add up):

- **Parameters.** A parameter applied to the local tokens (everything in a sequence-sharded network) gets, on
  each rank, the gradient of the loss through that rank's chunk only. The gradient of the whole loss is the
  **sum over the CP group**: all-reduce (SUM) the parameter gradients over the CP group, or let a data-parallel
  wrapper that averages over the flattened ``dp x cp`` ranks do it and scale the loss by ``P`` (its average
  divides by ``P`` too many). A parameter applied only to a replicated tensor (after :func:`gather_sequence`)
  already has the full gradient on every rank and must not be summed.
- **Gathered tensors.** :func:`gather_sequence` assumes what follows it is *replicated*: every rank computes the
  same loss from the same gathered tensor. That loss counts once, not ``P`` times, so the exact gradient of a
  rank's chunk is its slice of the (identical) incoming gradient, with no sum across ranks; summing would give
  ``P`` times the gradient. With this convention, gathering the network output and computing the loss on it, or
  computing the loss on the local chunks (as a sum of per-chunk terms), give the same parameter gradients after
  the CP sum above.
- **Split tensors.** :func:`split_sequence` is a plain slice: a replicated input's gradient is only the local
  chunk's part on each rank (usually the input is the noisy latent, which needs none).

A group of size one (or ``group=None`` without an initialised process group) runs plain attention with no
communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from distill_mixins.parallel.attention import attention as dispatch_attention

LAYOUTS = ("bshd", "bhsd")

__all__ = [
    "LAYOUTS",
    "gather_sequence",
    "group_rank",
    "group_size",
    "head_to_seq",
    "seq_to_head",
    "split_sequence",
    "token_split",
    "ulysses_attention",
]


def group_size(group: Any = None) -> int:
    """The size of ``group`` (``None``: the default group; 1 when no process group is initialised)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def group_rank(group: Any = None) -> int:
    """This process's rank within ``group`` (``None``: the default group; 0 when none is initialised)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


# ---------------------------------------------------------------------------------------------- all-to-all


def _exchange(chunks: Tensor, group: Any) -> Tensor:
    """All-to-all of ``chunks`` (P, ...): chunk ``j`` goes to rank ``j``; entry ``i`` of the result came from rank
    ``i``."""
    chunks = chunks.contiguous()
    out = torch.empty_like(chunks)
    dist.all_to_all_single(out, chunks, group=group)
    return out


def _seq_to_head(x: Tensor, group: Any) -> Tensor:
    p = group_size(group)
    b, s_local, h, d = x.shape
    # (B, S_l, P, H/P, D) -> (P, B, S_l, H/P, D): head group j goes to rank j
    received = _exchange(x.reshape(b, s_local, p, h // p, d).permute(2, 0, 1, 3, 4), group)
    # received[i] is rank i's tokens for this rank's heads: (P, B, S_l, H/P, D) -> (B, P * S_l, H/P, D)
    return received.permute(1, 0, 2, 3, 4).reshape(b, p * s_local, h // p, d)


def _head_to_seq(x: Tensor, group: Any) -> Tensor:
    p = group_size(group)
    b, s, h_local, d = x.shape
    # (B, P, S_l, H/P, D) -> (P, B, S_l, H/P, D): the tokens of rank j go to rank j
    received = _exchange(x.reshape(b, p, s // p, h_local, d).permute(1, 0, 2, 3, 4), group)
    # received[i] is head group i of this rank's tokens: (P, B, S_l, H/P, D) -> (B, S_l, P * H/P, D)
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h_local, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _head_to_seq(grad, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _seq_to_head(grad, ctx.group), None


def _check_4d(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, sequence, heads, head_dim); got shape {tuple(x.shape)}.")


def seq_to_head(x: Tensor, group: Any = None) -> Tensor:
    """(B, S/P, H, D) sequence-sharded -> (B, S, H/P, D) head-sharded over the CP ``group`` (size ``P``).

    The result holds every token (in rank order) of this rank's heads ``[r * H/P, (r + 1) * H/P)``. One
    ``all_to_all_single``; its backward is :func:`head_to_seq`. ``P`` must divide ``H`` and every rank must hold
    the same number of tokens.
    """
    _check_4d(x, "seq_to_head input")
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[2] % p:
        raise ValueError(_heads_message("seq_to_head input", x.shape[2], p))
    return _SeqToHead.apply(x, group)


def head_to_seq(x: Tensor, group: Any = None) -> Tensor:
    """(B, S, H/P, D) head-sharded -> (B, S/P, H, D) sequence-sharded: the inverse of :func:`seq_to_head`.

    ``P`` must divide ``S``. One ``all_to_all_single``; its backward is :func:`seq_to_head`.
    """
    _check_4d(x, "head_to_seq input")
    p = group_size(group)
    if p == 1:
        return x
    if x.shape[1] % p:
        raise ValueError(
            f"head_to_seq: the sequence length {x.shape[1]} is not divisible by the context-parallel group size "
            f"{p}; pad the sequence to a multiple of {p} tokens."
        )
    return _HeadToSeq.apply(x, group)


# ----------------------------------------------------------------------------------------------- attention


def _heads_message(name: str, heads: int, p: int) -> str:
    divisors = [n for n in range(1, heads + 1) if heads % n == 0]
    return (
        f"Ulysses attention: {name} has {heads} heads, which the context-parallel group size {p} does not divide; "
        f"use a CP degree that divides the number of heads (one of {divisors}) or Ulysses with a model whose "
        f"head count is a multiple of {p}."
    )


def _check_shapes(tensors: dict[str, Tensor], sharded: dict[str, bool], group: Any, p: int) -> None:
    """Compare the (B, S, H, D) shapes of ``tensors`` across the group (one small all-gather) and raise the same
    ``ValueError`` on every rank when the local sequence lengths (or other sizes) differ."""
    names = list(tensors)
    local = torch.tensor([list(t.shape) for t in tensors.values()], dtype=torch.int64, device=tensors["q"].device)
    gathered = [torch.empty_like(local) for _ in range(p)]
    dist.all_gather(gathered, local, group=group)
    shapes = torch.stack(gathered).cpu()  # (P, n, 4)
    for i, name in enumerate(names):
        per_rank = shapes[:, i].tolist()
        if all(s == per_rank[0] for s in per_rank):
            continue
        lengths = [s[1] for s in per_rank]
        others = [s[:1] + s[2:] for s in per_rank]
        if sharded[name] and all(o == others[0] for o in others):
            listed = ", ".join(f"rank {r}: {n}" for r, n in enumerate(lengths))
            raise ValueError(
                f"Ulysses attention: the local sequence lengths of {name} differ across the context-parallel group "
                f"({listed}); every rank must hold the same number of tokens: pad the sequence to a multiple of "
                f"{p} tokens and split it with split_sequence."
            )
        listed = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(per_rank))
        raise ValueError(
            f"Ulysses attention: the (batch, sequence, heads, head_dim) shapes of {name} differ across the "
            f"context-parallel group ({listed}); every rank must hold the same batch, heads and head_dim"
            + (" and the same number of tokens." if sharded[name] else " and the whole (replicated) sequence.")
        )


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Any = None,
    *,
    attention: Callable[..., Tensor] | None = None,
    layout: str = "bshd",
    scale: float | None = None,
    causal: bool = False,
    kv_sharded: bool = True,
    check: bool = True,
) -> Tensor:
    """Attention of this rank's tokens over the whole sequence, split across the CP ``group`` (size ``P``).

    ``q``, ``k``, ``v``: this rank's contiguous chunk of the tokens (chunks in rank order), laid out as
    ``layout``: ``"bshd"`` (batch, sequence, heads, head_dim) or ``"bhsd"``. Returns the attention output of the
    local tokens in the same layout, equal to full-sequence attention on one process restricted to these tokens
    (``causal`` masks by global position, since the chunks are in rank order).

    ``attention``: the full-sequence attention over the local heads, called as ``attention(q, k, v,
    layout="bshd", scale=scale, causal=causal)`` on (B, S, H/P, D) tensors; default the library's one dispatch
    (:func:`distill_mixins.parallel.attention.attention`: flash-attn or SDPA). ``kv_sharded=False``: ``k`` and ``v``
    are the whole (replicated) key/value sequence on every rank, e.g. the text of a cross-attention; each rank then
    keeps only its heads of them, with no communication (their gradient is the local heads' part on each rank: the
    parameters that produced them are summed over CP like any other). ``check``: compare the shapes across the
    group first (one small all-gather), so that unequal local lengths raise the same ``ValueError`` on every rank
    instead of a failed or hung all-to-all.

    ``P`` must divide the number of heads of q, k and v. A group of size one runs plain attention.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"ulysses_attention: layout must be one of {LAYOUTS}; got {layout!r}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ulysses_attention: {name} must be 4-D (layout {layout!r}); got {tuple(t.shape)}.")
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        attend_fn = dispatch_attention if attention is None else attention
        return attend_fn(q, k, v, layout="bshd", scale=scale, causal=causal)

    p = group_size(group)
    if p == 1:
        out = attend(q, k, v)
    else:
        tensors = {"q": q, "k": k, "v": v}
        sharded = {"q": True, "k": kv_sharded, "v": kv_sharded}
        if check:
            _check_shapes(tensors, sharded, group, p)
        for name, t in tensors.items():
            if t.shape[2] % p:
                raise ValueError(_heads_message(name, t.shape[2], p))
        q_heads = seq_to_head(q, group)
        if kv_sharded:
            k_heads, v_heads = seq_to_head(k, group), seq_to_head(v, group)
        else:
            r = group_rank(group)
            k_heads, v_heads = (t.narrow(2, r * (t.shape[2] // p), t.shape[2] // p) for t in (k, v))
        out = head_to_seq(attend(q_heads, k_heads, v_heads).contiguous(), group)
    return out.transpose(1, 2) if layout == "bhsd" else out


# -------------------------------------------------------------------------------------------- host boundary


def token_split(grid: tuple[int, int, int], p: int, owner: str = "context parallel") -> str:
    """How a token grid (T', H', W') (tokens T'-major) splits over a CP group of size ``p``: ``"frames"`` when ``p``
    divides T', ``"tokens"`` when it divides S = T'*H'*W' (the same contiguous chunks), ``"none"`` for ``p == 1``;
    a ValueError naming T', S, P and the fix otherwise (``owner`` opens the message)."""
    frames, tokens = grid[0], math.prod(grid)
    if p == 1:
        return "none"
    if frames % p == 0:
        return "frames"
    if tokens % p == 0:
        return "tokens"
    raise ValueError(
        f"{owner}: the token grid (T', H', W') = {tuple(grid)} has T'={frames} frames and S={tokens} tokens, neither "
        f"divisible by the CP size P={p}; change the clip length or the resolution so that T' or T'*H'*W' is a "
        f"multiple of {p}, or use a CP size that divides T'={frames} or S={tokens}."
    )


def split_sequence(x: Tensor, dim: int, group: Any = None) -> Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (rank ``r`` of ``P`` gets ``[r * n/P, (r + 1) * n/P)``).

    A view (a plain slice for autograd: a replicated ``x`` gets only the local chunk's gradient on each rank).
    ``P`` must divide ``x.shape[dim]``.
    """
    p = group_size(group)
    n = x.shape[dim]
    if n % p:
        raise ValueError(
            f"split_sequence: dimension {dim} of size {n} (shape {tuple(x.shape)}) is not divisible by the "
            f"context-parallel group size {p}; pad it to a multiple of {p} (or use a CP degree that divides {n})."
        )
    return x.narrow(dim, group_rank(group) * (n // p), n // p)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Any) -> Tensor:
        p = group_size(group)
        ctx.dim, ctx.rank, ctx.size = dim, group_rank(group), x.shape[dim]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(p)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # what follows the gather is replicated (the same loss on every rank): the local slice is the exact
        # gradient, with no sum across ranks (see the module docstring)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


def gather_sequence(x: Tensor, dim: int, group: Any = None) -> Tensor:
    """All-gather the chunks of ``x`` along ``dim`` over ``group``, in rank order: the inverse of
    :func:`split_sequence`. Every rank must hold a chunk of the same shape.

    Backward: this rank's slice of the incoming gradient, not summed across ranks. That is the exact gradient when
    everything after the gather is replicated (every rank computes the same loss from the same gathered tensor,
    which counts once); summing would give ``P`` times it.
    """
    if group_size(group) == 1:
        return x
    dim = dim % x.dim()
    return _GatherSequence.apply(x, dim, group)
