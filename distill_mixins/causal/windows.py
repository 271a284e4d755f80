"""Conditions of rollouts longer than the training clip (Self-Forcing's longer training rollouts, long streaming).

A rollout of L > T frames runs on :func:`extend_condition` (a Video2World condition's ground-truth frames and mask
padded with frames that are not given); the last T frames of it are scored on :func:`window_condition` (the
window's own first frames take the place of the given frames, as when a Video2World model extends a video from its
last frames). Conditions without ground-truth frames (text only) are used as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from distill_mixins.contract import FrameConditioning


def _replace(condition: Any, **fields: Tensor) -> Any:
    if not dataclasses.is_dataclass(condition):
        raise TypeError(
            f"{type(condition).__name__} carries ground-truth frames (gt_frames, frame_mask) but is not a dataclass: "
            "rollouts longer than the clip rebuild it with other frames, so make the condition a dataclass."
        )
    return dataclasses.replace(condition, **fields)


def extend_condition(condition: Any, frames: int) -> Any:
    """``condition`` for a rollout of ``frames`` frames (>= its T): ``gt_frames`` (B, C, T, H, W) and ``frame_mask``
    (B, 1, T, 1, 1) padded to ``frames`` with zeros (frames that are not given); other conditions unchanged."""
    if not isinstance(condition, FrameConditioning):
        return condition
    have = condition.gt_frames.shape[2]
    if frames < have:
        raise ValueError(f"extend_condition: frames={frames} is shorter than the condition's {have} frames.")
    pad = frames - have

    def padded(x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)

    return _replace(condition, gt_frames=padded(condition.gt_frames), frame_mask=padded(condition.frame_mask))


def window_condition(condition: Any, window: Tensor) -> Any:
    """``condition`` (of a T-frame clip) for ``window`` (B, C, T, H, W), the last T frames of a longer rollout: the
    window's frames (detached) are its ground-truth frames under the original mask, so its first frames stand where
    the clip's given frames stood; other conditions unchanged."""
    if not isinstance(condition, FrameConditioning):
        return condition
    if window.shape[2] != condition.gt_frames.shape[2]:
        raise ValueError(f"window_condition: the window has {window.shape[2]} frames, the condition "
                         f"{condition.gt_frames.shape[2]}; score windows of the clip's length.")
    return _replace(condition, gt_frames=window.detach().to(condition.gt_frames.dtype))


__all__ = ["extend_condition", "window_condition"]
