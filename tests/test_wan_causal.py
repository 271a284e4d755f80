"""CausalWanHost: a causal Wan student host (block-causal full-sequence forward, chunk forward through a KV cache).

On tiny random diffusers ``WanTransformer3DModel`` s (CPU, float32): ``predict`` stays diffusers' own computation,
causality of ``predict_causal`` (bit-identical earlier chunks), cached chunks equal the block-causal full forward
(clean and context-noise prefill), cache semantics, the mask cannot silently disappear, deep copies get their own
caches, activation checkpointing recomputes in the same mode.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import distill_mixins.causal.attention
from distill_mixins import KDConfig, KDMixin
from distill_mixins.causal import chunk_bounds
from distill_mixins.contract import CausalHost, check_causal_host_class
from distill_mixins.hosts import WanVideo2WorldHost
from distill_mixins.hosts.wan_causal import (
    CausalCall,
    CausalRopeHook,
    CausalWanAttnProcessor,
    CausalWanHost,
    causal_call,
    causal_state,
    remove_causal_attention,
)
from distill_mixins.parallel.activation import apply_activation_checkpointing
from tests.hosts_helpers import TEXT_DIM, TEXT_LEN, WIDTH, B, C, H, W, adam, tiny_wan

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

CHUNK = 3
MAX_FRAMES = 12
T_CTX = 0.05  # context noise: RF time of the re-noised context frames
TOL = 1e-5  # cached chunk vs block-causal full forward, float32


def make_host(seed: int = 0, **kwargs) -> CausalWanHost:
    kwargs = {"chunk_size": CHUNK, "max_frames": MAX_FRAMES, "num_conditional_frames": 0, **kwargs}
    return CausalWanHost(tiny_wan(seed), **kwargs)


def inputs(frames: int, seed: int = 1, host: CausalWanHost | None = None):
    """``(x, time (B, T), condition)``: a noisy state, per-frame times in (0.2, 0.9), a text condition."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, H, W, generator=g)
    time = (0.2 + 0.7 * torch.rand(B, frames, generator=g)).double()
    host = host or make_host()
    embeds = torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    condition = host.build_condition(embeds, torch.zeros(B, C, frames, H, W), 0)
    return x, time, condition


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------------ contract


def test_contract_and_construction():
    host = make_host()
    assert isinstance(host, CausalHost) and host.chunk_size == CHUNK and host.max_frames == MAX_FRAMES
    check_causal_host_class(CausalWanHost)
    assert all(isinstance(b.attn1.processor, CausalWanAttnProcessor) for b in host.net.blocks)
    assert all(type(b.attn2.processor) is WanAttnProcessor for b in host.net.blocks)  # cross-attention untouched
    assert sum(isinstance(h, CausalRopeHook) for h in host.net.rope._forward_hooks.values()) == 1
    with pytest.raises(ValueError, match="expand_timesteps layout"):
        CausalWanHost(tiny_wan(in_channels=2 * C + 4, image_dim=8, added_kv_proj_dim=WIDTH))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        make_host(max_frames=33)  # tiny_wan: rope_max_seq_len = 32
    with pytest.raises(ValueError, match="chunk_size"):
        make_host(chunk_size=0)


@pytest.mark.parametrize("per_frame", [True, False])
def test_predict_is_plain_diffusers(per_frame):
    """The processors and the rope hook leave ``predict`` (bidirectional) bit-identical to an untouched network."""
    host = make_host()
    plain_net = tiny_wan(0)
    plain = WanVideo2WorldHost(plain_net, num_conditional_frames=0)
    x, time, condition = inputs(7, host=host)
    time = time if per_frame else time[:, 0]
    with torch.no_grad():
        out = host.predict(host.net, x, time, condition)
        expected = plain.predict(plain_net, x, time, condition)
        direct = host.net(hidden_states=x, timestep=torch.full((B,), 500.0),
                          encoder_hidden_states=condition.encoder_hidden_states, return_dict=False)[0]
        direct_plain = plain_net(hidden_states=x, timestep=torch.full((B,), 500.0),
                                 encoder_hidden_states=condition.encoder_hidden_states, return_dict=False)[0]
    assert torch.equal(out, expected) and torch.equal(direct, direct_plain)
    # after causal calls, too (the mode is restored)
    with torch.no_grad():
        host.predict_causal(host.net, x, inputs(7, host=host)[1], condition)
        host.predict_chunk(host.net, x[:, :, :1], inputs(7, host=host)[1][:, :1], condition, 0, True)
        assert torch.equal(host.predict(host.net, x, time, condition), expected)
    assert causal_state(host.net).call is None


