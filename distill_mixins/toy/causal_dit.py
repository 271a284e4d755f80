"""A small video transformer for the toy domain that runs bidirectional or block-causal with the same weights, and
its causal host (ARCHITECTURE.md "Causal students"; MATH.md section 7).

:class:`ToyCausalDiT` ``(x, tau, frame_mask, text, *, attention=..., chunk_size, start_frame, store_kv) -> x0`` has
the call signature of the toy teacher's :class:`~distill_mixins.toy.unet.ToyUNet` (rectified-flow state x
(B, C, T, H, W), tau (B,) or per frame (B, T), the frame mask (B, 1, T, 1, 1), a pooled text embedding (B, D)) plus
the attention mode. Every mode goes through ``forward`` (FSDP2 hooks run on ``__call__`` only):

- ``"bidirectional"``: every token attends to every token (the teacher's kind of forward);
- ``"block_causal"``: one full-sequence forward; a frame of chunk c attends to the frames of chunks <= c, chunk by
  chunk (:func:`~distill_mixins.causal.block_causal_attention` on the layout of
  :func:`~distill_mixins.causal.require_spans`, which raises rather than fall back to full attention; no mask);
- ``"cached"``: x is one chunk, frames ``start_frame .. start_frame + n - 1``; it attends to each block's
  :class:`~distill_mixins.causal.KVCache` context (the cached frames before ``start_frame``) plus its own keys;
  ``store_kv=True`` writes the chunk's keys and values (after RoPE) into the caches, ``store_kv=False`` leaves them.

:class:`ToyCausalVideo2World` hosts it (the :class:`~distill_mixins.contract.CausalHost` capability):
``class ToyCausalKD(CausalKDMixin, ToyCausalVideo2World)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from distill_mixins.causal import BlockCausalSpans, KVCache, block_causal_attention, check_chunk_size, require_spans
from distill_mixins.parallel.attention import attention as attention_dispatch
from distill_mixins.testing.transformer import apply_rope, patchify, rope_angles, rope_axis_dims, unpatchify
from distill_mixins.toy.host import ToyCondition, ToyVideo2World
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.unet import FourierTime

AttentionMode = Literal["bidirectional", "block_causal", "cached"]
ATTENTION_MODES = ("bidirectional", "block_causal", "cached")

__all__ = ["ATTENTION_MODES", "CausalBlock", "ToyCausalDiT", "ToyCausalVideo2World", "parameter_count"]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, T, P, dim) scaled and shifted per frame by shift, scale (B, T, 1, dim)."""
    return x * (1 + scale) + shift


