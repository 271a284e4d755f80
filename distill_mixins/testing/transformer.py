"""A tiny video diffusion transformer (DiT) for tests, whose network can run context-parallel with Ulysses attention.

:class:`TinyVideoDiT` has the call signature of :class:`~distill_mixins.testing.hosts.MLPDenoiser`,
``net(x (B, C, T, H, W), time (B,), labels (B,)) -> (B, C, T, H, W)``, so :class:`~distill_mixins.testing.hosts.ToyHost`
hosts it as it is: ``class Distill(DMD2Mixin, ToyHost)`` with ``Distill(TinyVideoDiT(4), "rf_velocity", ...)``. The
output is the raw network output, read as the native output of the host's ``form`` (no preconditioning).

Context parallel (CP): :meth:`TinyVideoDiT.set_context_parallel` (or :func:`set_context_parallel` on a composed model,
whose teacher, student, critic and EMA are copies) makes the forward split its tokens over a process group; see the
class docstring for the split rule and the gradient convention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill_mixins.parallel.attention import attention
from distill_mixins.parallel.ulysses import (
    gather_sequence,
    group_size,
    split_sequence,
    token_split,
    ulysses_attention,
)
from distill_mixins.shared_ref import SharedRef
from distill_mixins.testing.hosts import ToyHost

__all__ = [
    "TinyVideoDiT",
    "apply_rope",
    "patchify",
    "rope_angles",
    "rope_axis_dims",
    "set_context_parallel",
    "unpatchify",
]

Grid = tuple[int, int, int]
"""The token grid (T', H', W') = (T / pt, H / ph, W / pw)."""


# ------------------------------------------------------------------------------------------------- patches


def patchify(x: Tensor, patch: Grid) -> tuple[Tensor, Grid]:
    """(B, C, T, H, W) -> tokens (B, T'*H'*W', C*pt*ph*pw) in (T', H', W') order, and the grid (T', H', W').

    Each token is one non-overlapping (pt, ph, pw) patch, flattened in (C, pt, ph, pw) order.
    """
    b, c, *size = x.shape
    for axis, n, p in zip("THW", size, patch, strict=True):
        if n % p:
            raise ValueError(
                f"TinyVideoDiT: input {axis}={n} (shape {tuple(x.shape)}) is not a multiple of the patch size {p} "
                f"along {axis} (patch {tuple(patch)}); resize or crop the input to a multiple of {p}."
            )
    grid = tuple(n // p for n, p in zip(size, patch, strict=True))
    (t, h, w), (pt, ph, pw) = grid, patch
    tokens = x.reshape(b, c, t, pt, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return tokens.reshape(b, t * h * w, c * pt * ph * pw), grid


def unpatchify(tokens: Tensor, grid: Grid, patch: Grid) -> Tensor:
    """The inverse of :func:`patchify`: tokens (B, T'*H'*W', C*pt*ph*pw) -> (B, C, T, H, W)."""
    (t, h, w), (pt, ph, pw) = grid, patch
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, -1, t * pt, h * ph, w * pw)


# ---------------------------------------------------------------------------------------------------- RoPE


def rope_axis_dims(head_dim: int) -> Grid:
    """How a head's dimensions split over the (t, h, w) axes of the 3D rotary embedding: h and w get
    ``2 * (head_dim // 6)`` each, t the rest (all even). ``head_dim`` must be even and at least 6."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(
            f"TinyVideoDiT: head_dim={head_dim} (dim / heads) must be even and >= 6 for the 3D rotary embedding "
            "(an even slice per axis t, h, w); choose dim and heads so that dim / heads is such a number."
        )
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(
    size: int, dim: int, theta: float = 10000.0, *, dtype: torch.dtype = torch.float64, device: Any = None
) -> Tensor:
    """Rotation angles (size, dim / 2) of positions ``0 .. size - 1`` for an axis with ``dim`` (even) dimensions:
    ``position * theta ** (-2i / dim)``."""
    frequencies = theta ** (-torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)
    return torch.arange(size, dtype=dtype, device=device)[:, None] * frequencies


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., S, heads, D) with the pairs ``(x[..., 2i], x[..., 2i + 1])`` rotated by the angles of ``cos``, ``sin``
    (S, D / 2): one complex product."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)[:, None]).flatten(-2)


class _Rotation(torch.autograd.Function):
    """:func:`_rotate` with its derivatives: the gradient is rotated back (``-angle``), a tangent forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return _rotate(x, cos, sin)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])
        ctx.save_for_forward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None

    @staticmethod
    def jvp(ctx: Any, x_dot: Tensor, cos_dot: Any, sin_dot: Any) -> Tensor:
        cos, sin = ctx.saved_tensors
        return _rotate(x_dot, cos, sin)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the consecutive pairs ``(x[..., 2i], x[..., 2i + 1])`` of x (B, S, heads, D) by the angles whose
    ``cos`` and ``sin`` are (S, D / 2).

    In float32/float64 with constant angles: one complex product (the same four products and two sums, ~8x faster
    on CPU than the elementwise form), with a backward that rotates the gradient back and a forward derivative that
    rotates the tangent; it saves only ``cos`` and ``sin`` (shared by every call, as the activation-memory formula
    counts). Otherwise (autocast's mixed dtypes, angles that need a gradient) the elementwise form."""
    if x.dtype in (torch.float32, torch.float64) and cos.dtype == sin.dtype == x.dtype:
        if not (cos.requires_grad or sin.requires_grad):
            return _Rotation.apply(x, cos, sin) if torch.is_grad_enabled() and x.requires_grad else _rotate(x, cos, sin)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


# -------------------------------------------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE over (B, S, dim) tokens: plain, or Ulysses over a CP group."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, group: Any = None) -> Tensor:
        """x (B, S, dim) (this rank's tokens under CP), cos/sin (S, head_dim / 2) of the same tokens -> (B, S, dim)."""
        b, s, dim = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, dim // self.heads).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if group is None:
            o = attention(q, k, v, layout="bshd")
        else:
            o = ulysses_attention(q, k, v, group, layout="bshd")
        return self.out(o.reshape(b, s, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; per token except attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, group: Any = None) -> Tensor:
        """x (B, S, dim) -> (B, S, dim)."""
        x = x + self.attn(self.norm1(x), cos, sin, group)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------------- model


class TinyVideoDiT(nn.Module):
    """A tiny video DiT: ``forward(x (B, C, T, H, W), time (B,), labels (B,)) -> (B, C, T, H, W)``.

    Patchify by a Linear on each flattened (pt, ph, pw) patch -> tokens (B, S, dim), S = T'*H'*W' in (T', H', W')
    order; add one embedding per sample (sinusoidal features of ``time`` through an MLP, plus a label embedding:
    label -1, or any negative label, is the unconditional CFG label, index ``num_labels``); ``depth`` blocks of
    self-attention with a 3D rotary embedding (:func:`rope_axis_dims`: each axis t, h, w rotates its own slice of
    the head dimensions by its token coordinate; ``max_size`` is the largest token grid accepted) and an
    MLP; final LayerNorm and Linear back to (B, S, C*pt*ph*pw); unpatchify.

    Context parallel (:meth:`set_context_parallel`, a group of size ``P > 1``): after the patch embedding each rank
    keeps a contiguous chunk of the tokens (B, S/P, dim), in rank order (:func:`split_sequence`), and the matching
    rows (S/P, head_dim/2) of the RoPE cos/sin of the full sequence; attention is :func:`ulysses_attention` over the
    group (``P`` must divide ``heads``, checked by :meth:`set_context_parallel`); the output of the final Linear
    (B, S/P, C*pt*ph*pw) is gathered (:func:`gather_sequence`) before unpatchify, so every rank returns the full
    (B, C, T, H, W). Split rule (:meth:`context_split`): along T' (``"frames"``: rank r gets frames
    ``[r T'/P, (r+1) T'/P)``) when ``P`` divides T', else along the flattened tokens (``"tokens"``) when ``P``
    divides S, else a ValueError. Since T' is the slowest token axis both are the same contiguous chunks of the
    flattened sequence.

    Gradients under CP (the convention of :mod:`distill_mixins.parallel.ulysses`): with the same input and the same
    loss of the gathered output on every rank, every parameter's gradient covers the local tokens only: all-reduce
    (SUM) every parameter gradient over the CP group (no parameter acts after the gather). A replicated input x
    likewise gets only the local chunk's part on each rank; the sum over the group is the full gradient.
    """

    def __init__(
        self, channels: int, patch: Grid = (1, 2, 2), dim: int = 32, depth: int = 2, heads: int = 4,
        num_labels: int = 2, max_size: Grid = (16, 16, 16), *, mlp_ratio: int = 4, seed: int | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"TinyVideoDiT: dim={dim} is not divisible by heads={heads}; choose dim a multiple.")
        self.channels, self.patch, self.dim, self.heads = channels, tuple(patch), dim, heads
        self.num_labels, self.max_size = num_labels, tuple(max_size)
        self.axis_dims = rope_axis_dims(dim // heads)
        if seed is not None:
            torch.manual_seed(seed)
        patch_dim = channels * math.prod(self.patch)
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.time_embed = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_embedding = nn.Embedding(num_labels + 1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)
        self._cp = SharedRef(None)

    # ----------------------------------------------------------------------------------- context parallel

    @property
    def context_parallel_group(self) -> Any:
        """The CP process group, None when context parallel is off."""
        return self._cp.value

    @property
    def context_parallel_size(self) -> int:
        """The CP group size (1 when off)."""
        return 1 if self._cp.value is None else group_size(self._cp.value)

    def set_context_parallel(self, group: Any) -> None:
        """Run the forward context-parallel over ``group`` (a ProcessGroup); None or a group of size one: off.

        Raises a ValueError when the group size does not divide ``heads`` (Ulysses splits the heads).
        """
        p = 1 if group is None else group_size(group)
        if p > 1 and self.heads % p:
            divisors = [n for n in range(1, self.heads + 1) if self.heads % n == 0]
            raise ValueError(
                f"TinyVideoDiT context parallel: heads={self.heads} is not divisible by the CP size {p} (Ulysses "
                f"attention splits the heads over the group); use a CP size that divides {self.heads} (one of "
                f"{divisors}) or build the model with heads a multiple of {p}."
            )
        self._cp = SharedRef(group if p > 1 else None)

    def context_split(self, grid: Grid) -> str:
        """How the tokens of ``grid`` (T', H', W') split over the CP group: ``"frames"`` (along T'), ``"tokens"``
        (along the flattened T'*H'*W'), or ``"none"`` when CP is off; a ValueError when neither divides."""
        return token_split(grid, self.context_parallel_size, f"TinyVideoDiT context parallel (patch {self.patch})")

    # --------------------------------------------------------------------------------------------- forward

    def rope(self, grid: Grid, dtype: torch.dtype, device: Any = None) -> tuple[Tensor, Tensor]:
        """cos and sin (T'*H'*W', head_dim / 2) of the full token grid, tokens in (T', H', W') order (the angles
        computed in float32 or wider, then cast to ``dtype``)."""
        if any(n > m for n, m in zip(grid, self.max_size, strict=True)):
            raise ValueError(
                f"TinyVideoDiT: the token grid (T', H', W') = {tuple(grid)} exceeds max_size={self.max_size}; "
                "build the model with a larger max_size."
            )
        wide = torch.promote_types(dtype, torch.float32)
        parts = []
        for axis, (n, d) in enumerate(zip(grid, self.axis_dims, strict=True)):
            table = rope_angles(n, d, dtype=wide, device=device)
            shape = [1, 1, 1, table.shape[1]]
            shape[axis] = n
            parts.append(table.reshape(shape).expand(*grid, -1))
        angles = torch.cat(parts, dim=-1).reshape(math.prod(grid), -1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def embed_condition(self, time: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """Per-sample embedding (B, dim) of time (B,) and labels (B,) (negative: unconditional): sin and cos of
        ``time * f`` for 8 frequencies f from 1 to 100 (in float32 or wider) through an MLP, plus the label's."""
        device, wide = self.patch_embed.weight.device, torch.promote_types(dtype, torch.float32)
        angles = time.to(device=device, dtype=wide)[:, None] * torch.logspace(0, 2, 8, dtype=wide, device=device)
        features = torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)
        index = torch.where(labels < 0, torch.full_like(labels, self.num_labels), labels).to(device)
        return self.time_embed(features) + self.label_embedding(index)

    def forward(self, x: Tensor, time: Tensor, labels: Tensor) -> Tensor:
        """x (B, C, T, H, W), time (B,), labels (B,) long -> (B, C, T, H, W) (the full output on every CP rank)."""
        dtype = self.patch_embed.weight.dtype
        patches, grid = patchify(x.to(dtype), self.patch)
        tokens = self.patch_embed(patches) + self.embed_condition(time, labels, dtype)[:, None]
        cos, sin = self.rope(grid, dtype, self.patch_embed.weight.device)
        group = self.context_parallel_group
        if self.context_split(grid) != "none":  # "frames" and "tokens" are the same contiguous chunks of S
            tokens = split_sequence(tokens, 1, group)
            cos, sin = split_sequence(cos, 0, group), split_sequence(sin, 0, group)
        for block in self.blocks:
            tokens = block(tokens, cos, sin, group)
        out = self.head(self.norm(tokens))
        if group is not None:
            out = gather_sequence(out, 1, group)
        return unpatchify(out, grid, self.patch).to(x.dtype)


def set_context_parallel(module: nn.Module, group: Any) -> int:
    """:meth:`TinyVideoDiT.set_context_parallel` on every :class:`TinyVideoDiT` inside ``module`` (e.g. a composed
    model: teacher, student, critic and EMA); returns how many there were."""
    nets = [m for m in module.modules() if isinstance(m, TinyVideoDiT)]
    for net in nets:
        net.set_context_parallel(group)
    return len(nets)


class DiTHost(ToyHost):
    """A :class:`ToyHost` around :class:`TinyVideoDiT` networks, with the context-parallel capability
    (:class:`~distill_mixins.contract.ContextParallelHost`): ``class Distill(DMD2Mixin, DiTHost)``."""

    def enable_context_parallel(self, net: nn.Module, group: Any) -> None:
        """:meth:`TinyVideoDiT.set_context_parallel` on ``net`` (a TypeError for any other network)."""
        if not isinstance(net, TinyVideoDiT):
            raise TypeError(f"DiTHost runs TinyVideoDiT networks context-parallel, got {type(net).__name__}.")
        net.set_context_parallel(group)
