"""What the diffusers video hosts share: the rectified-flow schedule, batches, conditions, taps, checkpointing, loading.

A host wraps a diffusers video transformer ``net`` without touching its forward: ``predict`` builds the inputs the
diffusers pipelines build (timestep format, conditioning inputs) and returns the transformer's raw flow-matching
velocity ``eps - x0`` on the state ``x = (1 - tau) x0 + tau eps`` (``FlowMatchEulerDiscreteScheduler``'s
convention). Subclasses (:class:`~distill_mixins.hosts.CosmosVideo2WorldHost`,
:class:`~distill_mixins.hosts.WanVideo2WorldHost`) write ``predict`` and name the transformer class and its blocks.

Batches are dicts:

- ``x0`` (B, C, T, H, W): clean latents; their first ``num_conditional_frames`` frames condition Video2World;
- ``prompt_embeds`` (B, L, D), or ``prompt`` (B strings) encoded by the host's :class:`TextConditioner`;
- ``uncond_prompt_embeds`` (B, L, D), optional: the CFG uncondition (e.g. a negative prompt's embedding); default
  the conditioner's empty-prompt embedding, or zeros without a conditioner;
- ``num_conditional_frames``, optional: an int or a (B,) tensor overriding the host's default.

KD batches add ``noise`` and ``teacher_x0`` (see :mod:`distill_mixins.methods.kd`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import ModelMixin
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from distill_mixins.hosts import context_parallel
from distill_mixins.hosts.conditioning import TextConditioner, VideoCondition, frame_mask_for
from distill_mixins.hosts.loading import load_transformer


class DiffusersVideoHost(nn.Module):
    """Host contract for a diffusers video transformer trained with rectified flow (velocity ``eps - x0``).

    Compose a method mixin first: ``class CosmosDMD2(DMD2Mixin, CosmosVideo2WorldHost)``. Subclasses set
    ``transformer_class`` and ``block_attribute`` and implement ``predict(net, x, time, condition)``: the raw
    velocity ``eps - x0`` (B, C, T, H, W) of ``net`` at native state x and RF time tau (B,) or (B, T).
    """

    scaling = "rectified_flow"
    prediction_type = "velocity"
    sigma_data = 1.0
    transformer_class: ClassVar[type[ModelMixin]]
    block_attribute: ClassVar[str]
    """Name of the transformer's ``nn.ModuleList`` of blocks, indexed by feature taps."""
    context_parallel_plan: ClassVar[context_parallel.ContextParallelPlan | None] = None
    """Where :meth:`enable_context_parallel` splits and gathers; None: the plan of the transformer's class."""

    def __init__(
        self, net: ModelMixin, *, conditioner: TextConditioner | None = None, num_conditional_frames: int = 1,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(net, self.transformer_class):
            raise TypeError(
                f"{type(self).__name__} needs a diffusers {self.transformer_class.__name__} as net, got "
                f"{type(net).__name__}; load one with {type(self).__name__}.from_pretrained(path) or "
                f"load_transformer({self.transformer_class.__name__}, path)."
            )
        if conditioner is not None and not isinstance(conditioner, TextConditioner):
            raise TypeError(f"conditioner must be a TextConditioner or None, got {type(conditioner).__name__}.")
        if isinstance(num_conditional_frames, bool) or not isinstance(num_conditional_frames, int) or (
            num_conditional_frames < 0
        ):
            raise ValueError(
                f"num_conditional_frames={num_conditional_frames!r} must be an int >= 0 (0: text-to-world)."
            )
        self.net = net
        self.conditioner = conditioner
        self.num_conditional_frames = num_conditional_frames
        self.set_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], *, config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        subfolder: str | None = None, torch_dtype: torch.dtype | None = None, **kwargs: Any,
    ) -> DiffusersVideoHost:
        """``cls(load_transformer(cls.transformer_class, path, ...), **kwargs)``: a model whose teacher is loaded from a
        local ``save_pretrained`` folder or a ``.safetensors`` file (see :func:`load_transformer`). ``kwargs`` are the
        constructor's (host arguments and, for a composed class, ``distill=``)."""
        net = load_transformer(cls.transformer_class, path, config=config, subfolder=subfolder, torch_dtype=torch_dtype)
        return cls(net, **kwargs)

    # ------------------------------------------------------------------------------------------ contract

    def get_data_and_condition(self, batch: Mapping[str, Any]) -> tuple[Tensor, VideoCondition, VideoCondition]:
        """``(x0 (B, C, T, H, W), condition, uncondition)``; both conditions share the Video2World frames."""
        if not isinstance(batch, Mapping) or "x0" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"{type(self).__name__} batches are dicts with 'x0' (B, C, T, H, W) latents; got {keys}.")
        x0 = batch["x0"]
        embeds = self._prompt_embeds(batch, x0)
        uncond = batch.get("uncond_prompt_embeds")
        if uncond is None:
            uncond = self.conditioner.empty(x0.shape[0]) if self.conditioner is not None else torch.zeros_like(embeds)
        frames = batch.get("num_conditional_frames", self.num_conditional_frames)
        condition = self._batch_condition(batch, embeds, x0, frames)
        uncondition = dataclasses.replace(condition, encoder_hidden_states=uncond.to(device=x0.device))
        return x0, condition, uncondition

    def _batch_condition(self, batch: Mapping[str, Any], embeds: Tensor, x0: Tensor, frames: Any) -> Any:
        """The condition of a batch (subclasses read extra batch keys here)."""
        return self.build_condition(embeds, x0, frames)

    def _prompt_embeds(self, batch: Mapping[str, Any], x0: Tensor) -> Tensor:
        if "prompt_embeds" in batch:
            return batch["prompt_embeds"]
        if "prompt" not in batch:
            raise KeyError(
                f"{type(self).__name__} batch needs 'prompt_embeds' (B, L, D) or 'prompt' (B strings, with a "
                "conditioner)."
            )
        if self.conditioner is None:
            raise ValueError(
                f"batch has 'prompt' strings but {type(self).__name__} has no conditioner: pass "
                "conditioner=TextConditioner(encoder, tokenizer), or precomputed 'prompt_embeds'."
            )
        return self.conditioner.encode(batch["prompt"]).to(device=x0.device)

    def build_condition(
        self, encoder_hidden_states: Tensor, frames: Tensor, num_conditional_frames: int | Tensor | None = None,
    ) -> VideoCondition:
        """The condition for text embeddings (B, L, D) and latents ``frames`` (B, C, T, H, W) whose first
        ``num_conditional_frames`` (default: the host's) condition the video. Text-to-world: 0 frames (any
        ``frames`` of the right shape, e.g. zeros)."""
        n = self.num_conditional_frames if num_conditional_frames is None else num_conditional_frames
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != frames.shape[0]:
            raise ValueError(
                f"encoder_hidden_states must be (B, L, D) with B = {frames.shape[0]} (the latents' batch), got "
                f"{tuple(encoder_hidden_states.shape)}."
            )
        return VideoCondition(encoder_hidden_states, frames, frame_mask_for(frames, n))

    # ---------------------------------------------------------------------------------- optional members

    def feature_blocks(self, net: nn.Module) -> nn.ModuleList:
        """The transformer's blocks that ``DiscriminatorConfig.taps`` index (outputs: tokens (B, N, D))."""
        return getattr(net, self.block_attribute)

    def enable_context_parallel(self, net: nn.Module, group: ProcessGroup | None) -> None:
        """Run ``net``'s forward context-parallel (Ulysses) over ``group`` (None or size 1: off).

        Every rank of the group gets the same full inputs and returns the same full output (B, C, T, H, W); inside,
        the tokens (B, S, D) and everything per token are split in contiguous chunks in rank order, self-attention
        is Ulysses over the group, and ``proj_out``'s output is gathered. Parameter gradients cover the local
        tokens: all-reduce (SUM) them over the group. Block outputs (feature taps) are the local (B, S/P, D). The
        CP size must divide the number of heads (ValueError here) and T' or T'*H'*W' (ValueError at forward time).
        See :mod:`distill_mixins.hosts.context_parallel`.
        """
        context_parallel.enable_context_parallel(net, group, self.context_parallel_plan)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn the diffusers models' own gradient checkpointing on or off (every transformer of the host: teacher,
        and after composition the student and the critic)."""
        for module in self.modules():
            if isinstance(module, ModelMixin) and module._supports_gradient_checkpointing:
                if enabled:
                    module.enable_gradient_checkpointing()
                else:
                    module.disable_gradient_checkpointing()


def check_condition(condition: Any, cls: type, host: str) -> None:
    """TypeError unless ``condition`` is a ``cls`` (the host's condition type)."""
    if not isinstance(condition, cls):
        raise TypeError(
            f"{host}.predict needs a {cls.__name__} condition (from get_data_and_condition or build_condition), "
            f"got {type(condition).__name__}."
        )


def model_dtype(net: nn.Module) -> torch.dtype:
    """The dtype of ``net``'s parameters (float32 for a parameterless module); a LoRA view's
    (:mod:`distill_mixins.lora`) is its base network's, not its float32 adapters'."""
    param = next(getattr(net, "lora_base", net).parameters(), None)
    return param.dtype if param is not None else torch.float32


def timestep_dtype(net: nn.Module) -> torch.dtype:
    """dtype of the timesteps given to ``net``: float32 for half-precision nets (as the pipelines), else the net's."""
    return torch.promote_types(model_dtype(net), torch.float32)


__all__ = ["DiffusersVideoHost", "check_condition", "model_dtype", "timestep_dtype"]
