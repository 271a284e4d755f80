"""Factories of the Self-Forcing pipeline example (``pipeline.json`` names them as ``toy_pipeline:<name>``).

Replace them with your own: ``build_model(mixin, distill, **model_args)`` returns ``mixin`` composed onto your causal
host with your bidirectional teacher's weights; ``teacher_batches(**data_args)`` yields the host batches whose
conditions the teacher's ODE pairs are solved for; ``conditions(model, seed=..., **data_args)`` gives the
Self-Forcing stage its batches (a pure function of the micro-batch index, so a resumed run sees the same ones).
"""

from __future__ import annotations

from typing import Any

import torch
from distill_mixins.trainer import FunctionData
from loguru import logger

from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.train import load_toy_teacher


def build_model(mixin: type, distill: Any, teacher_weights: str | None = None, frames: int = 8) -> Any:
    """``mixin`` on the toy causal host. The teacher: the bidirectional toy transformer of ``teacher_weights``
    (``distill-mixins toy-teacher --arch dit``); without it a seeded untrained one (a plumbing check: the figures
    mean nothing)."""
    if teacher_weights is not None:
        host = load_toy_teacher(teacher_weights)
        net, text = host.net, host.text_encoder
    else:
        logger.warning("no teacher_weights: the example's teacher is an untrained network (a plumbing check only)")
        torch.manual_seed(0)
        net, text = ToyCausalDiT(max_frames=max(frames, 8)), ToyTextEncoder()
    if not isinstance(net, ToyCausalDiT):
        raise ValueError(f"{teacher_weights} holds a {type(net).__name__}; the causal pipeline needs the transformer "
                         "teacher (`distill-mixins toy-teacher --arch dit`).")
    composed = type(f"Toy{mixin.__name__}", (mixin, ToyCausalVideo2World), {})
    return composed(net, text, distill=distill)


def teacher_batches(num_clips: int = 64, batch_size: int = 16, seed: int = 1, frames: int = 8) -> list[dict]:
    """Toy clips and prompts whose first frames and prompts condition the teacher's ODE solves."""
    clips = make_clips(num_clips, seed=seed, frames=frames)
    return [{"clip": clips.video[i : i + batch_size], "prompt": clips.prompts[i : i + batch_size]}
            for i in range(0, num_clips, batch_size)]


def conditions(model: Any, *, seed: int, batch_size: int = 8, frames: int = 8) -> FunctionData:
    """Micro-batch ``step``: fresh toy clips (their first frames and prompts are the conditions)."""
    def batch(step: int) -> dict:
        clips = make_clips(batch_size, seed=seed * 1_000_003 + step, frames=frames)
        return {"clip": clips.video, "prompt": clips.prompts}

    return FunctionData(batch)
