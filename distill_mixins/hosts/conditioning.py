"""Conditions of the diffusers video hosts: text embeddings, Video2World frames, and a text conditioner.

A host's condition is a :class:`VideoCondition`: the text embeddings the transformer cross-attends to
(``encoder_hidden_states``, (B, L, D)) and the Video2World frames (``gt_frames`` (B, C, T, H, W) with
``frame_mask`` (B, 1, T, 1, 1), 1 on the given frames). It satisfies :class:`distill_mixins.FrameConditioning`,
so the library pastes the given frames into the network input (at ``DistillConfig.conditional_sigma``) and
into the output x0. ``frame_mask`` all zeros is text-to-world.

Text embeddings come precomputed in the batch (``prompt_embeds``), or from a :class:`TextConditioner` that runs
a transformers text encoder. :class:`ByteTokenizer` (from :mod:`distill_mixins.text`) is a vocabulary-free
tokenizer for tiny test encoders.
No part of this module needs diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from distill_mixins.text import ByteTokenizer

HIDDEN_STATES = ("last", "all_normalized")


@dataclass
class VideoCondition:
    """Text embeddings and Video2World frames of a batch.

    encoder_hidden_states: (B, L, D) text embeddings; gt_frames: (B, C, T, H, W) clean latents (only the
    masked frames are read); frame_mask: (B, 1, T, 1, 1), 1 on the conditioning frames (all 0: text-to-world).
    """

    encoder_hidden_states: Tensor
    gt_frames: Tensor
    frame_mask: Tensor


def frame_mask_for(frames: Tensor, num_conditional_frames: int | Tensor) -> Tensor:
    """(B, 1, T, 1, 1) mask, 1 on the first ``num_conditional_frames`` latent frames of ``frames`` (B, C, T, H, W).

    ``num_conditional_frames``: an int for every sample, or a (B,) integer tensor, each in ``0..T``.
    """
    if frames.ndim != 5:
        raise ValueError(f"frames must be a latent video (B, C, T, H, W), got shape {tuple(frames.shape)}.")
    b, _, t, _, _ = frames.shape
    counts = torch.as_tensor(num_conditional_frames, device=frames.device).long().reshape(-1)
    if counts.numel() not in (1, b):
        raise ValueError(f"num_conditional_frames has {counts.numel()} entries for a batch of {b}: give an int or (B,)")
    counts = counts.expand(b)
    if bool((counts < 0).any()) or bool((counts > t).any()):
        raise ValueError(f"num_conditional_frames={counts.tolist()} must lie in 0..{t} (the video has {t} frames).")
    index = torch.arange(t, device=frames.device)
    mask = (index[None, :] < counts[:, None]).to(frames.dtype)  # (B, T)
    return mask[:, None, :, None, None]


# ------------------------------------------------------------------------------------------------ tokenizer


class Tokenizer(Protocol):
    """The call a :class:`TextConditioner` makes: a transformers tokenizer, or :class:`ByteTokenizer`."""

    def __call__(
        self, text: list[str], *, padding: str, max_length: int, truncation: bool, return_attention_mask: bool,
        return_tensors: str,
    ) -> Mapping[str, Tensor]:
        """``{"input_ids": (B, max_length) int64, "attention_mask": (B, max_length)}``."""
        ...


# ----------------------------------------------------------------------------------------------- conditioner


class TextConditioner:
    """Prompts -> text embeddings (B, L, D) with a frozen transformers text encoder, as the diffusers pipelines do.

    ``hidden_states="last"`` with ``zero_padding=True`` is the Wan pipelines' ``_get_t5_prompt_embeds``: the
    encoder's ``last_hidden_state`` with the padded positions set to 0 (``max_length`` 512 for Wan 2.x).
    ``hidden_states="all_normalized"`` with ``zero_padding=False, pass_attention_mask=False`` is Cosmos
    Predict2.5's ``_get_prompt_embeds``: every layer's hidden state (``hidden_states[1:]``) standardized over D
    (``(h - mean) / (std + 1e-8)``) and concatenated, (B, L, num_layers * D). Cosmos applies a chat template
    before tokenizing; wrap the tokenizer to do that.

    The conditioner is not an ``nn.Module`` of the host: it is never trained and never saved in a distillation
    checkpoint. Move it with :meth:`to`. The uncondition of classifier-free guidance is the empty prompt's
    embedding (:meth:`empty`), computed once and cached.
    """

    def __init__(
        self, encoder: nn.Module, tokenizer: Tokenizer, *, max_length: int = 512, hidden_states: str = "last",
        zero_padding: bool = True, pass_attention_mask: bool = True,
    ) -> None:
        if hidden_states not in HIDDEN_STATES:
            raise ValueError(
                f"TextConditioner hidden_states={hidden_states!r}; choose one of {', '.join(HIDDEN_STATES)}."
            )
        if max_length < 1:
            raise ValueError(f"TextConditioner max_length={max_length} must be >= 1.")
        self.encoder = encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_states = hidden_states
        self.zero_padding = zero_padding
        self.pass_attention_mask = pass_attention_mask
        self._empty: Tensor | None = None

    @property
    def device(self) -> torch.device:
        """The text encoder's device."""
        param = next(self.encoder.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextConditioner:
        """Move the text encoder (and the cached empty-prompt embedding); returns self."""
        self.encoder.to(device=device, dtype=dtype)
        self._empty = None
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Embeddings (B, max_length, D) of ``prompts`` (B strings), on the encoder's device."""
        if isinstance(prompts, str):
            raise TypeError("TextConditioner.encode takes a list of prompts, not one string.")
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
            return_attention_mask=True, return_tensors="pt",
        )
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        all_layers = self.hidden_states == "all_normalized"
        out = self.encoder(
            input_ids=input_ids, attention_mask=mask if self.pass_attention_mask else None,
            output_hidden_states=all_layers,
        )
        if all_layers:
            layers = out.hidden_states[1:]  # Cosmos Predict2.5: every layer after the embedding, standardized
            emb = torch.cat([(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in layers], -1)
        else:
            emb = out.last_hidden_state
        if self.zero_padding:
            emb = emb * mask[..., None].to(emb.dtype)
        return emb

    def empty(self, batch_size: int) -> Tensor:
        """The empty prompt's embedding for ``batch_size`` samples, (B, max_length, D): the CFG uncondition."""
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty.expand(batch_size, -1, -1)


__all__ = ["ByteTokenizer", "TextConditioner", "Tokenizer", "VideoCondition", "frame_mask_for"]
