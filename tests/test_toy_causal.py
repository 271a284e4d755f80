"""The toy causal transformer (ToyCausalDiT) and its host: causality, cached == full, cache semantics, the mask that
cannot silently disappear, and chunk-by-chunk denoising through the host and the core (float64, small sizes)."""

from __future__ import annotations

import copy

import pytest
import torch

from distill_mixins import KDMixin
from distill_mixins.causal import chunk_bounds, generate_causal, stream_causal_uncached
from distill_mixins.contract import CausalHost
from distill_mixins.parallel.activation import apply_activation_checkpointing
from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.host import ToyCondition, first_frame_mask
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.unet import ToyUNet
from distill_mixins.trigflow import add_noise

SMALL = {"dim": 48, "depth": 2, "heads": 4, "text_dim": 16, "max_frames": 12, "image_size": 16, "chunk_size": 3}
B, C, HW = 2, 3, 16


def small_net(seed: int = 0, **overrides: int) -> ToyCausalDiT:
    """A small float64 network with every weight (the zero-initialised ones too) perturbed, so each layer acts."""
    torch.manual_seed(seed)
    net = ToyCausalDiT(**{**SMALL, **overrides}).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(frames: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, T, H, W), per-frame tau (B, T), the first-frame mask, text (B, 16), float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, HW, HW, generator=g, dtype=torch.float64)
    tau = torch.rand(B, frames, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x, tau, first_frame_mask(B, frames).double(), torch.randn(B, 16, generator=g, dtype=torch.float64)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ------------------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("frames", [7, 8])
def test_block_causal_forward_is_causal_by_chunk(frames):
    """Perturbing chunk c (its input and its time) leaves chunks < c bit-identical and changes every chunk >= c."""
    net = small_net()
    x, tau, mask, text = inputs(frames)
    bounds = chunk_bounds(frames, 3)
    assert bounds[0] == ((0, 1) if frames == 7 else (0, 2))
    out = net(x, tau, mask, text, attention="block_causal")
    for c, (s, e) in enumerate(bounds):
        x2, tau2 = x.clone(), tau.clone()
        x2[:, :, s:e] += 1.0
        tau2[:, s:e] = 0.5 * tau2[:, s:e]
        out2 = net(x2, tau2, mask, text, attention="block_causal")
        for c2, (s2, e2) in enumerate(bounds):
            if c2 < c:
                assert torch.equal(out[:, :, s2:e2], out2[:, :, s2:e2]), (c, c2)
            else:
                assert max_diff(out[:, :, s2:e2], out2[:, :, s2:e2]) > 1e-4, (c, c2)


def test_bidirectional_differs_and_single_chunk_known_answers():
    """Bidirectional differs from block-causal on the early chunks; with one chunk (chunk_size >= T) block-causal,
    bidirectional and a cached forward on an empty cache are the same forward; tau (B,) == constant (B, T)."""
    net = small_net()
    x, tau, mask, text = inputs(8)
    bi = net(x, tau, mask, text, attention="bidirectional")
    causal = net(x, tau, mask, text, attention="block_causal")
    assert max_diff(bi[:, :, :5], causal[:, :, :5]) > 1e-3
    one_chunk = net(x, tau, mask, text, attention="block_causal", chunk_size=8)
    assert max_diff(one_chunk, bi) < 1e-12
    net.clear_kv_cache()
    cached = net(x, tau, mask, text, attention="cached", chunk_size=8, start_frame=0)
    assert max_diff(cached, bi) < 1e-12
    same = tau[:, :1].expand(B, 8)
    assert torch.equal(net(x, same[:, 0], mask, text), net(x, same, mask, text))


def test_position_embedding_and_rope_base_are_options_that_act():
    """The absolute (row, column) token embedding is one table shared by every frame (so cached chunks at any start
    see it too, as the cached == full tests check); without it the network has no such parameters; the RoPE base
    changes the forward; a base <= 1 is refused by name."""
    x, tau, mask, text = inputs(8)
    with_pos, without = small_net(), small_net(position_embedding=False)
    assert "position_embed.weight" in with_pos.state_dict()
    assert not any(k.startswith("position_embed") for k in without.state_dict())
    table = with_pos._position((8, 4, 4), torch.float64, None)
    assert table.shape == (16, SMALL["dim"]) and max_diff(table[0], table[5]) > 1e-3
    base = with_pos(x, tau, mask, text)
    other = copy.deepcopy(with_pos)
    other.rope_theta = 10000.0
    assert max_diff(other(x, tau, mask, text), base) > 1e-6
    with pytest.raises(ValueError, match="rope_theta"):
        ToyCausalDiT(**SMALL, rope_theta=1.0)


# ------------------------------------------------------------------------------------------- cached == full


def _prefill_and_compare(net, x_ctx, tau_ctx, x, tau, mask, text, frames, shift=0):
    """For every chunk c: cache the chunks < c (inputs x_ctx at tau_ctx), run chunk c (inputs x at tau) through
    the cache at start_frame + shift, and compare with the block-causal full forward on the mixed inputs."""
    diffs = []
    net.clear_kv_cache()
    for s, e in chunk_bounds(frames, 3):
        full_x = torch.cat([x_ctx[:, :, :s], x[:, :, s:]], dim=2)
        full_tau = torch.cat([tau_ctx[:, :s], tau[:, s:]], dim=1)
        full = net(full_x, full_tau, mask, text, attention="block_causal")[:, :, s:e]
        start = max(0, s + shift)
        chunk = net(x[:, :, s:e], tau[:, s:e], mask[:, :, s:e], text, attention="cached", start_frame=start)
        diffs.append(max_diff(chunk, full))
        net(x_ctx[:, :, s:e], tau_ctx[:, s:e], mask[:, :, s:e], text, attention="cached", start_frame=s,
            store_kv=True)
    return diffs


@pytest.mark.parametrize("frames", [7, 8])
def test_cached_chunks_equal_the_block_causal_full_forward(frames):
    """Clean prefill (context at tau = 0) and context noise (re-noised to a small tau_ctx): 1e-10 in float64;
    a wrong start_frame (positions and context one frame off) is caught."""
    net = small_net()
    x, tau, mask, text = inputs(frames)
    clean = torch.randn_like(x)
    zero = torch.zeros_like(tau)
    assert max(_prefill_and_compare(net, clean, zero, x, tau, mask, text, frames)) < 1e-10
    tau_ctx = torch.full_like(tau, 0.05)
    noisy = (1 - 0.05) * clean + 0.05 * torch.randn_like(clean)
    assert max(_prefill_and_compare(net, noisy, tau_ctx, x, tau, mask, text, frames)) < 1e-10
    wrong = _prefill_and_compare(net, noisy, tau_ctx, x, tau, mask, text, frames, shift=-1)
    assert wrong[0] < 1e-10 and min(wrong[1:]) > 1e-4  # chunk 0 has start_frame 0 either way


# ------------------------------------------------------------------------------------------- cache semantics


def _checksums(net: ToyCausalDiT) -> list[float]:
    return [cache.checksum() for cache in net.kv_caches]


def test_cache_store_clear_overflow_and_copies():
    net = small_net(max_frames=8)
    x, tau, mask, text = inputs(8)
    net(x[:, :, :2], tau[:, :2], mask[:, :, :2], text, attention="cached", store_kv=True)
    assert all(cache.cached_frames == [0, 1] for cache in net.kv_caches)
    stored = _checksums(net)
    out = net(x[:, :, 2:5], tau[:, 2:5], mask[:, :, 2:5], text, attention="cached", start_frame=2)
    assert _checksums(net) == stored  # store_kv=False never changes the cache
    again = net(x[:, :, :2], tau[:, :2], mask[:, :, :2], text, attention="cached", store_kv=True)
    assert _checksums(net) == stored and net.kv_caches[0].cached_frames == [0, 1]  # idempotent
    assert again.shape == (B, C, 2, HW, HW)
    stored_out = net(x[:, :, 2:5], tau[:, 2:5], mask[:, :, 2:5], text, attention="cached", start_frame=2, store_kv=True)
    assert torch.equal(stored_out, out)  # storing does not change the chunk's own output
    assert net.kv_caches[0].cached_frames == [0, 1, 2, 3, 4]
    assert not any("cache" in key for key in net.state_dict())
    twin = copy.deepcopy(net)
    assert all(a is not b for a, b in zip(twin.kv_caches, net.kv_caches, strict=True))
    twin.clear_kv_cache()
    assert net.kv_caches[0].cached_frames == [0, 1, 2, 3, 4]
    net.clear_kv_cache()
    assert all(cache.cached_frames == [] and cache.checksum() == 0.0 for cache in net.kv_caches)
    with pytest.raises(RuntimeError, match="not cached"):  # a chunk whose context was never stored
        net(x[:, :, 2:5], tau[:, 2:5], mask[:, :, 2:5], text, attention="cached", start_frame=2)
    with pytest.raises(ValueError, match="max_frames"):  # frames 6..8 overflow 8 frames
        net(x[:, :, :3], tau[:, :3], mask[:, :, :3], text, attention="cached", start_frame=6)
    big = inputs(9)
    with pytest.raises(ValueError, match="max_frames"):
        net(*big, attention="block_causal")
    with pytest.raises(ValueError, match="more than one chunk"):
        net(x[:, :, :4], tau[:, :4], mask[:, :, :4], text, attention="cached")
    with pytest.raises(ValueError, match="store_kv=True needs"):
        net(x, tau, mask, text, attention="block_causal", store_kv=True)


def test_rolling_window_streams_past_max_frames_and_evicts():
    """window 3 + sink 1 on a cache of 8 frames: 6 chunks of 3 frames (absolute frames 0..17) stream through,
    keeping frame 0 and the last 3 frames; without a window, the same stream overflows."""
    net = small_net(max_frames=8)
    x, tau, mask, text = inputs(3)
    net.set_kv_window(3, sink=1)
    outs = []
    for start in range(0, 18, 3):
        outs.append(net(x, tau, mask, text, attention="cached", start_frame=start))
        net(x, tau, mask, text, attention="cached", start_frame=start, store_kv=True)
        assert net.kv_caches[0].cached_frames == sorted({0, *range(max(1, start), start + 3)})[-4:]
    assert net.kv_caches[-1].cached_frames == [0, 15, 16, 17]
    assert all(bool(o.isfinite().all()) for o in outs)
    assert max_diff(outs[-1], outs[-2]) > 1e-4  # positions stay absolute: the same input at a later frame differs
    net.set_kv_window(None)
    with pytest.raises(ValueError, match="max_frames"):
        for start in range(0, 18, 3):
            net(x, tau, mask, text, attention="cached", start_frame=start, store_kv=True)


# ---------------------------------------------------------------------------------- the mask cannot vanish


@pytest.mark.parametrize("broken", ["raise", "none"])
def test_block_causal_forward_raises_without_its_layout(monkeypatch, broken):
    import distill_mixins.causal.attention as layout_module

    def no_layout(*args, **kwargs):
        if broken == "raise":
            raise MemoryError("no room for the layout")
        return None

    net = small_net()
    x, tau, mask, text = inputs(7)
    monkeypatch.setattr(layout_module, "block_causal_spans", no_layout)
    with pytest.raises(RuntimeError, match="does not fall back to full attention"):
        net(x, tau, mask, text, attention="block_causal")
    assert net(x, tau, mask, text, attention="bidirectional").shape == x.shape  # the other modes need no layout


def test_activation_checkpointed_blocks_give_the_same_gradients():
    net = small_net()
    x, tau, mask, text = inputs(7)
    grads = []
    for checkpointed in (False, True):
        if checkpointed:
            assert apply_activation_checkpointing(net.blocks, "full") == len(net.blocks)
        net.zero_grad()
        net(x, tau, mask, text, attention="block_causal").square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert max_diff(*grads) < 1e-12


# ------------------------------------------------------------------------------------ host and the core


class ToyCausalKDProbe(KDMixin, ToyCausalVideo2World):
    pass


def composed() -> ToyCausalKDProbe:
    torch.manual_seed(0)
    text_encoder = ToyTextEncoder(dim=16, layers=1, heads=2)
    model = ToyCausalKDProbe(small_net(), text_encoder, chunk_size=3).double()
    return model


@pytest.mark.parametrize("frames", [7, 8])
def test_chunk_denoising_through_the_host_equals_the_causal_full_denoise(frames):
    """trigflow_denoise_chunk chunk by chunk (each chunk stored, noisy or re-run clean at t = 0 as Self-Forcing
    does) equals trigflow_denoise_causal on the same per-frame inputs; the first frame is pasted."""
    model = composed()
    assert isinstance(model, CausalHost) and model.supports_per_frame_time and model.chunk_size == 3
    assert model.feature_blocks(model.net) == list(model.net.blocks)
    assert model.net is not model.net_teacher and model.net.kv_caches[0] is not model.net_teacher.kv_caches[0]
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(B, C, frames, HW, HW, generator=g, dtype=torch.float64)
    text = torch.randn(B, 16, generator=g, dtype=torch.float64)
    condition = ToyCondition(text, x0, first_frame_mask(B, frames).double())
    bounds = chunk_bounds(frames, 3)
    chunk_t = torch.rand(B, len(bounds), generator=g, dtype=torch.float64) * 1.2 + 0.2
    t = chunk_t.repeat_interleave(torch.tensor([e - s for s, e in bounds]), dim=1)  # (B, T), constant per chunk
    x_t = add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t, 1.0)

    full = model.trigflow_denoise_causal(model.net, x_t, t, condition)
    model.clear_kv_cache(model.net)
    chunks = [model.trigflow_denoise_chunk(model.net, x_t[:, :, s:e], t[:, s:e], condition, s, store_kv=True)
              for s, e in bounds]
    x0_chunks = torch.cat([d.x0 for d in chunks], dim=2)
    assert max_diff(x0_chunks, full.x0) < 1e-10
    assert max_diff(torch.cat([d.F for d in chunks], dim=2), full.F) < 1e-9
    assert torch.equal(full.x0[:, :, 0], x0[:, :, 0]) and torch.equal(x0_chunks[:, :, 0], x0[:, :, 0])

    # Self-Forcing's cache: each chunk denoised, then its x0 re-run at t = 0 with store_kv=True.
    model.clear_kv_cache(model.net)
    outs, context = [], []
    for s, e in bounds:
        outs.append(model.trigflow_denoise_chunk(model.net, x_t[:, :, s:e], t[:, s:e], condition, s).x0)
        zero = torch.zeros(B, e - s, dtype=torch.float64)
        stored = model.trigflow_denoise_chunk(model.net, outs[-1], zero, condition, s, store_kv=True).x0
        assert torch.equal(stored[:, :, (1 if s == 0 else 0):], outs[-1][:, :, (1 if s == 0 else 0):])
        context.append(outs[-1])
    for c, (s, e) in enumerate(bounds):  # each chunk against one full forward on (clean context, its own input)
        full_x = torch.cat([*context[:c], x_t[:, :, s:]], dim=2)
        full_t = torch.cat([torch.zeros(B, s, dtype=torch.float64), t[:, s:]], dim=1)
        ref = model.trigflow_denoise_causal(model.net, full_x, full_t, condition).x0[:, :, s:e]
        assert max_diff(outs[c], ref) < 1e-10


