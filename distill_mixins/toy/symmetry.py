"""The toy world's symmetries: the 8 rotations and reflections of the square frame (the dihedral group D4).

Moving a toy clip by one of them (and renaming the prompt's direction to match) gives another clip of the same
world: walls, bounces, shapes and speeds are all symmetric. A teacher pair ``(kd/noise, kd/teacher_x0)`` moved by the
same symmetry is a sample of the moved condition's distribution, so each KD pair stands for eight; a student
trained on them learns the teacher's map averaged over the group. :class:`SymmetricPairs` draws one symmetry per
sample from ``(seed, step)``, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill_mixins.methods.kd import KD_NOISE, KD_PATH, KD_TEACHER_X0
from distill_mixins.toy.clips import DIRECTIONS, parse_prompt
from distill_mixins.trainer import DataSource
from distill_mixins.trainer.seeding import mixed_seed

_NAMES = {step: name for name, step in DIRECTIONS.items()}


@dataclass(frozen=True)
class Symmetry:
    """``transpose`` (swap x and y) first, then ``flip_x`` (x -> W - x) and ``flip_y`` (y -> H - y)."""

    transpose: bool
    flip_x: bool
    flip_y: bool

    def apply(self, x: Tensor) -> Tensor:
        """``x`` (..., H, W) with H = W, moved (a copy)."""
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"toy symmetries need square frames, got (..., {x.shape[-2]}, {x.shape[-1]}).")
        if self.transpose:
            x = x.transpose(-1, -2)
        dims = [d for d, on in ((-1, self.flip_x), (-2, self.flip_y)) if on]
        return (x.flip(dims) if dims else x).contiguous()

    def direction(self, name: str) -> str:
        """The direction ``name`` (a key of :data:`DIRECTIONS`) becomes under this symmetry."""
        dx, dy = DIRECTIONS[name]
        if self.transpose:
            dx, dy = dy, dx
        return _NAMES[(-dx if self.flip_x else dx, -dy if self.flip_y else dy)]

    def prompt(self, prompt: str) -> str:
        """A toy prompt with its direction moved: e.g. ``flip_x`` turns "... moving left" into "... moving right"."""
        color, shape, direction = parse_prompt(prompt)
        return f"{color} {shape} moving {self.direction(direction)}"


SYMMETRIES = tuple(Symmetry(t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True))
"""The 8 elements of D4; ``SYMMETRIES[0]`` is the identity."""


def move_batch(batch: dict[str, Any], moves: Sequence[Symmetry], keys: Sequence[str]) -> dict[str, Any]:
    """``batch`` with sample i of every tensor in ``keys`` (B, ..., H, W) moved by ``moves[i]`` and its
    ``prompt`` renamed to match; other entries are kept as they are."""
    out = dict(batch)
    for key in keys:
        if key in batch:
            out[key] = torch.stack([g.apply(x) for g, x in zip(moves, batch[key], strict=True)])
    out["prompt"] = [g.prompt(p) for g, p in zip(moves, batch["prompt"], strict=True)]
    return out


class SymmetricPairs:
    """A :class:`~distill_mixins.trainer.DataSource` of toy KD batches (``prompt`` and the tensors ``keys``) from
    ``base``, each sample moved by a symmetry drawn uniformly from :data:`SYMMETRIES` with ``(seed, step)``; by default
    the host's ``clip`` and the KD fields ``kd/noise``, ``kd/teacher_x0`` and ``kd/path`` move."""

    def __init__(
        self, base: DataSource, *, seed: int = 0, keys: Sequence[str] = ("clip", KD_NOISE, KD_TEACHER_X0, KD_PATH)
    ) -> None:
        self.base, self.seed, self.keys = base, seed, tuple(keys)

    def batch(self, step: int) -> dict[str, Any]:
        """Micro-batch ``step`` of ``base``, moved."""
        batch = self.base.batch(step)
        if not isinstance(batch, dict) or "prompt" not in batch:
            raise KeyError("SymmetricPairs needs toy batches: dicts with 'prompt' and the clip tensors.")
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, step))
        picks = torch.randint(len(SYMMETRIES), (len(batch["prompt"]),), generator=generator)
        return move_batch(batch, [SYMMETRIES[i] for i in picks.tolist()], self.keys)


def symmetric_ode_pairs(model: Any, *, seed: int, root: str, batch_size: int = 16) -> SymmetricPairs:
    """CausalKD's data on the square's symmetries: the ODE pairs in ``root``
    (:func:`~distill_mixins.trainer.pipeline.ode_pair_data`), each pair moved by a random symmetry, so that every
    pair stands for eight (``toy-causal-kd --symmetries``, ``demo-causal --kd-symmetries``)."""
    from distill_mixins.trainer.pipeline import ode_pair_data

    return SymmetricPairs(ode_pair_data(model, seed=seed, root=root, batch_size=batch_size), seed=seed)
