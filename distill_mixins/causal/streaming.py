"""Streaming inference of a causal student: chunk by chunk through the KV cache (MATH.md section 7).

:func:`stream_causal` is the sampler, a pure function of a chunk denoiser, the noise and the student's times, with
injectable randomness like every sampler of :mod:`distill_mixins.sampling`; it yields each chunk as it finishes:

    for each chunk [s, e) (the first chunk takes the remainder):
        x_t = sigma_d sin(t_0) noise[:, :, s:e]
        for k in 0..K-1: x0 = denoise(x_t, t_k, s, store_kv=False); re-noise x0 to t_{k+1} (if k < K-1)
        refresh the cache: denoise(x0, 0, s, store_kv=True), or x0 re-noised to ``context_time``, at that time
        yield (s, e, x0)

:func:`generate_causal` runs it for a composed model with a :class:`~distill_mixins.contract.CausalHost` host (cache
cleared first, the whole clip returned, or the chunks yielded with ``stream=True``). Rollouts longer than the
network's cache use its rolling window (set on the host's network, e.g. ``set_kv_window``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill_mixins.causal.chunks import chunk_bounds
from distill_mixins.config import RENOISE_MODES, check_choice
from distill_mixins.sampling import initial_state, renoise_state
from distill_mixins.trigflow import add_noise

ChunkDenoiser = Callable[[Tensor, Tensor, int, bool], Tensor]
"""``denoise(x_t (B, C, n, H, W), t (B, n) float64 TrigFlow times, start_frame, store_kv) -> x0 (B, C, n, H, W)``."""


@dataclass(frozen=True)
class StreamedChunk:
    """One finished chunk: frames ``start .. end - 1`` of the rollout, ``x0`` (B, C, end - start, H, W)."""

    start: int
    end: int
    x0: Tensor


RandnLike = Callable[[Tensor], Tensor]
"""``randn_like(x) -> unit normal noise shaped like x``: an injectable source of fresh noise (e.g. a training
step's split-invariant ``model.draws.randn_like``)."""


def stream_causal(
    denoise: ChunkDenoiser, noise: Tensor, ts: Tensor, *, chunk_size: int, sigma_data: float,
    generator: torch.Generator | None = None, renoise: str = "fresh", context_time: float = 0.0,
    exits: Sequence[int] | None = None, randn_like: RandnLike | None = None,
) -> Iterator[StreamedChunk]:
    """Chunk-by-chunk few-step sampling (see the module docstring): ``noise`` (B, C, T, H, W) unit normal sets the
    rollout's length, ``ts`` the K descending TrigFlow times, ``renoise`` as :func:`~distill_mixins.sampling.
    sample_student`, ``context_time`` the time the cache is refreshed at (0: the clean chunk). Randomness (fresh
    re-noising, context noise): ``randn_like`` when given, else ``generator``. ``exits``: per chunk the step whose x0
    finishes the chunk (Self-Forcing's exit steps; None: the last, K - 1). The caller clears the cache before."""
    check_choice("stream_causal", "renoise", renoise, RENOISE_MODES)
    times = [float(t) for t in ts]
    bounds = chunk_bounds(noise.shape[2], chunk_size)
    exits = [len(times) - 1] * len(bounds) if exits is None else list(exits)
    if len(exits) != len(bounds) or any(not 0 <= e < len(times) for e in exits):
        raise ValueError(f"stream_causal: exits={exits} must give one step in 0..{len(times) - 1} per chunk "
                         f"({len(bounds)} chunks).")
    fresh = randn_like or (lambda x: torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator))
    for (start, end), exit_step in zip(bounds, exits, strict=True):
        eps = noise[:, :, start:end]
        x = initial_state(eps, ts[0], sigma_data)
        for k, t in enumerate(times[: exit_step + 1]):
            x0 = denoise(x, _times(x, t), start, False)
            if k < exit_step:
                mode, given = ("initial", fresh(eps)) if renoise == "fresh" else (renoise, eps)
                x = renoise_state(x, x0, t, times[k + 1], given, mode, sigma_data=sigma_data)
        context = x0
        if context_time > 0:
            context = add_noise(x0, fresh(x0), torch.tensor(context_time, dtype=torch.float64), sigma_data)
        denoise(context, _times(x0, context_time), start, True)
        yield StreamedChunk(start, end, x0)


PrefixDenoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x_t (B, C, e, H, W), t (B, e)) -> x0 (B, C, e, H, W)``: a block-causal full-sequence forward on frames
``0 .. e - 1``."""


def stream_causal_uncached(
    denoise: PrefixDenoiser, noise: Tensor, ts: Tensor, *, chunk_size: int, sigma_data: float,
    generator: torch.Generator | None = None, renoise: str = "fresh", context_time: float = 0.0,
) -> Iterator[StreamedChunk]:
    """:func:`stream_causal` without a cache: every step runs the block-causal forward on the whole prefix (the
    finished chunks as the cache would hold them, at time 0 or ``context_time``, then the current chunk), the
    reference the cached sampler must equal and the baseline of ``benchmarks/causal_stream.py``."""
    check_choice("stream_causal_uncached", "renoise", renoise, RENOISE_MODES)
    times = [float(t) for t in ts]
    context, context_t = noise[:, :, :0], noise.new_zeros(noise.shape[0], 0, dtype=torch.float64)
    for start, end in chunk_bounds(noise.shape[2], chunk_size):
        eps = noise[:, :, start:end]
        x = initial_state(eps, ts[0], sigma_data)
        for k, t in enumerate(times):
            prefix = torch.cat([context, x.to(context.dtype)], dim=2)
            x0 = denoise(prefix, torch.cat([context_t, _times(x, t)], dim=1))[:, :, start:end]
            if k + 1 < len(times):
                x = renoise_state(x, x0, t, times[k + 1], eps, renoise, sigma_data=sigma_data, generator=generator)
        finished = x0
        if context_time > 0:
            fresh = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
            finished = add_noise(x0, fresh, torch.tensor(context_time, dtype=torch.float64), sigma_data)
        context = torch.cat([context, finished.to(context.dtype)], dim=2)
        context_t = torch.cat([context_t, _times(x0, context_time)], dim=1)
        yield StreamedChunk(start, end, x0)


def _times(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0], x.shape[2]), t, dtype=torch.float64, device=x.device)


def causal_denoiser(model: Any, net: nn.Module, condition: Any) -> ChunkDenoiser:
    """The chunk denoiser of ``net`` through a composed model's causal host (its ``trigflow_denoise_chunk``)."""

    def denoise(x_t: Tensor, t: Tensor, start_frame: int, store_kv: bool) -> Tensor:
        return model.trigflow_denoise_chunk(net, x_t, t, condition, start_frame, store_kv).x0

    return denoise


@torch.no_grad()
def generate_causal(
    model: Any, condition: Any, noise: Tensor, *, net: nn.Module | None = None, ts: Tensor | None = None,
    generator: torch.Generator | None = None, renoise: str = "ode", context_time: float = 0.0,
    stream: bool = False, randn_like: RandnLike | None = None,
) -> Tensor | Iterator[StreamedChunk]:
    """Sample a clip (B, C, T, H, W) chunk by chunk with the causal student ``net`` (default ``model.net``) of a
    composed model, its cache cleared first; ``ts`` default ``model.student_times()``. ``stream=True`` returns
    the iterator of :class:`StreamedChunk` instead (each chunk as soon as it is done). ``renoise`` default
    ``"ode"`` (the input a CausalKD student was trained on); fresh noise from ``randn_like`` or ``generator``."""
    net = model.net if net is None else net
    ts = model.student_times() if ts is None else ts
    model.clear_kv_cache(net)
    chunks = stream_causal(
        causal_denoiser(model, net, condition), noise, ts, chunk_size=model.chunk_size, sigma_data=model.sigma_data,
        generator=generator, renoise=renoise, context_time=context_time, randn_like=randn_like,
    )
    if stream:
        return _no_grad(chunks)
    return torch.cat([chunk.x0 for chunk in chunks], dim=2)


def _no_grad(chunks: Iterator[StreamedChunk]) -> Iterator[StreamedChunk]:
    while True:
        with torch.no_grad():
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield chunk


__all__ = [
    "ChunkDenoiser",
    "PrefixDenoiser",
    "StreamedChunk",
    "causal_denoiser",
    "generate_causal",
    "stream_causal",
    "stream_causal_uncached",
]
