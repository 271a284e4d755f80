"""The toy Video2World teacher as a host, in the Cosmos style: rectified flow, velocity output, first-frame
conditioning by frame mask, a text prompt, and classifier-free guidance learnt by dropping the prompt.

Batches are dicts ``{"clip": (B, 3, T, H, W) RGB in [-1, 1], "prompt": list of B strings}``. The latent is
``encode(clip) = (clip + 1) / 2`` (black background -> 0); ``decode`` inverts it. The condition holds the
pooled prompt embedding and the first latent frame (:class:`ToyCondition`, a ``FrameConditioning``); the
uncondition is the same with the empty prompt's embedding, so guidance acts on the text only (as Cosmos).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.unet import ToyUNet


@dataclass
class ToyCondition:
    """Text embedding (B, D), ground-truth latent frames (B, C, T, H, W) and their frame mask (B, 1, T, 1, 1)."""

    text: Tensor
    gt_frames: Tensor
    frame_mask: Tensor

    def to(self, device: torch.device | str) -> ToyCondition:
        return ToyCondition(self.text.to(device), self.gt_frames.to(device), self.frame_mask.to(device))


def first_frame_mask(batch: int, frames: int, device: torch.device | str = "cpu") -> Tensor:
    """Frame mask (B, 1, T, 1, 1) with the first frame given."""
    mask = torch.zeros(batch, 1, frames, 1, 1, device=device)
    mask[:, :, 0] = 1.0
    return mask


class ToyVideo2World(nn.Module):
    """Toy Video2World host: ``net`` a :class:`ToyUNet` predicting the clean latent, returned as the flow
    velocity ``v = (x - x0) / tau`` (``x = (1 - tau) x0 + tau eps``, ``v = eps - x0``).

    Compose it like any host: ``class ToyDMD2(DMD2Mixin, ToyVideo2World)``. ``text_encoder`` is the frozen
    prompt conditioner during distillation (trained with the teacher, see :mod:`distill_mixins.toy.train`).
    """

    scaling = "rectified_flow"
    prediction_type = "velocity"
    sigma_data = 1.0

    def __init__(self, net: nn.Module | None = None, text_encoder: ToyTextEncoder | None = None) -> None:
        super().__init__()
        self.net = net if net is not None else ToyUNet()
        self.text_encoder = text_encoder if text_encoder is not None else ToyTextEncoder()

    # ------------------------------------------------------------------ tokenizer
    @staticmethod
    def encode(clip: Tensor) -> Tensor:
        """RGB clip in [-1, 1] (B, 3, T, H, W) -> latent in [0, 1] (background 0)."""
        return (clip + 1.0) * 0.5

    @staticmethod
    def decode(latent: Tensor) -> Tensor:
        """Latent (B, 3, T, H, W) -> RGB clip in [-1, 1] (not clamped)."""
        return latent * 2.0 - 1.0

    # ---------------------------------------------------------------- conditions
    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Pooled prompt embeddings (B, D) on the network's device."""
        return self.text_encoder(list(prompts))

    def make_condition(self, latent: Tensor, prompts: Sequence[str]) -> tuple[ToyCondition, ToyCondition]:
        """Condition and uncondition (empty prompt) for latent clips (B, C, T, H, W) whose first frame is given."""
        if len(prompts) != latent.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {latent.shape[0]} clips: give one prompt a clip.")
        mask = first_frame_mask(latent.shape[0], latent.shape[2], latent.device)
        with torch.no_grad():  # one encoder pass for the prompts and the empty prompt
            embeddings = self.embed_prompts([*prompts, ""]).to(latent.device)
        text, empty = embeddings[:-1], embeddings[-1:].expand(len(prompts), -1)
        condition = ToyCondition(text=text, gt_frames=latent, frame_mask=mask)
        return condition, replace(condition, text=empty)

    def get_data_and_condition(self, batch: dict[str, Any]) -> tuple[Tensor, ToyCondition, ToyCondition]:
        """Latent clip x0 (B, 3, T, H, W), condition (prompt + first frame), uncondition (empty prompt + frame)."""
        if not isinstance(batch, dict) or "clip" not in batch or "prompt" not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise KeyError(f"toy batches are dicts with 'clip' (B, 3, T, H, W) and 'prompt' (B strings); got {keys}.")
        x0 = self.encode(batch["clip"])
        condition, uncondition = self.make_condition(x0, batch["prompt"])
        return x0, condition, uncondition

    # -------------------------------------------------------------------- network
    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: ToyCondition) -> Tensor:
        """Flow velocity (B, C, T, H, W) of ``net`` at the rectified-flow state x and tau = ``time`` (B,)."""
        x0 = net(x, time, condition.frame_mask, condition.text)
        tau = time.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - x0.to(x.dtype)) / tau

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        """Blocks GAN heads may tap: the UNet's down, middle and up ResBlocks, in order."""
        return [*net.down, *net.middle, *net.up]
