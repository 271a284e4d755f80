"""Random draws of a training step that do not depend on how the global batch is split across ranks.

A method draws its noise and times through ``self.draws`` (a :class:`Draws`, made fresh for every training step
by :class:`~distill_mixins.core.DistillationCoreMixin`). Per-sample draws come from a counter-based generator: value
``j`` of a sample is a hash of ``(seed, iteration, micro-batch, stream, global sample index, j)``, where *stream*
counts the draws of the step in call order and the global index is the data-parallel rank's offset plus the local
index. So one process with the global batch and N processes with 1/N of it each draw the same numbers for the same
samples, a resumed run draws what the uninterrupted run drew (no RNG state to save), and a whole batch is drawn in a
few vectorised tensor operations on its own device. Decisions that change which networks run (the
backward-simulation step count) come from :meth:`Draws.shared_randint`, seeded without the sample index: the same
on every rank, so sharded networks never wait for a rank that runs them a different number of times.

The hash is SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014): a
sample's key is the SplitMix64 output at its global index in the stream's Weyl sequence, its values the outputs of
its own Weyl sequence from that key; 53-bit uniforms, normals by Box-Muller (both halves), in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_PER_SAMPLE, _SHARED = 0, 1
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_CHUNK = 1 << 22  # values hashed at once (bounds the int64 temporaries of a big video latent)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64's output mix of int64 bit patterns (wrapping arithmetic), elementwise."""
    x = (x ^ _shift_right(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MIX2)
    return x ^ _shift_right(x, 31)


def _weyl(start: Tensor, counters: Tensor) -> Tensor:
    """SplitMix64 outputs ``mix(start + (counter + 1) * golden)``: rows of ``start`` (n, 1) by ``counters`` (m,)."""
    return splitmix64(start + (counters + 1) * _signed(_GOLDEN))


def _unit_interval(bits: Tensor, open_at_zero: bool = False) -> Tensor:
    """53-bit uniforms in [0, 1) (or (0, 1]) from int64 bit patterns, float64."""
    top = _shift_right(bits, 11).double()
    return (top + 1.0 if open_at_zero else top) * 2.0**-53


@dataclass(frozen=True)
class DrawContext:
    """Where a step's draws come from: run ``seed``, ``iteration``, ``micro`` (gradient-accumulation micro-batch)
    and ``first_index`` (global index of this rank's first sample: data-parallel rank x local batch size)."""

    seed: int
    iteration: int
    micro: int = 0
    first_index: int = 0
    per_sample: bool = True
    """False: every draw comes from the global torch RNG, as plain ``torch.randn_like`` would (one process only)."""

    def __post_init__(self) -> None:
        for name in ("seed", "iteration", "micro", "first_index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DrawContext.{name}={value!r}: give an int >= 0.")


def mixed_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative ints (numpy ``SeedSequence``: neighbouring inputs give unrelated
    streams)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0] >> 1)


class Draws:
    """The random draws of one training step (see the module docstring). Every method call is one *stream*."""

    def __init__(self, context: DrawContext) -> None:
        self.context = context
        self._streams = 0

    def _next_stream(self) -> int:
        self._streams += 1
        return self._streams - 1

    def bits(self, n: int, count: int, device: torch.device | str = "cpu") -> Tensor:
        """The next stream's 64-bit patterns: ``count`` per local sample, (n, count) int64, sample ``i`` keyed by its
        global index ``first_index + i``."""
        c, stream = self.context, self._next_stream()
        base = torch.tensor([[_signed(mixed_seed(c.seed, c.iteration, c.micro, stream, _PER_SAMPLE))]], device=device)
        keys = _weyl(base, torch.arange(c.first_index, c.first_index + n, device=device)).reshape(n, 1)
        return torch.cat([_weyl(keys, torch.arange(s, min(s + _CHUNK, count), device=device))
                          for s in range(0, count, _CHUNK)] or [keys[:, :0]], dim=1)

    def _normals(self, n: int, count: int, device: torch.device | str) -> Tensor:
        """(n, count) float64 unit normals by Box-Muller: values ``2k`` and ``2k + 1`` are the cosine and sine
        halves of pair ``k``, which takes two patterns."""
        pairs = (count + 1) // 2
        b = self.bits(n, 2 * pairs, device)
        radius = torch.sqrt(-2.0 * torch.log(_unit_interval(b[:, 0::2], open_at_zero=True)))
        angle = 2.0 * math.pi * _unit_interval(b[:, 1::2])
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=2).reshape(n, 2 * pairs)[
            :, :count
        ]

    def randn_like(self, x: Tensor) -> Tensor:
        """Unit normal noise shaped like ``x`` (B, ...), sample by sample (global RNG: ``torch.randn_like``)."""
        if not self.context.per_sample:
            return torch.randn_like(x)
        n = x.shape[0]
        return self._normals(n, x[0].numel() if n else 0, x.device).to(x.dtype).reshape(x.shape)

    def rand(self, n: int) -> Tensor:
        """One uniform value in [0, 1) per sample, (n,) float64 on the CPU (global RNG: ``torch.rand``)."""
        if not self.context.per_sample:
            return torch.rand(n, dtype=torch.float64)
        return _unit_interval(self.bits(n, 1))[:, 0]

    def randn(self, n: int) -> Tensor:
        """One unit normal per sample, (n,) float64 on the CPU (global RNG: ``torch.randn``)."""
        if not self.context.per_sample:
            return torch.randn(n, dtype=torch.float64)
        return self._normals(n, 1, "cpu")[:, 0]

    def randint(self, low: int, high: int, n: int, count: int | None = None) -> Tensor:
        """One int in ``[low, high)`` per sample, (n,) long on the CPU, or ``count`` of them, (n, count) (global
        RNG: ``torch.randint``)."""
        shape = (n,) if count is None else (n, count)
        if not self.context.per_sample:
            return torch.randint(low, high, shape)
        u = _unit_interval(self.bits(n, 1 if count is None else count)).reshape(shape)
        return low + (u * (high - low)).long().clamp(max=high - low - 1)

    def shared_randint(self, low: int, high: int) -> int:
        """An int in ``[low, high)`` that every rank draws alike (no sample index in its seed; global RNG: the
        one process's own)."""
        if not self.context.per_sample:
            return int(torch.randint(low, high, ()).item())
        c, stream = self.context, self._next_stream()
        g = torch.Generator().manual_seed(mixed_seed(c.seed, c.iteration, c.micro, stream, _SHARED))
        return int(torch.randint(low, high, (), generator=g))


__all__ = ["DrawContext", "Draws", "mixed_seed", "splitmix64"]