def test_host_velocity_and_the_bidirectional_teacher():
    """predict (bidirectional) returns (x - x0) / tau per frame, 0 at tau = 0; a UNet teacher gets one tau a sample;
    the causal methods refuse a network without a KV cache."""
    model = composed()
    x, tau, mask, text = inputs(7)
    tau[:, 3] = 0.0
    condition = ToyCondition(text, torch.zeros_like(x), mask)
    v = model.predict(model.net, x, tau, condition)
    x0 = model.net(x, tau, mask, text)
    assert max_diff(v[:, :, :3], (x - x0)[:, :, :3] / tau[:, None, :3, None, None]) < 1e-12
    assert torch.equal(v[:, :, 3], torch.zeros_like(v[:, :, 3])) and bool(v.isfinite().all())
    unet = ToyUNet(frames=7, widths=(8, 16), blocks=1, emb_dim=32, text_dim=16).double()
    same = torch.cat([torch.full((B, 1), 1e-4), torch.full((B, 6), 0.3)], dim=1).double()
    ref = (x - unet(x, same[:, 1], mask, text)) / same[:, None, :, None, None]
    assert max_diff(model.predict(unet, x, same, condition), ref) < 1e-12
    with pytest.raises(ValueError, match="different times"):
        model.predict(unet, x, tau, condition)
    with pytest.raises(TypeError, match="ToyCausalDiT"):
        model.predict_causal(unet, x, same, condition)


