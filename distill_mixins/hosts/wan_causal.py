"""A causal (chunk-by-chunk) Wan student host: :class:`CausalWanHost` (ARCHITECTURE.md "Causal students", MATH.md 7).

:class:`CausalWanHost` is a :class:`~distill_mixins.hosts.WanVideo2WorldHost` (``expand_timesteps`` layout:
``in_channels == out_channels``, so per-frame time is native) that also satisfies
:class:`distill_mixins.contract.CausalHost`:

- ``predict`` is unchanged: the bidirectional diffusers computation, bit for bit (the teacher and the critic of
  Self-Forcing stay bidirectional, and they are copies of the same network);
- ``predict_causal``: one full-sequence forward where the self-attention of every block runs chunk by chunk
  (:func:`distill_mixins.causal.block_causal_attention` on :func:`~distill_mixins.causal.require_spans`: a frame of
  chunk c attends to the frames of chunks <= c; no (S, S) mask), at
  per-frame time (B, T);
- ``predict_chunk``: one chunk of frames ``start_frame ..`` through a per-self-attention-layer
  :class:`~distill_mixins.causal.KVCache`; its rotary embedding takes the absolute frame indices (a "RoPE offset");
  cross-attention to the text is the model's own;
- ``clear_kv_cache``: forget every cached frame of a network.

Mechanism (no ``forward`` is patched or replaced): :func:`install_causal_attention` puts, on one network,

1. a :class:`CausalAttentionState`, the network's own (``net._causal_wan_state``): its cache capacity, its per-layer
   KV caches, and ``call``, the mode of the forward in progress (None: bidirectional);
2. a :class:`CausalWanAttnProcessor` on every self-attention module ``blocks[i].attn1`` (``attn.set_processor``),
   holding the state, its layer index and the processor it replaced;
3. a forward hook (:class:`CausalRopeHook`, a callable object) on ``net.rope``.

The host sets ``state.call`` around the ``net(...)`` call (:func:`causal_call`, restored also on errors). The rope
hook attaches that call to the rotary embedding it returns (a tuple subclass, :class:`CausalRotary`), offset to the
chunk's absolute frames in cached mode; every block passes the rotary embedding to its ``attn1``, whose processor
reads the mode from it. A processor that gets a plain rotary embedding runs the processor it replaced (the model's
``WanAttnProcessor``): with no call set, the rope hook returns nothing and the forward is exactly diffusers'.

Carrying the mode *in the rotary embedding* rather than reading the state at attention time makes activation
checkpointing safe (diffusers' ``gradient_checkpointing`` and the library's ``CheckpointedForward``, both
non-reentrant): the recomputation in the backward pass, which runs after the ``with`` block has ended, gets the same
block arguments and so the same mode, chunk layout and offset. For the same reason the cached keys and values a
layer reads are kept on the call (the recomputation reuses them even if the cache changed since) and a layer stores at
most once per call.

Copies: ``copy.deepcopy(net)`` copies the state once and rebinds the copy's processors and hook to the copy's state
(deepcopy's memo), so the student, critic and EMA built from the teacher each have their own caches and mode. The
host installs on ``self.net`` in its constructor, before a method mixin copies it; ``predict_causal`` /
``predict_chunk`` also install on a network that lacks them (e.g. one built from the config), and raise when a
network's processors were replaced since (``set_attn_processor``): a causal forward never runs with full attention.

Not supported together: context parallel (``enable_context_parallel`` replaces only ``WanAttnProcessor`` and refuses
these processors with a TypeError), and the channel-concat (Wan 2.1 I2V) layout (a ValueError).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import Tensor, nn

from distill_mixins.causal import BlockCausalSpans, KVCache, block_causal_attention, check_chunk_size, require_spans
from distill_mixins.hosts.wan import WanVideo2WorldHost
from distill_mixins.hosts.wan_attention import wan_self_attention_qkv
from distill_mixins.parallel.attention import attention

STATE_ATTRIBUTE = "_causal_wan_state"
"""Where the :class:`CausalAttentionState` of a network lives (in its ``__dict__``, so deep copies copy it)."""
MODES = ("block_causal", "cached")


# ------------------------------------------------------------------------------------------------- the state


@dataclass
class CausalCall:
    """The mode of one forward of a network (set by the host around ``net(...)``, carried by the rotary embedding).

    mode: ``"block_causal"`` (full sequence, ``spans``) or ``"cached"`` (one chunk of frames ``start_frame ..``);
    spans: the block-causal chunk layout (block_causal); store_kv: write the chunk's keys and values (cached).
    Filled during the forward: frames and tokens_per_frame (by the rope hook), ``context`` (per layer, the cached keys
    and values read, reused by a recomputation), ``stored`` (layers that stored), ``layers`` (layers that ran causally).
    """

    mode: str
    spans: BlockCausalSpans | None = None
    start_frame: int = 0
    store_kv: bool = False
    frames: int | None = None
    tokens_per_frame: int | None = None
    context: dict[int, tuple[Tensor, Tensor] | None] = field(default_factory=dict)
    stored: set[int] = field(default_factory=set)
    layers: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CausalCall mode={self.mode!r}: one of {', '.join(MODES)}.")


class CausalAttentionState:
    """One network's causal attention state: the cache capacity, the per-layer KV caches, the call in progress.

    ``max_frames``, ``window``, ``sink``: the :class:`~distill_mixins.causal.KVCache` arguments of every layer's cache;
    the caches are built at the first cached call (their ``tokens_per_frame`` is the input's H' * W').
    """

    def __init__(self, max_frames: int, window: int | None = None, sink: int = 0) -> None:
        self.configure(max_frames, window, sink)
        self.call: CausalCall | None = None

    def configure(self, max_frames: int, window: int | None = None, sink: int = 0) -> None:
        """Set the cache capacity (dropping the caches)."""
        KVCache(max_frames, 1, window, sink)  # validates the arguments
        self.max_frames, self.window, self.sink = max_frames, window, sink
        self.caches: dict[int, KVCache] = {}

    def cache(self, layer: int, tokens_per_frame: int) -> KVCache:
        """The KV cache of self-attention layer ``layer`` (built for ``tokens_per_frame`` when missing)."""
        cache = self.caches.get(layer)
        if cache is not None and cache.tokens_per_frame != tokens_per_frame:
            if cache.cached_frames:
                raise ValueError(
                    f"the KV cache holds frames of {cache.tokens_per_frame} tokens, this chunk has {tokens_per_frame} "
                    "tokens per frame (another resolution): clear_kv_cache(net) before changing the resolution."
                )
            cache = None
        if cache is None:
            cache = self.caches[layer] = KVCache(self.max_frames, tokens_per_frame, self.window, self.sink)
        return cache

    def clear(self) -> None:
        """Forget every cached frame (the caches are rebuilt at the next cached call)."""
        self.caches.clear()

    def checksum(self) -> float:
        """Sum of the layers' :meth:`KVCache.checksum` weighted by layer (0.0 when nothing is cached)."""
        return sum((layer + 1) * cache.checksum() for layer, cache in sorted(self.caches.items()))

    @property
    def cached_frames(self) -> list[int]:
        """The frames every layer holds (the layers store together)."""
        frames = [set(cache.cached_frames) for cache in self.caches.values()]
        return sorted(set.intersection(*frames)) if frames else []


class CausalRotary(tuple):
    """The rotary embedding ``(cos, sin)`` of a causal forward, with the :class:`CausalCall` it belongs to."""

    causal_call: CausalCall

    def __new__(cls, items: tuple[Tensor, Tensor], call: CausalCall) -> CausalRotary:
        self = super().__new__(cls, items)
        self.causal_call = call
        return self


# -------------------------------------------------------------------------------------- hook and processor


class CausalRopeHook:
    """Forward hook on ``net.rope``: outside a causal call, nothing (the output is left as is); inside, the rotary
    embedding as a :class:`CausalRotary` carrying the call, at the absolute frames ``start_frame ..`` (cached mode)."""

    def __init__(self, state: CausalAttentionState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> CausalRotary | None:
        call = self.state.call
        if call is None:
            return None
        x = args[0]
        p_t, p_h, p_w = module.patch_size
        frames, height, width = x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w
        call.frames, call.tokens_per_frame = frames, height * width
        start = call.start_frame if call.mode == "cached" else 0
        end = start + frames
        if end > module.max_seq_len:
            raise ValueError(
                f"frames {start}..{end - 1}: this Wan transformer's rotary embedding covers {module.max_seq_len} "
                "frames (rope_max_seq_len); absolute positions past it do not exist."
            )
        if start:
            # the table of frames 0 .. end - 1 (only the input's shape is read), keeping the chunk's own frames
            cos, sin = module.forward(x[:1, :1, :1].expand(1, 1, end * p_t, x.shape[3], x.shape[4]))
            output = (cos[:, start * call.tokens_per_frame :], sin[:, start * call.tokens_per_frame :])
        return CausalRotary(tuple(output), call)


class CausalWanAttnProcessor:
    """Self-attention processor of ``blocks[layer].attn1`` of a causal Wan network (see the module docstring).

    With a plain rotary embedding: the processor it replaced (``original``), unchanged. With a :class:`CausalRotary`:
    the projections, RMS norms of q and k, rotary embedding and output projection of ``WanAttnProcessor``, with
    attention through the library's dispatch (:func:`distill_mixins.parallel.attention.attention`): chunk by chunk
    over the key prefix of each chunk (block-causal), or over the layer's cached frames before the chunk plus the
    chunk itself.
    """

    def __init__(self, state: CausalAttentionState, layer: int, original: Any) -> None:
        self.state, self.layer, self.original = state, layer, original

    # diffusers' set_attention_backend / context-parallel settings reach the bidirectional path
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.original._parallel_config = value

    def __call__(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None, **kwargs: Any,
    ) -> Tensor:
        call = getattr(rotary_emb, "causal_call", None)
        if call is None:
            if self.state.call is not None:
                raise RuntimeError(
                    f"a causal forward reached self-attention layer {self.layer} without its mode: the rotary "
                    "embedding hook on net.rope did not run (install_causal_attention(net) again)."
                )
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            raise ValueError("CausalWanAttnProcessor is for the self-attention (attn1) of a Wan block only.")
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)  # (B, S, H, D)
        if call.mode == "block_causal":
            out = self._block_causal(call, q, k, v)
        else:
            out = self._cached(call, q, k, v)
        call.layers.add(self.layer)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    def _block_causal(self, call: CausalCall, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        spans, tokens = call.spans, q.shape[1]
        if not isinstance(spans, BlockCausalSpans) or spans.tokens != tokens:
            raise RuntimeError(
                f"self-attention layer {self.layer}: a block-causal forward of {tokens} tokens needs their chunk "
                f"layout, got {spans!r}; a causal forward does not fall back to full attention."
            )
        return block_causal_attention(q, k, v, spans, layout="bshd")

    def _cached(self, call: CausalCall, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D), the cache's layout
        cache = self.state.cache(self.layer, call.tokens_per_frame)
        if self.layer not in call.context:  # read once per call: a recomputation reuses it
            call.context[self.layer] = cache.context(call.start_frame)
        context = call.context[self.layer]
        if call.store_kv and self.layer not in call.stored:
            cache.store(call.start_frame, k, v)
            call.stored.add(self.layer)
        if context is not None:
            if context[0].shape[0] != k.shape[0]:
                raise ValueError(
                    f"the KV cache holds a batch of {context[0].shape[0]}, this chunk has {k.shape[0]}: "
                    "clear_kv_cache(net) before changing the batch."
                )
            k = torch.cat([context[0].to(k.dtype), k], dim=2)
            v = torch.cat([context[1].to(v.dtype), v], dim=2)
        return attention(q, k, v, layout="bhsd").transpose(1, 2)


# ------------------------------------------------------------------------------------------------ install


def _self_attention(net: nn.Module) -> list[nn.Module]:
    if not isinstance(net, WanTransformer3DModel):
        raise TypeError(f"causal Wan attention goes on a diffusers WanTransformer3DModel, got {type(net).__name__}.")
    return [block.attn1 for block in net.blocks]


def causal_state(net: nn.Module) -> CausalAttentionState | None:
    """The :class:`CausalAttentionState` of ``net`` (None when causal attention is not installed)."""
    return net.__dict__.get(STATE_ATTRIBUTE)


def is_causal_installed(net: nn.Module) -> bool:
    """Whether every self-attention module and the rope of ``net`` carry this network's causal processor / hook."""
    state = causal_state(net)
    if state is None:
        return False
    processors_ok = all(
        isinstance(attn.processor, CausalWanAttnProcessor) and attn.processor.state is state
        and attn.processor.layer == i
        for i, attn in enumerate(_self_attention(net))
    )
    hooks = [h for h in net.rope._forward_hooks.values() if isinstance(h, CausalRopeHook)]
    return processors_ok and len(hooks) == 1 and hooks[0].state is state


def install_causal_attention(
    net: nn.Module, *, max_frames: int, window: int | None = None, sink: int = 0
) -> CausalAttentionState:
    """Install the causal processors and the rope hook on ``net`` (a ``WanTransformer3DModel``) and return its state.

    Idempotent; on a network that has them, sets the cache capacity (dropping the caches). The self-attention
    processors replaced must be diffusers' ``WanAttnProcessor`` (a TypeError otherwise, e.g. context parallel's).
    ``predict`` of the network is unchanged (bit for bit).
    """
    attns = _self_attention(net)
    state = causal_state(net)
    if state is None:
        state = CausalAttentionState(max_frames, window, sink)
    else:
        state.configure(max_frames, window, sink)
    originals = []
    for i, attn in enumerate(attns):
        processor = attn.processor
        if isinstance(processor, CausalWanAttnProcessor):
            processor = processor.original
        if type(processor) is not WanAttnProcessor:
            raise TypeError(
                f"causal Wan attention replaces WanAttnProcessor on blocks[{i}].attn1; found "
                f"{type(processor).__name__} (context parallel and other processors are not supported together with "
                "causal attention; reset it with set_processor(WanAttnProcessor()))."
            )
        originals.append(processor)
    for i, (attn, original) in enumerate(zip(attns, originals, strict=True)):
        attn.set_processor(CausalWanAttnProcessor(state, i, original))
    _remove_rope_hooks(net)
    net.rope.register_forward_hook(CausalRopeHook(state))
    net.__dict__[STATE_ATTRIBUTE] = state
    return state


def _remove_rope_hooks(net: nn.Module) -> None:
    hooks = net.rope._forward_hooks
    for key in [k for k, hook in hooks.items() if isinstance(hook, CausalRopeHook)]:
        hooks.pop(key)
        net.rope._forward_hooks_with_kwargs.pop(key, None)
        net.rope._forward_hooks_always_called.pop(key, None)


def remove_causal_attention(net: nn.Module) -> None:
    """Put back the processors the causal ones replaced, remove the rope hook and the state."""
    for attn in _self_attention(net):
        if isinstance(attn.processor, CausalWanAttnProcessor):
            attn.set_processor(attn.processor.original)
    _remove_rope_hooks(net)
    net.__dict__.pop(STATE_ATTRIBUTE, None)


@contextmanager
def causal_call(state: CausalAttentionState, call: CausalCall) -> Iterator[CausalCall]:
    """Make ``call`` the mode of the network's forwards inside the block (the previous one restored, also on errors)."""
    previous, state.call = state.call, call
    try:
        yield call
    finally:
        state.call = previous


# ---------------------------------------------------------------------------------------------------- host


class CausalWanHost(WanVideo2WorldHost):
    """Causal Wan student host (:class:`distill_mixins.contract.CausalHost`), ``expand_timesteps`` layout only.

    ``CausalWanHost(net, *, chunk_size=3, max_frames=21, kv_window=None, kv_sink=0, **wan_host_args)``:
    ``chunk_size`` latent frames per chunk (the first chunk takes the remainder); ``max_frames`` the latent frames the
    KV caches and positions cover (absolute indices ``0 .. max_frames - 1``; at most the model's
    ``rope_max_seq_len``); ``kv_window`` / ``kv_sink``: a rolling cache window (:class:`KVCache`), None: no window.
    The other arguments are :class:`WanVideo2WorldHost`'s.

    Installs the causal processors and the rope hook on ``self.net`` in the constructor (before a method mixin copies
    it into the student, critic and EMA, which then carry their own state); ``predict_causal`` / ``predict_chunk``
    install them on a network passed in without them. ``predict`` stays the bidirectional diffusers computation.
    """

    def __init__(
        self, net: WanTransformer3DModel, *, chunk_size: int = 3, max_frames: int = 21, kv_window: int | None = None,
        kv_sink: int = 0, **kwargs: Any,
    ) -> None:
        super().__init__(net, **kwargs)
        if self.conditioning != "expand_timesteps":
            raise ValueError(
                f"CausalWanHost needs the expand_timesteps layout (in_channels == out_channels: Wan 2.2 TI2V, text-to-"
                f"video), where time is per frame; this transformer is {self.conditioning} (in_channels="
                f"{net.config.in_channels}, out_channels={net.config.out_channels}, Wan 2.1 I2V)."
            )
        self.chunk_size = check_chunk_size(chunk_size, "CausalWanHost chunk_size")
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise ValueError(f"CausalWanHost max_frames={max_frames!r}: give the latent frames covered, an int >= 1.")
        rope_frames = net.rope.max_seq_len // net.config.patch_size[0]
        if max_frames > rope_frames:
            raise ValueError(
                f"CausalWanHost max_frames={max_frames} exceeds the {rope_frames} frames this transformer's rotary "
                "embedding covers (rope_max_seq_len)."
            )
        self.max_frames, self.kv_window, self.kv_sink = max_frames, kv_window, kv_sink
        install_causal_attention(self.net, max_frames=max_frames, window=kv_window, sink=kv_sink)

    # ------------------------------------------------------------------------------------------- networks

    def _state(self, net: nn.Module) -> CausalAttentionState:
        """``net``'s state, installing causal attention on a network without it; a RuntimeError when its processors
        or hook were replaced since."""
        state = causal_state(net)
        if state is None:
            return install_causal_attention(net, max_frames=self.max_frames, window=self.kv_window, sink=self.kv_sink)
        if not is_causal_installed(net):
            raise RuntimeError(
                f"{type(net).__name__}'s causal self-attention processors or rotary hook were replaced or removed "
                "(e.g. set_attn_processor); a causal forward does not run with full attention. Reinstall with "
                "install_causal_attention(net, max_frames=...)."
            )
        return state

    def _run(self, net: nn.Module, state: CausalAttentionState, call: CausalCall, x: Tensor, time: Tensor,
             condition: Any) -> Tensor:
        with causal_call(state, call):
            out = self.predict(net, x, time, condition)
        ran = len(_self_attention(net))
        if call.frames is None or call.layers != set(range(ran)):
            raise RuntimeError(
                f"a {call.mode} forward ran causally in self-attention layers {sorted(call.layers)} of {ran} (rotary "
                f"hook run: {call.frames is not None}); a causal forward does not fall back to full attention."
            )
        return out

    @staticmethod
    def _frame_time(time: Tensor, x: Tensor, what: str) -> Tensor:
        b, frames = x.shape[0], x.shape[2]
        if time.ndim == 1 and time.shape[0] == b:
            return time[:, None].expand(b, frames)
        if time.ndim != 2 or tuple(time.shape) != (b, frames):
            raise ValueError(f"{what}: time must be per frame (B, T) = ({b}, {frames}), got {tuple(time.shape)}.")
        return time

    # ------------------------------------------------------------------------------------------- contract

    def predict_causal(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """Velocity (B, C, T, H, W) of ``net`` at RF state x and per-frame time tau (B, T) with block-causal
        self-attention (a frame of chunk c attends to the frames of chunks <= c; positions 0 .. T-1). Raises when
        the chunk layout cannot be built. The KV cache is neither read nor written."""
        state = self._state(net)
        _, p_h, p_w = net.config.patch_size
        tokens_per_frame = (x.shape[3] // p_h) * (x.shape[4] // p_w)
        spans = require_spans(x.shape[2], self.chunk_size, tokens_per_frame)
        time = self._frame_time(time, x, "predict_causal")
        return self._run(net, state, CausalCall("block_causal", spans=spans), x, time, condition)

    def predict_chunk(
        self, net: nn.Module, x: Tensor, time: Tensor, condition: Any, start_frame: int, store_kv: bool
    ) -> Tensor:
        """Velocity (B, C, n, H, W) of the chunk x (B, C, n, H, W) of frames ``start_frame .. start_frame + n - 1`` at
        per-frame time (B, n): self-attention over ``net``'s cached frames before ``start_frame`` plus the chunk
        (positions absolute); ``store_kv`` writes the chunk's keys and values (detached) over its frames' slots,
        ``False`` leaves the cache unchanged. Frames past ``max_frames`` (no window) raise an IndexError; missing
        earlier frames a RuntimeError."""
        state = self._state(net)
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"predict_chunk: start_frame={start_frame!r} must be an int >= 0.")
        frames = x.shape[2]
        if state.window is None and start_frame + frames > state.max_frames:
            raise IndexError(
                f"predict_chunk: frames {start_frame}..{start_frame + frames - 1} overflow the KV cache of "
                f"{state.max_frames} frames (absolute positions): build the host with more max_frames, or stream "
                "with kv_window."
            )
        time = self._frame_time(time, x, "predict_chunk")
        call = CausalCall("cached", start_frame=start_frame, store_kv=bool(store_kv))
        return self._run(net, state, call, x, time, condition)

    def clear_kv_cache(self, net: nn.Module) -> None:
        """Forget every cached frame of ``net``."""
        state = causal_state(net)
        if state is not None:
            state.clear()

    def kv_cache_checksum(self, net: nn.Module) -> float:
        """:meth:`CausalAttentionState.checksum` of ``net``'s caches (0.0 when empty)."""
        state = causal_state(net)
        return 0.0 if state is None else state.checksum()


__all__ = [
    "CausalAttentionState",
    "CausalCall",
    "CausalRopeHook",
    "CausalRotary",
    "CausalWanAttnProcessor",
    "CausalWanHost",
    "causal_call",
    "causal_state",
    "install_causal_attention",
    "is_causal_installed",
    "remove_causal_attention",
]