class CausalBlock(nn.Module):
    """Pre-norm transformer block with per-frame adaptive LayerNorm (shift, scale, gate for attention and MLP from
    the frame's embedding, zero-initialised weights; the gates start at ``gate_init``, 0 being adaLN-Zero), RoPE
    self-attention through the library dispatch, and the block's :class:`KVCache` (a plain attribute: never in a
    state dict; a deep copy gets its own)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, kv_cache: KVCache, gate_init: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        with torch.no_grad():  # the attention and MLP gates' constant part (0: adaLN-Zero, each block the identity)
            self.modulation.bias[2 * dim : 3 * dim] = gate_init
            self.modulation.bias[5 * dim :] = gate_init
        self.kv_cache = kv_cache

    def forward(
        self, x: Tensor, emb: Tensor, cos: Tensor, sin: Tensor, spans: BlockCausalSpans | None = None,
        context: tuple[Tensor, Tensor] | None = None, store_frame: int | None = None,
    ) -> Tensor:
        """x (B, S, dim) tokens of T frames (frame-major, S = T * P), emb (B, T, dim) per-frame embedding, cos/sin
        (S, head_dim / 2), spans: the block-causal chunk layout (None: every token sees every key), context: cached
        keys/values (B, H, S_ctx, head_dim) attended
        to besides the tokens' own; ``store_frame``: write this call's keys/values into ``kv_cache`` at that first
        frame (None: not). Returns (B, S, dim)."""
        b, s, dim = x.shape
        frames = emb.shape[1]
        mods = self.modulation(F.silu(emb))[:, :, None].chunk(6, dim=-1)  # 6 x (B, T, 1, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = _modulate(self.norm1(x).view(b, frames, -1, dim), shift1, scale1).reshape(b, s, dim)
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, dim // self.heads).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, head_dim)
        if store_frame is not None:
            self.kv_cache.store(store_frame, k, v)
        if context is not None:
            if context[0].shape[0] != b:
                raise ValueError(
                    f"ToyCausalDiT: the KV cache holds a batch of {context[0].shape[0]}, this chunk has {b}; "
                    "clear_kv_cache() before a new batch."
                )
            k, v = torch.cat([context[0], k], dim=2), torch.cat([context[1], v], dim=2)
        if spans is not None:
            o = block_causal_attention(q, k, v, spans)
        else:
            o = attention_dispatch(q, k, v)
        o = o.transpose(1, 2).reshape(b, s, dim)
        x = x + (gate1 * self.proj(o).view(b, frames, -1, dim)).reshape(b, s, dim)
        h = _modulate(self.norm2(x).view(b, frames, -1, dim), shift2, scale2)
        return x + (gate2 * self.mlp(h)).reshape(b, s, dim)


class ToyCausalDiT(nn.Module):
    """Video DiT over 1 x p x p patch tokens (frame-major), per-frame adaLN, absolute-frame 3D RoPE, one KV cache
    per block; the same weights run ``"bidirectional"``, ``"block_causal"`` or ``"cached"`` (module docstring).

    Input channels: the preconditioned state and the frame mask. Each frame's adaLN embedding holds its time, the
    prompt and its absolute index (RoPE alone is relative, so no attention head could otherwise follow a motion
    ``v t`` back to frame 0: the query must know t). ``position_embedding``: each token also gets an embedding of its
    absolute (row, column) in the frame (a value then carries where it came from, and the walls a shape bounces
    off are known). ``rope_theta``: the rotary base; the toy's axes are 8 positions long, so a small base (16)
    spreads the frequencies over them (10,000 leaves two of a spatial axis's five frequencies distinguishing them).
    ``gate_init``: the constant part of each block's attention and MLP gates (0 is DiT's adaLN-Zero; 1 trains
    faster at this size, see docs/development.md). EDM-style preconditioning in rectified-flow time,
    per frame (as :class:`~distill_mixins.toy.unet.ToyUNet`): ``s = sqrt(tau^2 + sd^2 (1 - tau)^2)``,
    ``x0 = sd^2 (1 - tau) x / s^2 + (tau sd / s) F(x / s, tau)``. Output layer zero-initialised (``x0`` starts as
    the skip term). Frame positions are absolute (``start_frame`` + local index); one at or past ``max_frames``
    raises a ValueError unless the caches have a rolling window (:meth:`set_kv_window`).
    """

    def __init__(
        self, channels: int = 3, patch: int = 4, dim: int = 128, depth: int = 4, heads: int = 4, text_dim: int = 64,
        max_frames: int = 32, image_size: int = 32, chunk_size: int = 3, mlp_ratio: int = 4, sigma_data: float = 0.5,
        position_embedding: bool = True, rope_theta: float = 16.0, gate_init: float = 1.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ToyCausalDiT: dim={dim} is not divisible by heads={heads}.")
        if image_size % patch:
            raise ValueError(f"ToyCausalDiT: image_size={image_size} is not a multiple of patch={patch}.")
        self.channels, self.patch, self.dim, self.heads = channels, patch, dim, heads
        self.max_frames, self.sigma_data = max_frames, sigma_data
        if not rope_theta > 1:
            raise ValueError(f"ToyCausalDiT: rope_theta={rope_theta} must be > 1.")
        self.rope_theta = float(rope_theta)
        self.chunk_size = check_chunk_size(chunk_size, "ToyCausalDiT chunk_size")
        self.axis_dims = rope_axis_dims(dim // heads)
        self.time = FourierTime(64)
        self.frame_index = FourierTime(32)  # of start_frame + i over max_frames: a frame knows where it is
        self.embed = nn.Sequential(nn.Linear(64 + text_dim + 32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.patch_embed = nn.Linear((channels + 1) * patch * patch, dim)
        self.position = FourierTime(32) if position_embedding else None  # of a token's (row, column) in [0, 1]
        self.position_embed = nn.Linear(2 * 32, dim) if position_embedding else None
        tokens = (image_size // patch) ** 2
        self.blocks = nn.ModuleList(
            CausalBlock(dim, heads, mlp_ratio, KVCache(max_frames, tokens), gate_init) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, channels * patch * patch)
        for layer in (self.modulation_out, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------------------------------------ cache

    @property
    def kv_caches(self) -> list[KVCache]:
        """The blocks' KV caches, in block order."""
        return [block.kv_cache for block in self.blocks]

    def clear_kv_cache(self) -> None:
        """Forget every cached frame of every block."""
        for cache in self.kv_caches:
            cache.clear()

    def set_kv_window(self, window: int | None, sink: int = 0) -> None:
        """Give every block a new, empty cache keeping the ``sink`` first frames plus the last ``window`` frames
        before a chunk (``window=None``: every frame up to ``max_frames``)."""
        self._rebuild_caches(self.kv_caches[0].tokens_per_frame, window, sink)

    def _rebuild_caches(self, tokens_per_frame: int, window: int | None, sink: int) -> None:
        for block in self.blocks:
            block.kv_cache = KVCache(self.max_frames, tokens_per_frame, window=window, sink=sink)

    # ---------------------------------------------------------------------------------------------- forward

    def forward(
        self, x: Tensor, tau: Tensor, frame_mask: Tensor, text: Tensor, *, attention: AttentionMode = "bidirectional",
        chunk_size: int | None = None, start_frame: int = 0, store_kv: bool = False,
    ) -> Tensor:
        """x0 (B, C, T, H, W) from the rectified-flow state x (B, C, T, H, W) (frames ``start_frame ..
        start_frame + T - 1``) at tau (B,) or per frame (B, T), frame mask (B, 1, T, 1, 1), text (B, text_dim).

        ``attention``: see the module docstring; ``chunk_size`` (None: the network's) sets the block-causal chunks
        (and bounds a cached chunk's length); ``store_kv`` (``"cached"`` only) writes the chunk's keys and values.
        """
        if attention not in ATTENTION_MODES:
            raise ValueError(f"ToyCausalDiT attention={attention!r}: choose one of {', '.join(ATTENTION_MODES)}.")
        if store_kv and attention != "cached":
            raise ValueError("ToyCausalDiT: store_kv=True needs attention='cached' (one chunk through the KV cache).")
        chunk = self.chunk_size if chunk_size is None else check_chunk_size(chunk_size, "ToyCausalDiT chunk_size")
        dtype = self.time.frequencies.dtype  # float32 (also under autocast), or float64 after .double()
        b, _, frames, height, width = x.shape
        self._check_frames(start_frame, frames)
        tau = tau.to(device=x.device, dtype=dtype)
        tau = tau.reshape(-1, 1).expand(b, frames) if tau.ndim <= 1 else tau
        if tau.shape != (b, frames):
            raise ValueError(f"ToyCausalDiT: tau {tuple(tau.shape)} fits neither (B,) nor (B, T) = {(b, frames)}.")
        x = x.to(dtype)
        sd, tau5 = self.sigma_data, tau[:, None, :, None, None]  # (B, 1, T, 1, 1)
        s = torch.sqrt(tau5**2 + sd**2 * (1 - tau5) ** 2)
        c_skip, c_out = sd**2 * (1 - tau5) / s**2, tau5 * sd / s

        mask_channel = frame_mask.to(device=x.device, dtype=dtype).expand(b, 1, frames, height, width)
        patches, grid = patchify(torch.cat([x / s, mask_channel], dim=1), (1, self.patch, self.patch))
        tokens = self.patch_embed(patches)  # (B, S, dim), S = T * P
        per_frame = grid[1] * grid[2]
        if self.position_embed is not None:
            tokens = tokens + self._position(grid, dtype, x.device).repeat(frames, 1)
        index = torch.arange(start_frame, start_frame + frames, device=x.device, dtype=dtype) / self.max_frames
        emb = self.embed(torch.cat([self.time(tau.reshape(-1)).view(b, frames, -1),
                                    text.to(device=x.device, dtype=dtype)[:, None].expand(b, frames, -1),
                                    self.frame_index(index)[None].expand(b, frames, -1)], dim=-1))
        cos, sin = self._rope(start_frame, grid, dtype, x.device)

        spans = None
        if attention == "block_causal":
            spans = require_spans(frames, chunk, per_frame)  # raises: never full attention instead
        if attention == "cached":
            self._check_chunk(frames, chunk, per_frame)
        for block in self.blocks:
            context = block.kv_cache.context(start_frame) if attention == "cached" else None
            store = start_frame if store_kv else None
            tokens = block(tokens, emb, cos, sin, spans, context, store)

        shift, scale = self.modulation_out(F.silu(emb))[:, :, None].chunk(2, dim=-1)
        out = self.head(_modulate(self.norm_out(tokens).view(b, frames, per_frame, -1), shift, scale))
        out = unpatchify(out.reshape(b, frames * per_frame, -1), grid, (1, self.patch, self.patch))
        return c_skip * x + c_out * out

    def _position(self, grid: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Absolute (row, column) embedding (H'*W', dim) of a frame's tokens, the centres scaled to [0, 1]."""
        _, h, w = grid
        rows = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        cols = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        features = torch.cat([self.position(rows)[:, None].expand(h, w, -1),
                              self.position(cols)[None].expand(h, w, -1)], dim=-1).reshape(h * w, -1)
        return self.position_embed(features)

    def _rope(
        self, start: int, grid: tuple[int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """cos, sin (T*H'*W', head_dim / 2) of the tokens of frames ``start .. start + T - 1`` (absolute frame
        positions), computed on the fly in float32 or wider."""
        (frames, h, w), wide = grid, torch.promote_types(dtype, torch.float32)
        dt, dh, dw = self.axis_dims
        theta = self.rope_theta
        at = rope_angles(start + frames, dt, theta, dtype=wide, device=device)[start:]  # (T, dt/2)
        ah = rope_angles(h, dh, theta, dtype=wide, device=device)
        aw = rope_angles(w, dw, theta, dtype=wide, device=device)
        angles = torch.cat([at[:, None, None].expand(frames, h, w, -1), ah[None, :, None].expand(frames, h, w, -1),
                            aw[None, None, :].expand(frames, h, w, -1)], dim=-1).reshape(frames * h * w, -1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _check_frames(self, start_frame: int, frames: int) -> None:
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"ToyCausalDiT: start_frame={start_frame!r} must be an int >= 0.")
        if self.kv_caches[0].window is None and start_frame + frames > self.max_frames:
            raise ValueError(
                f"ToyCausalDiT: frames {start_frame}..{start_frame + frames - 1} reach past max_frames="
                f"{self.max_frames} (absolute positions); build the network with more frames, or stream with a "
                "rolling window (set_kv_window)."
            )

    def _check_chunk(self, frames: int, chunk: int, per_frame: int) -> None:
        """A cached forward runs one chunk whose tokens fit the caches (rebuilt when empty and of another size)."""
        if frames > chunk:
            raise ValueError(
                f"ToyCausalDiT attention='cached' got {frames} frames, more than one chunk ({chunk}): its frames "
                "would attend to each other bidirectionally; run the chunks one by one."
            )
        caches = self.kv_caches
        if caches[0].tokens_per_frame != per_frame:
            if any(cache.cached_frames for cache in caches):
                raise ValueError(
                    f"ToyCausalDiT: the KV cache holds frames of {caches[0].tokens_per_frame} tokens, this chunk has "
                    f"{per_frame} a frame; clear_kv_cache() before changing the resolution."
                )
            self._rebuild_caches(per_frame, caches[0].window, caches[0].sink)


class ToyCausalVideo2World(ToyVideo2World):
    """The toy Video2World host around a :class:`ToyCausalDiT` (a :class:`~distill_mixins.contract.CausalHost`):
    rectified flow, velocity output, per-frame time, first frame given.

    ``predict`` runs the network bidirectionally; ``predict_causal`` block-causal over the whole clip;
    ``predict_chunk`` one chunk through the network's KV cache. Velocity ``v = (x - x0) / tau`` per frame, and 0 on
    frames at tau = 0 (clean context: the network's x0 is then x itself, which every finite velocity maps back to).
    """

    supports_per_frame_time = True

    def __init__(
        self, net: nn.Module | None = None, text_encoder: ToyTextEncoder | None = None, chunk_size: int = 3
    ) -> None:
        super().__init__(net if net is not None else ToyCausalDiT(chunk_size=chunk_size), text_encoder)
        self.chunk_size = check_chunk_size(chunk_size, "ToyCausalVideo2World chunk_size")

    @staticmethod
    def _velocity(x: Tensor, x0: Tensor, time: Tensor) -> Tensor:
        """(x - x0) / tau with tau (B,) or (B, T) broadcast per frame; 0 where tau = 0."""
        tau = time.to(device=x.device, dtype=x.dtype)
        tau = tau.reshape(-1, 1, 1, 1, 1) if tau.ndim <= 1 else tau[:, None, :, None, None]
        positive = tau > 0
        return torch.where(positive, (x - x0.to(x.dtype)) / torch.where(positive, tau, 1.0), 0.0)

    @staticmethod
    def _causal_net(net: nn.Module) -> nn.Module:
        inner = getattr(net, "module", net)  # DDP keeps the network as .module
        if not callable(getattr(inner, "clear_kv_cache", None)):
            raise TypeError(
                f"ToyCausalVideo2World runs ToyCausalDiT networks causally, got {type(inner).__name__} (the "
                "bidirectional teacher runs through predict)."
            )
        return inner

    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: ToyCondition) -> Tensor:
        """Flow velocity (B, C, T, H, W) of ``net`` at the state x and tau (B,) or (B, T), bidirectional.

        A :class:`ToyCausalDiT` takes the per-frame tau; any other toy network (the UNet teacher) takes one tau a
        sample: that of the frames outside the frame mask, which must then share it."""
        if isinstance(getattr(net, "module", net), ToyCausalDiT):
            x0 = net(x, time, condition.frame_mask, condition.text, attention="bidirectional")
        else:
            x0 = net(x, self._one_time(time, condition.frame_mask), condition.frame_mask, condition.text)
        return self._velocity(x, x0, time)

    @staticmethod
    def _one_time(time: Tensor, frame_mask: Tensor) -> Tensor:
        """tau (B,) of the frames outside the frame mask, for a network without per-frame time."""
        if time.ndim <= 1:
            return time
        free = frame_mask[:, 0, :, 0, 0].to(time.device) == 0  # (B, T)
        first = torch.where(free, time, torch.full_like(time, float("inf"))).amin(dim=1)
        if bool((free & (time != first[:, None])).any()):
            raise ValueError(
                "ToyCausalVideo2World.predict: this network takes one tau a sample, but the frames outside the frame "
                "mask have different times; run a ToyCausalDiT for per-frame times."
            )
        return first

    def predict_causal(self, net: nn.Module, x: Tensor, time: Tensor, condition: ToyCondition) -> Tensor:
        """Flow velocity (B, C, T, H, W): block-causal full-sequence forward at per-frame tau (B, T)."""
        self._causal_net(net)
        mask = condition.frame_mask[:, :, : x.shape[2]]  # x may be a prefix of the clip
        x0 = net(x, time, mask, condition.text, attention="block_causal", chunk_size=self.chunk_size)
        return self._velocity(x, x0, time)

    def predict_chunk(
        self, net: nn.Module, x: Tensor, time: Tensor, condition: ToyCondition, start_frame: int, store_kv: bool
    ) -> Tensor:
        """Flow velocity (B, C, n, H, W) of the chunk x (frames ``start_frame ..``) at tau (B, n) or (B,), through
        ``net``'s KV cache; ``condition`` is the whole clip's (its frame mask is sliced for the chunk)."""
        self._causal_net(net)
        mask = condition.frame_mask[:, :, start_frame : start_frame + x.shape[2]]
        x0 = net(x, time, mask, condition.text, attention="cached", chunk_size=self.chunk_size,
                 start_frame=start_frame, store_kv=store_kv)
        return self._velocity(x, x0, time)

    def clear_kv_cache(self, net: nn.Module) -> None:
        """Forget every cached frame of ``net``."""
        self._causal_net(net).clear_kv_cache()

    def feature_blocks(self, net: nn.Module) -> Sequence[nn.Module]:
        """Blocks GAN heads may tap: the transformer blocks (outputs (B, S, dim) tokens, frame-major)."""
        return list(getattr(net, "module", net).blocks)


def parameter_count(net: nn.Module) -> int:
    """Number of parameters of ``net``."""
    return sum(math.prod(p.shape) for p in net.parameters())
