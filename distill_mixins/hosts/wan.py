"""Wan 2.1 / 2.2 teacher: diffusers ``WanTransformer3DModel`` as a host.

``predict`` builds the transformer inputs exactly as ``WanPipeline`` / ``WanImageToVideoPipeline`` do, without
touching the diffusers forward: ``timestep = 1000 tau`` (the ``FlowMatchEulerDiscreteScheduler`` timesteps,
``sigma * num_train_timesteps``), ``encoder_hidden_states`` the umT5 text embeddings (B, L, D) (zero-padded to
512 tokens, see :class:`~distill_mixins.hosts.TextConditioner`), output the velocity ``eps - x0``.

Video2World conditioning follows the transformer's channels:

- ``in_channels == out_channels`` (Wan 2.2 TI2V, and text-to-video models): ``"expand_timesteps"``. The library
  pastes the conditioning frames into the state (:class:`VideoCondition`) and gives them their own time; the
  transformer gets a per-token timestep (B, T * H/2 * W/2), as the Wan 2.2 pipelines' ``expand_timesteps``
  (they give the first frame timestep 0; the library gives it ``1000 tau_c``, ``tau_c = sigma_c / (1 + sigma_c)``,
  0.1 for the default ``conditional_sigma = 1e-4``). Without conditioning frames the timestep is (B,).
- ``in_channels == 2 out_channels + k`` (Wan 2.1 I2V / FLF2V, ``k = 4`` mask channels): ``"channel_concat"``.
  The condition is a :class:`WanImageCondition`; the input is ``cat([x, mask, cond_latents])`` on channels, the
  mask the frame mask repeated over ``k`` channels, and the state is not pasted (the pipeline regenerates the
  first frame too). ``image_embeds`` (CLIP, (B, 257, image_dim)) are required when the model has ``image_dim``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import Tensor, nn

from distill_mixins.hosts.base import DiffusersVideoHost, check_condition, model_dtype, timestep_dtype
from distill_mixins.hosts.conditioning import TextConditioner, VideoCondition

WAN_CONDITIONING = ("expand_timesteps", "channel_concat")


@dataclass
class WanImageCondition:
    """Condition of a channel-concatenating Wan I2V transformer (not pasted by the library).

    encoder_hidden_states: (B, L, D) text embeddings; cond_latents: (B, C, T, H, W) the pipeline's
    ``latent_condition`` (the VAE latents of the first frame followed by black frames; by default the given frames
    masked, zeros elsewhere); cond_mask: (B, 1, T, 1, 1), 1 on the given frames; image_embeds: (B, N, image_dim)
    CLIP image embeddings, or None for models without ``image_dim``.
    """

    encoder_hidden_states: Tensor
    cond_latents: Tensor
    cond_mask: Tensor
    image_embeds: Tensor | None = None


def wan_conditioning(net: WanTransformer3DModel) -> str:
    """``"expand_timesteps"`` or ``"channel_concat"`` from the transformer's channels (ValueError otherwise)."""
    c_in, c_out = net.config.in_channels, net.config.out_channels
    if c_in == c_out:
        return "expand_timesteps"
    if c_in > 2 * c_out:
        return "channel_concat"
    raise ValueError(
        f"WanVideo2WorldHost: in_channels={c_in}, out_channels={c_out} fit neither Wan layout: in == out (T2V, Wan 2.2 "
        "TI2V) or in = 2 out + mask channels (Wan 2.1 I2V: 36 = 2 * 16 + 4)."
    )