# ---------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("frames", [7, 5])
def test_block_causal_forward_is_causal(frames):
    """Perturbing chunk c (its frames, or its times) leaves the outputs of chunks < c bit-identical and changes the
    outputs of every chunk >= c; the bidirectional predict is not causal (the check would see it)."""
    host = make_host()
    x, time, condition = inputs(frames, host=host)
    bounds = chunk_bounds(frames, CHUNK)
    assert bounds[0] == ((0, 1) if frames == 7 else (0, 2))
    with torch.no_grad():
        base = host.predict_causal(host.net, x, time, condition)
        for c, (s, e) in enumerate(bounds):
            x_p = x.clone()
            x_p[:, :, s:e] += torch.randn_like(x_p[:, :, s:e])
            time_p = time.clone()
            time_p[:, s:e] = 0.05
            for out in (host.predict_causal(host.net, x_p, time, condition),
                        host.predict_causal(host.net, x, time_p, condition)):
                assert torch.equal(out[:, :, :s], base[:, :, :s]), (frames, c)
                for s2, e2 in bounds[c:]:
                    assert max_diff(out[:, :, s2:e2], base[:, :, s2:e2]) > 1e-4, (frames, c, s2)
        x_p = x.clone()
        x_p[:, :, bounds[-1][0]:] += 1.0
        bidirectional = host.predict(host.net, x, time, condition)
        assert max_diff(host.predict(host.net, x_p, time, condition)[:, :, :1], bidirectional[:, :, :1]) > 1e-4
        # a chunk as large as the clip is the bidirectional forward (up to the attention kernel's rounding)
        whole = CausalWanHost(host.net, chunk_size=frames, max_frames=MAX_FRAMES, num_conditional_frames=0)
        assert max_diff(whole.predict_causal(host.net, x, time, condition), bidirectional) < 1e-5


# ------------------------------------------------------------------------------------------- cached == full