@pytest.mark.parametrize("context_time", [0.0, 0.1])
def test_generate_causal_equals_recomputing_the_prefix(context_time):
    """The cached streaming sampler (generate_causal) equals the uncached one, which runs the block-causal forward
    on the whole prefix at every step (float64, T = 7: chunks of 1, 3, 3 frames), with and without context noise;
    streaming yields the same chunks."""
    model = composed()
    g = torch.Generator().manual_seed(9)
    latent = torch.rand(B, C, 7, HW, HW, generator=g, dtype=torch.float64)
    condition = ToyCondition(torch.randn(B, 16, generator=g, dtype=torch.float64), latent,
                             first_frame_mask(B, 7).double())
    noise = torch.randn(latent.shape, generator=g, dtype=torch.float64)
    ts = torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)
    kwargs = {"ts": ts, "renoise": "fresh", "context_time": context_time}
    cached = generate_causal(model, condition, noise, generator=torch.Generator().manual_seed(4), **kwargs)

    def prefix(x_t, t):
        return model.trigflow_denoise_causal(model.net, x_t, t, condition).x0

    uncached = torch.cat([c.x0 for c in stream_causal_uncached(
        prefix, noise, ts, chunk_size=3, sigma_data=1.0, generator=torch.Generator().manual_seed(4),
        renoise="fresh", context_time=context_time)], dim=2)
    assert cached.shape == latent.shape and max_diff(cached, uncached) < 1e-10
    assert torch.equal(cached[:, :, 0], latent[:, :, 0])  # the given first frame
    streamed = list(generate_causal(model, condition, noise, generator=torch.Generator().manual_seed(4),
                                    stream=True, **kwargs))
    assert [(c.start, c.end) for c in streamed] == [(0, 1), (1, 4), (4, 7)]
    assert torch.equal(torch.cat([c.x0 for c in streamed], dim=2), cached)