def per_token_timestep(time: Tensor, x: Tensor, patch_size: tuple[int, int, int]) -> Tensor:
    """Per-frame time (B, T) -> per-token (B, T * H/p_h * W/p_w), the token order of the Wan patch embedding."""
    b, _, frames, h, w = x.shape
    _, p_h, p_w = patch_size
    return time[:, :, None, None].expand(b, frames, h // p_h, w // p_w).flatten(1)


class WanVideo2WorldHost(DiffusersVideoHost):
    """Host for a diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2), RF velocity teacher.

    ``WanVideo2WorldHost(net, conditioner=None, num_conditional_frames=1, num_train_timesteps=1000,
    gradient_checkpointing=False)``: ``net`` the teacher transformer; ``conditioner`` turns ``batch["prompt"]``
    into embeddings (else batches carry ``prompt_embeds``); ``num_conditional_frames`` latent frames condition the
    video (0: text-to-video); ``num_train_timesteps`` scales tau to the transformer's timestep (the scheduler's
    ``num_train_timesteps``). ``conditioning`` (read-only) is ``"expand_timesteps"`` or ``"channel_concat"``.
    Batches of channel-concat models may add ``image_embeds`` (B, N, image_dim) and ``cond_latents``.
    Feature taps index ``net.blocks`` (tokens (B, T*H*W/4, D), D = heads * head_dim).
    """

    transformer_class = WanTransformer3DModel
    block_attribute = "blocks"

    def __init__(
        self, net: WanTransformer3DModel, *, conditioner: TextConditioner | None = None,
        num_conditional_frames: int = 1, num_train_timesteps: int = 1000, gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            net, conditioner=conditioner, num_conditional_frames=num_conditional_frames,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.conditioning = wan_conditioning(net)
        if self.conditioning == "expand_timesteps" and tuple(net.config.patch_size)[0] != 1:
            raise ValueError(f"WanVideo2WorldHost needs patch_size[0] = 1 (per-frame time): {net.config.patch_size}")
        self.num_train_timesteps = num_train_timesteps
        self.supports_per_frame_time = self.conditioning == "expand_timesteps"

    def build_condition(
        self, encoder_hidden_states: Tensor, frames: Tensor, num_conditional_frames: int | Tensor | None = None, *,
        image_embeds: Tensor | None = None, cond_latents: Tensor | None = None,
    ) -> VideoCondition | WanImageCondition:
        """A :class:`VideoCondition` (expand_timesteps) or a :class:`WanImageCondition` (channel_concat) for text
        embeddings (B, L, D) and latents ``frames`` (B, C, T, H, W); the first ``num_conditional_frames`` condition."""
        condition = super().build_condition(encoder_hidden_states, frames, num_conditional_frames)
        if self.conditioning == "expand_timesteps":
            if image_embeds is not None or cond_latents is not None:
                raise ValueError("image_embeds / cond_latents are inputs of channel-concat (I2V) Wan models only.")
            return condition
        mask = condition.frame_mask
        latents = cond_latents if cond_latents is not None else mask * frames
        return WanImageCondition(encoder_hidden_states, latents, mask, image_embeds)

    def _batch_condition(self, batch: Mapping[str, Any], embeds: Tensor, x0: Tensor, frames: Any) -> Any:
        if self.conditioning == "expand_timesteps":
            return self.build_condition(embeds, x0, frames)
        return self.build_condition(
            embeds, x0, frames, image_embeds=batch.get("image_embeds"), cond_latents=batch.get("cond_latents")
        )

    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """Velocity ``eps - x0`` (B, C, T, H, W) of the Wan transformer ``net`` at RF state x and time tau (B,) or
        per frame (B, T), with the inputs of the diffusers Wan pipelines."""
        dtype = model_dtype(net)
        image_embeds = None
        if self.conditioning == "channel_concat":
            check_condition(condition, WanImageCondition, type(self).__name__)
            hidden_states = self._concat_inputs(net, x, condition)
            image_embeds = condition.image_embeds
        else:
            check_condition(condition, VideoCondition, type(self).__name__)
            hidden_states = x
            if time.ndim == 2 and bool((time == time[:, :1]).all()):
                time = time[:, 0]  # no conditioning frames: one timestep per sample, as WanPipeline
            if time.ndim == 2:
                time = per_token_timestep(time, x, tuple(net.config.patch_size))
        if net.config.image_dim is not None and image_embeds is None:
            raise ValueError(
                f"this Wan transformer has image_dim={net.config.image_dim}: it needs CLIP image embeddings, "
                "batch['image_embeds'] (B, N, image_dim) (build_condition(..., image_embeds=...))."
            )
        timestep = (self.num_train_timesteps * time.double()).to(timestep_dtype(net))
        return net(
            hidden_states=hidden_states.to(dtype), timestep=timestep,
            encoder_hidden_states=condition.encoder_hidden_states.to(device=x.device, dtype=dtype),
            encoder_hidden_states_image=None if image_embeds is None else image_embeds.to(device=x.device, dtype=dtype),
            return_dict=False,
        )[0]

    @staticmethod
    def _concat_inputs(net: nn.Module, x: Tensor, condition: WanImageCondition) -> Tensor:
        """``cat([x, mask (k channels), cond_latents])`` (B, 2C + k, T, H, W), as WanImageToVideoPipeline."""
        b, c, frames, h, w = x.shape
        k = net.config.in_channels - 2 * c
        mask = condition.cond_mask.to(device=x.device, dtype=x.dtype).expand(b, k, frames, h, w)
        return torch.cat([x, mask, condition.cond_latents.to(device=x.device, dtype=x.dtype)], dim=1)


__all__ = ["WAN_CONDITIONING", "WanImageCondition", "WanVideo2WorldHost", "wan_conditioning"]
