"""Cosmos Predict2 / Predict2.5 Video2World teacher: diffusers ``CosmosTransformer3DModel`` as a host.

``predict`` builds the transformer inputs exactly as ``Cosmos2_5_PredictBasePipeline`` (and
``Cosmos2VideoToWorldPipeline``) do, without touching the diffusers forward:

- ``hidden_states``: the rectified-flow state ``x = (1 - tau) x0 + tau eps`` (B, C, T, H, W); the library has
  already pasted the conditioning frames (at ``DistillConfig.conditional_sigma``, i.e. ``(1 - tau_c) x0``);
- ``timestep``: per frame, ``(B, 1, T, 1, 1)``, equal to the RF time ``tau`` in [0, 1] (not ``1000 tau``), and
  ``tau_c = sigma_c / (1 + sigma_c)`` on the conditioning frames (Predict2's ``t_conditioning``; Predict2.5
  uses ``conditional_frame_timestep = 1e-4``, the same to 1e-8 for the default ``sigma_c = 1e-4``);
- ``condition_mask``: the frame mask broadcast to ``(B, 1, T, H, W)`` (concatenated as an input channel);
- ``padding_mask``: zeros ``(1, 1, H, W)`` when the model concatenates one (``concat_padding_mask``);
- ``encoder_hidden_states``: the text embeddings (B, L, D) (Predict2.5: Qwen2.5-VL hidden states of every layer,
  see :class:`~distill_mixins.hosts.TextConditioner`); ``fps`` as given to the host (Predict2.5's pipeline passes
  none, Predict2's passes the video fps).

The output is the transformer's velocity ``eps - x0``; the pipelines' replacement of the velocity on the
conditioning frames by the ground-truth one is what the library's paste of those frames into x0 does.
"""

from __future__ import annotations

from typing import Any

from diffusers import CosmosTransformer3DModel
from diffusers.utils import is_torchvision_available
from torch import Tensor, nn

from distill_mixins.hosts.base import DiffusersVideoHost, check_condition, model_dtype, timestep_dtype
from distill_mixins.hosts.conditioning import TextConditioner, VideoCondition


def per_frame_timestep(time: Tensor, batch: int, frames: int) -> Tensor:
    """RF time (B,) or per-frame (B, T) -> the Cosmos transformer's per-frame timestep (B, 1, T, 1, 1)."""
    if time.ndim == 1:
        time = time[:, None].expand(batch, frames)
    if time.shape != (batch, frames):
        raise ValueError(f"time of shape {tuple(time.shape)} does not fit (B, T) = ({batch}, {frames}).")
    return time[:, None, :, None, None]


def check_cosmos_config(net: CosmosTransformer3DModel) -> None:
    """ValueError/ImportError unless ``net`` is a Predict2/2.5-style Video2World transformer this host can drive."""
    config = net.config
    if config.in_channels != config.out_channels + 1:
        raise ValueError(
            f"CosmosVideo2WorldHost needs a Video2World transformer whose in_channels = out_channels + 1 (the latents "
            f"plus the condition-mask channel, as Cosmos Predict2/2.5); got in_channels={config.in_channels}, "
            f"out_channels={config.out_channels}."
        )
    if tuple(config.patch_size)[0] != 1:
        raise ValueError(f"CosmosVideo2WorldHost needs patch_size[0] = 1 for per-frame times, not {config.patch_size}.")
    if config.img_context_dim_in:
        raise ValueError(
            "CosmosVideo2WorldHost does not drive image-context transformers (img_context_dim_in is set): their "
            "encoder_hidden_states are (text, image) pairs."
        )
    if config.concat_padding_mask and not is_torchvision_available():
        raise ImportError(
            "this CosmosTransformer3DModel has concat_padding_mask=True, and its forward resizes the padding mask "
            "with torchvision, which is not installed: pip install torchvision."
        )


class CosmosVideo2WorldHost(DiffusersVideoHost):
    """Host for a diffusers ``CosmosTransformer3DModel`` (Cosmos Predict2 / Predict2.5 DiT), RF velocity teacher.

    ``CosmosVideo2WorldHost(net, conditioner=None, num_conditional_frames=1, fps=None, gradient_checkpointing=False)``:
    ``net`` the teacher transformer (``in_channels = C + 1``); ``conditioner`` turns ``batch["prompt"]`` into
    embeddings (else batches carry ``prompt_embeds``); ``num_conditional_frames`` latent frames condition the video
    (Predict2.5: 1 or 2; 0 is text-to-world); ``fps`` goes to the transformer's RoPE (None as Predict2.5's pipeline).
    Compose a method first: ``class CosmosDMD2(DMD2Mixin, CosmosVideo2WorldHost)``.
    Feature taps index ``net.transformer_blocks`` (tokens (B, T*H*W/4, D), D = heads * head_dim).
    """

    transformer_class = CosmosTransformer3DModel
    block_attribute = "transformer_blocks"
    supports_per_frame_time = True

    def __init__(
        self, net: CosmosTransformer3DModel, *, conditioner: TextConditioner | None = None,
        num_conditional_frames: int = 1, fps: int | None = None, gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            net, conditioner=conditioner, num_conditional_frames=num_conditional_frames,
            gradient_checkpointing=gradient_checkpointing,
        )
        check_cosmos_config(net)
        self.fps = fps

    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """Velocity ``eps - x0`` (B, C, T, H, W) of the Cosmos transformer ``net`` at RF state x and time tau (B,) or
        per frame (B, T), with the Video2World inputs of the diffusers Cosmos pipelines."""
        check_condition(condition, VideoCondition, type(self).__name__)
        b, _, frames, h, w = x.shape
        dtype = model_dtype(net)
        timestep = per_frame_timestep(time, b, frames).to(timestep_dtype(net))
        condition_mask = condition.frame_mask.to(device=x.device, dtype=dtype).expand(b, 1, frames, h, w)
        padding_mask = x.new_zeros(1, 1, h, w, dtype=dtype) if net.config.concat_padding_mask else None
        return net(
            hidden_states=x.to(dtype), timestep=timestep,
            encoder_hidden_states=condition.encoder_hidden_states.to(device=x.device, dtype=dtype), fps=self.fps,
            condition_mask=condition_mask, padding_mask=padding_mask, return_dict=False,
        )[0]


__all__ = ["CosmosVideo2WorldHost", "check_cosmos_config", "per_frame_timestep"]