def prefill_inputs(x0: torch.Tensor, eps: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The context frames as stored: clean (time 0), or re-noised to ``T_CTX`` (RF: (1 - t) x0 + t eps)."""
    t = 0.0 if kind == "clean" else T_CTX
    return (1 - t) * x0 + t * eps, torch.full(x0.shape[:1] + x0.shape[2:3], t, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["clean", "context_noise"])
def test_cached_chunk_equals_block_causal_forward(kind):
    """Chunk c through the cache (chunks < c prefilled with store_kv=True) equals chunk c of the block-causal full
    forward given the same per-frame inputs and times; a wrong start_frame does not."""
    frames = 7
    host = make_host()
    x, time, condition = inputs(frames, host=host)
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    ctx_x, ctx_t = prefill_inputs(x0, eps, kind)
    bounds = chunk_bounds(frames, CHUNK)
    gaps = []
    with torch.no_grad():
        for c, (s, e) in enumerate(bounds):
            chunk_t = time[:, s:s + 1].expand(B, e - s)  # one time per chunk, as the causal samplers use
            full_x = torch.cat([ctx_x[:, :, :s], x[:, :, s:]], dim=2)  # frames after chunk c: anything
            full_t = torch.cat([ctx_t[:, :s], chunk_t, time[:, e:]], dim=1)
            full = host.predict_causal(host.net, full_x, full_t, condition)[:, :, s:e]
            host.clear_kv_cache(host.net)
            for ps, pe in bounds[:c]:
                host.predict_chunk(host.net, ctx_x[:, :, ps:pe], ctx_t[:, ps:pe], condition, ps, True)
            checksum = host.kv_cache_checksum(host.net)
            cached = host.predict_chunk(host.net, x[:, :, s:e], chunk_t, condition, s, False)
            assert host.kv_cache_checksum(host.net) == checksum
            gaps.append(max_diff(cached, full))
            assert gaps[-1] < TOL, (kind, c, gaps[-1])
            if c:
                wrong = host.predict_chunk(host.net, x[:, :, s:e], chunk_t, condition, s - 1, False)
                assert max_diff(wrong, full) > 1e-3
                with pytest.raises(RuntimeError, match="not cached"):
                    host.predict_chunk(host.net, x[:, :, s:e], chunk_t, condition, s + 1, False)
    print(f"\ncached vs full ({kind}): max |diff| per chunk {gaps}")


def test_rope_offset_is_the_slice_of_the_full_table():
    """In cached mode the rotary embedding of a chunk is the full clip's table at the chunk's absolute frames."""
    host = make_host()
    net, state = host.net, causal_state(host.net)
    x = torch.zeros(1, C, 7, H, W)
    cos, sin = net.rope(x)
    tokens = (H // 2) * (W // 2)
    with causal_call(state, CausalCall("cached", start_frame=4)):
        chunk_cos, chunk_sin = net.rope(x[:, :, 4:])
    assert torch.equal(chunk_cos, cos[:, 4 * tokens:]) and torch.equal(chunk_sin, sin[:, 4 * tokens:])
    assert not torch.equal(chunk_cos, net.rope(x[:, :, 4:])[0])  # without the offset: frames 0..2


def test_streaming_rollout_matches_full_forward():
    """A Self-Forcing-style rollout: per chunk, denoising calls with store_kv=False (cache unchanged), then the
    final chunk stored at time 0; the chunk outputs equal one block-causal forward of the same inputs."""
    frames = 7
    host = make_host()
    x, time, condition = inputs(frames, host=host)
    host.clear_kv_cache(host.net)
    stored_x, outs = [], []
    with torch.no_grad():
        for s, e in chunk_bounds(frames, CHUNK):
            t = time[:, s:s + 1].expand(B, e - s)
            before = host.kv_cache_checksum(host.net)
            for _ in range(2):
                out = host.predict_chunk(host.net, x[:, :, s:e], t, condition, s, False)
            assert host.kv_cache_checksum(host.net) == before
            outs.append(out)
            final = x[:, :, s:e] - t[:, None, :, None, None].float() * out  # RF x0 = x - tau v
            host.predict_chunk(host.net, final, torch.zeros(B, e - s), condition, s, True)
            stored_x.append(final)
        assert causal_state(host.net).cached_frames == list(range(frames))
        for c, ((s, e), out) in enumerate(zip(chunk_bounds(frames, CHUNK), outs, strict=True)):
            full_x = torch.cat([*stored_x[:c], x[:, :, s:]], dim=2)  # the stored chunks before c, then chunk c
            full_t = torch.cat([torch.zeros(B, s, dtype=torch.float64), time[:, s:s + 1].expand(B, frames - s)], 1)
            full = host.predict_causal(host.net, full_x, full_t, condition)[:, :, s:e]
            assert max_diff(out, full) < TOL


# ------------------------------------------------------------------------------------------ cache semantics


def test_cache_semantics():
    host = make_host(max_frames=7)
    x, time, condition = inputs(7, host=host)
    state = causal_state(host.net)
    with torch.no_grad():
        assert host.kv_cache_checksum(host.net) == 0.0
        host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, 0, False)
        assert host.kv_cache_checksum(host.net) == 0.0 and state.cached_frames == []
        host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, 0, True)
        once = host.kv_cache_checksum(host.net)
        assert once != 0.0 and state.cached_frames == [0] and len(state.caches) == len(host.net.blocks)
        host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, 0, True)  # idempotent
        assert host.kv_cache_checksum(host.net) == once
        host.predict_chunk(host.net, x[:, :, 1:4], time[:, 1:4], condition, 1, True)
        two = host.kv_cache_checksum(host.net)
        out = host.predict_chunk(host.net, x[:, :, 4:7], time[:, 4:7], condition, 4, False)
        assert host.kv_cache_checksum(host.net) == two and state.cached_frames == [0, 1, 2, 3]
        host.predict_chunk(host.net, x[:, :, 1:4], time[:, 1:4], condition, 1, True)  # the same chunk again
        assert host.kv_cache_checksum(host.net) == two
        assert torch.equal(host.predict_chunk(host.net, x[:, :, 4:7], time[:, 4:7], condition, 4, False), out)
        host.predict_chunk(host.net, x[:, :, 1:4] + 1, time[:, 1:4], condition, 1, True)  # overwrite
        assert host.kv_cache_checksum(host.net) != two and state.cached_frames == [0, 1, 2, 3]
        host.clear_kv_cache(host.net)
        assert host.kv_cache_checksum(host.net) == 0.0 and state.cached_frames == []
        with pytest.raises(RuntimeError, match="not cached"):
            host.predict_chunk(host.net, x[:, :, 1:4], time[:, 1:4], condition, 1, False)
        for s in range(7):  # fill the 7 frames
            host.predict_chunk(host.net, x[:, :, s:s + 1], time[:, s:s + 1], condition, s, True)
        full = host.kv_cache_checksum(host.net)
        for store in (True, False):
            with pytest.raises(IndexError, match="overflow"):
                host.predict_chunk(host.net, x[:, :, 4:7], time[:, 4:7], condition, 5, store)
        assert host.kv_cache_checksum(host.net) == full
        with pytest.raises(ValueError, match="start_frame"):
            host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, -1, False)
    assert state.call is None


def test_rolling_window_streams_past_max_frames():
    """With ``kv_window`` the absolute frame indices grow past ``max_frames``; older frames (not the sink) go."""
    host = make_host(max_frames=4, kv_window=3, kv_sink=1)
    x, time, condition = inputs(7, host=host)
    with torch.no_grad():
        for s in range(7):
            out = host.predict_chunk(host.net, x[:, :, s:s + 1], time[:, s:s + 1], condition, s, True)
            assert torch.isfinite(out).all()
    assert causal_state(host.net).cached_frames == [0, 4, 5, 6]


def test_remove_restores_the_model():
    host = make_host()
    remove_causal_attention(host.net)
    assert causal_state(host.net) is None and not host.net.rope._forward_hooks
    assert all(type(b.attn1.processor) is WanAttnProcessor for b in host.net.blocks)


def test_cache_detached_and_gradient_flows():
    """A chunk with store_kv under autograd: the stored keys and values are detached; the output has a gradient."""
    host = make_host()
    x, time, condition = inputs(4, host=host)
    host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, 0, True)
    out = host.predict_chunk(host.net, x[:, :, 1:4], time[:, 1:4], condition, 1, True)
    assert out.requires_grad
    for cache in causal_state(host.net).caches.values():
        for frame in cache.cached_frames:
            assert not any(t.requires_grad for t in cache.frame(frame))


# -------------------------------------------------------------------------------- the mask cannot vanish


def test_predict_causal_raises_without_its_layout(monkeypatch):
    host = make_host()
    x, time, condition = inputs(7, host=host)

    def broken(*args, **kwargs):
        raise RuntimeError("no layout today")

    monkeypatch.setattr(distill_mixins.causal.attention, "block_causal_spans", broken)
    with pytest.raises(RuntimeError, match="does not fall back to full attention"), torch.no_grad():
        host.predict_causal(host.net, x, time, condition)
    monkeypatch.setattr(distill_mixins.causal.attention, "block_causal_spans", lambda *a, **k: torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="does not fall back"), torch.no_grad():
        host.predict_causal(host.net, x, time, condition)
    assert causal_state(host.net).call is None


def test_replaced_processor_or_hook_raises():
    """Processors replaced after construction (set_attn_processor) or a removed rope hook: causal calls raise."""
    x, time, condition = inputs(7)
    host = make_host()
    host.net.blocks[1].attn1.set_processor(WanAttnProcessor())
    with pytest.raises(RuntimeError, match="replaced or removed"), torch.no_grad():
        host.predict_causal(host.net, x, time, condition)
    host = make_host()
    host.net.rope._forward_hooks.clear()
    with pytest.raises(RuntimeError, match="replaced or removed"), torch.no_grad():
        host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, 0, False)


def test_mode_restored_on_error():
    host = make_host()
    x, time, condition = inputs(7, host=host)
    with pytest.raises(TypeError), torch.no_grad():
        host.predict_causal(host.net, x, time, "not a condition")
    assert causal_state(host.net).call is None
    plain = tiny_wan(0)
    with torch.no_grad():
        assert torch.equal(host.predict(host.net, x, time, condition),
                           WanVideo2WorldHost(plain, num_conditional_frames=0).predict(plain, x, time, condition))


def test_lazy_install_on_a_network_without_it():
    host = make_host()
    other = tiny_wan(0)
    x, time, condition = inputs(7, host=host)
    with torch.no_grad():
        expected = host.predict_causal(host.net, x, time, condition)
        assert torch.equal(host.predict_causal(other, x, time, condition), expected)
    assert causal_state(other) is not causal_state(host.net)


# ------------------------------------------------------------------------------------------------ copies


class CausalWanKD(KDMixin, CausalWanHost):
    """KD composed onto the causal Wan host: the student and the teacher are deep copies of one network."""


def test_deepcopy_gives_independent_caches():
    host = make_host()
    teacher = host.net
    student = copy.deepcopy(teacher)
    t_state, s_state = causal_state(teacher), causal_state(student)
    assert s_state is not t_state
    assert all(b.attn1.processor.state is s_state for b in student.blocks)
    assert all(b.attn1.processor is not t.attn1.processor for b, t in zip(student.blocks, teacher.blocks, strict=True))
    assert [h.state for h in student.rope._forward_hooks.values()] == [s_state]
    x, time, condition = inputs(7, host=host)
    with torch.no_grad():
        host.predict_chunk(student, x[:, :, :1], time[:, :1], condition, 0, True)
        assert s_state.cached_frames == [0] and t_state.cached_frames == [] and host.kv_cache_checksum(teacher) == 0
        host.predict_chunk(teacher, x[:, :, :1] + 1, time[:, :1], condition, 0, True)
        assert host.kv_cache_checksum(student) != host.kv_cache_checksum(teacher)
        host.clear_kv_cache(teacher)
        assert s_state.cached_frames == [0]
        host.predict_chunk(teacher, x[:, :, :1], time[:, :1], condition, 0, True)
        a = host.predict_chunk(teacher, x[:, :, 1:4], time[:, 1:4], condition, 1, False)
        b = host.predict_chunk(student, x[:, :, 1:4], time[:, 1:4], condition, 1, False)
    assert torch.equal(a, b)  # same weights, same cache contents, separate caches


def test_composed_method_copies_have_own_state():
    model = CausalWanKD(tiny_wan(0), chunk_size=CHUNK, max_frames=MAX_FRAMES, num_conditional_frames=0,
                        distill=KDConfig(student_optimizer=adam()))
    assert isinstance(model, CausalHost)
    check_causal_host_class(CausalWanKD)
    states = {id(causal_state(model.net)), id(causal_state(model.net_teacher))}
    assert len(states) == 2 and None not in (causal_state(model.net), causal_state(model.net_teacher))
    x, time, condition = inputs(7, host=model)
    with torch.no_grad():
        model.predict_chunk(model.net, x[:, :, :1], time[:, :1], condition, 0, True)
        assert causal_state(model.net_teacher).cached_frames == []
        plain = tiny_wan(0)
        assert torch.equal(model.predict(model.net_teacher, x, time, condition),
                           WanVideo2WorldHost(plain, num_conditional_frames=0).predict(plain, x, time, condition))


# --------------------------------------------------------------------------------- activation checkpointing


def _grads(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("checkpointing", ["diffusers", "library"])
def test_checkpointing_recomputes_in_the_same_mode(checkpointing):
    """Gradients under activation checkpointing equal those without: the recomputation (after the host's ``with``
    block ended, and after the cache was cleared) runs block-causal / cached with the forward's context."""
    x, time, condition = inputs(7)
    grads = []
    for enabled in (False, True):
        host = make_host()
        if enabled and checkpointing == "diffusers":
            host.set_gradient_checkpointing(True)
        elif enabled:
            assert apply_activation_checkpointing(host.net.blocks, "full") == len(host.net.blocks)
        loss = host.predict_causal(host.net, x, time, condition).square().mean()
        with torch.no_grad():
            host.predict_chunk(host.net, x[:, :, :1], time[:, :1], condition, 0, True)
        out = host.predict_chunk(host.net, x[:, :, 1:4], time[:, 1:4], condition, 1, True)
        host.clear_kv_cache(host.net)  # the cache changes before backward
        (loss + out.square().mean()).backward()
        grads.append(_grads(host.net))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7), max_diff(grads[0], grads[1])
