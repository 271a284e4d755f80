"""Random draws of a training step that do not depend on how the global batch is split across ranks.

A method draws its noise and times through ``self.draws`` (a :class:`Draws`, made fresh for every training step
by :class:`~distill_mixins.core.DistillationCoreMixin`). Each sample's draws come from a generator seeded by
``(seed, iteration, micro-batch, stream, global sample index)``, where *stream* counts the draws of the step in
call order and the global index is the data-parallel rank's offset plus the local index. So one process with the
global batch and N processes with 1/N of it each draw the same numbers for the same samples, and a resumed run
draws what the uninterrupted run drew (no RNG state to save). Decisions that change which networks run (the
backward-simulation step count) come from :meth:`Draws.shared_randint`, seeded without the sample index: the same
on every rank, so sharded networks never wait for a rank that runs them a different number of times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_PER_SAMPLE, _SHARED = 0, 1


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

    def generators(self, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
        """One generator per local sample (``n`` of them) for the next stream, seeded by its global index."""
        c, stream = self.context, self._next_stream()
        return [
            torch.Generator(device=device).manual_seed(
                mixed_seed(c.seed, c.iteration, c.micro, stream, _PER_SAMPLE, c.first_index + i)
            )
            for i in range(n)
        ]

    def randn_like(self, x: Tensor) -> Tensor:
        """Unit normal noise shaped like ``x`` (B, ...), sample by sample (global RNG: ``torch.randn_like``)."""
        if not self.context.per_sample:
            return torch.randn_like(x)
        gens = self.generators(x.shape[0], x.device)
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in gens])

    def per_sample(self, n: int, draw: Callable[[torch.Generator | None, int], Tensor]) -> Tensor:
        """``n`` values, one per sample: ``torch.cat([draw(g_0, 1), ..., draw(g_{n-1}, 1)])`` with per-sample
        generators, or ``draw(None, n)`` from the global RNG; e.g. training times from a sampler taking a generator
        and a count."""
        if not self.context.per_sample:
            return draw(None, n)
        return torch.cat([draw(g, 1) for g in self.generators(n)])

    def shared_randint(self, low: int, high: int) -> int:
        """An int in ``[low, high)`` that every rank draws alike (no sample index in its seed; global RNG: the
        one process's own)."""
        if not self.context.per_sample:
            return int(torch.randint(low, high, ()).item())
        c, stream = self.context, self._next_stream()
        g = torch.Generator().manual_seed(mixed_seed(c.seed, c.iteration, c.micro, stream, _SHARED))
        return int(torch.randint(low, high, (), generator=g))


__all__ = ["DrawContext", "Draws", "mixed_seed"]
