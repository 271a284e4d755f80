"""distill_mixins.causal: chunks, the block-causal mask, the KV cache and the per-chunk time sampler, with known
answers."""

from __future__ import annotations

import math

import pytest
import torch

from distill_mixins.causal import (
    KVCache,
    block_causal_attention,
    block_causal_mask,
    block_causal_spans,
    chunk_bounds,
    chunk_of_frame,
    chunk_step_indices,
    frame_chunks,
    require_spans,
    step_times,
)
from distill_mixins.draws import DrawContext, Draws
from distill_mixins.trigflow import student_schedule

# ------------------------------------------------------------------------------------------------------ chunks


@pytest.mark.parametrize(
    "frames, chunk, expected",
    [(7, 3, [(0, 1), (1, 4), (4, 7)]), (8, 3, [(0, 2), (2, 5), (5, 8)]), (6, 3, [(0, 3), (3, 6)]),
     (21, 3, [(s, s + 3) for s in range(0, 21, 3)]), (2, 3, [(0, 2)]), (5, 1, [(i, i + 1) for i in range(5)])],
)
def test_chunk_bounds_remainder_first(frames, chunk, expected):
    assert chunk_bounds(frames, chunk) == expected
    ids = frame_chunks(frames, chunk)
    assert ids.tolist() == [i for i, (s, e) in enumerate(expected) for _ in range(e - s)]
    assert all(chunk_of_frame(f, frames, chunk) == expected[ids[f]] for f in range(frames))


@pytest.mark.parametrize("frames, chunk", [(0, 3), (7, 0), (7, -1), (7, True), (7.0, 3)])
def test_chunk_bounds_errors(frames, chunk):
    with pytest.raises(ValueError, match="frames|chunk_size"):
        chunk_bounds(frames, chunk)


# -------------------------------------------------------------------------------------------------------- mask


def test_block_causal_mask_known_answer():
    """T = 7, chunk 3 (chunks {0}, {1, 2, 3}, {4, 5, 6}), 2 tokens a frame."""
    mask = block_causal_mask(7, 3, tokens_per_frame=2)
    assert mask.shape == (14, 14) and mask.dtype == torch.bool
    chunk = [0, 1, 1, 1, 2, 2, 2]
    for i in range(14):
        for j in range(14):
            assert bool(mask[i, j]) == (chunk[j // 2] <= chunk[i // 2]), (i, j)


# ---------------------------------------------------------------------------------------------------- KV cache


def _kv(frames: int, value: float, tpf: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.full((1, 2, frames * tpf, 4), value, requires_grad=True)
    return k, -k


def test_cache_store_context_and_overwrite():
    cache = KVCache(max_frames=6, tokens_per_frame=2)
    assert cache.context(0) is None
    cache.store(0, *_kv(1, 1.0))
    cache.store(1, *_kv(3, 2.0))
    k, v = cache.context(4)
    assert k.shape == (1, 2, 8, 4) and not k.requires_grad  # detached
    assert k[:, :, :2].eq(1).all() and k[:, :, 2:].eq(2).all() and torch.equal(v, -k)
    assert cache.context(1)[0].shape[2] == 2  # a chunk at frame 1 sees frame 0 only
    before = cache.checksum()
    cache.store(1, *_kv(3, 2.0))  # the same chunk again: idempotent
    assert cache.checksum() == before
    cache.store(1, *_kv(3, 3.0))  # overwrite
    assert cache.checksum() != before and cache.context(4)[0][:, :, 2:].eq(3).all()
    cache.clear()
    assert cache.cached_frames == [] and cache.checksum() == 0.0


def test_cache_buffer_grows_keeps_frames_and_reads_the_prefix_without_a_copy():
    """Without a window the cache is one buffer grown by doubling: frames stored before a growth keep their values,
    a context is a view of the buffer (no copy), a store copies (later edits of the caller's tensor do not leak in),
    another batch needs a clear first."""
    cache = KVCache(max_frames=8, tokens_per_frame=2)
    for frame in range(7):  # capacity 1 -> 2 -> 4 -> 8 frames
        k, v = _kv(1, float(frame + 1))
        cache.store(frame, k, v)
        with torch.no_grad():
            k.fill_(-99.0)  # the cache holds a copy
    k, v = cache.context(7)
    assert torch.equal(k[0, 0, :, 0], torch.arange(1, 8).float().repeat_interleave(2)) and torch.equal(v, -k)
    held = cache.frame(6)[0]
    assert k.untyped_storage().data_ptr() == held.untyped_storage().data_ptr()  # a view of the buffer
    with pytest.raises(KeyError, match="frame 7 is not cached"):
        cache.frame(7)
    with pytest.raises(ValueError, match="another batch"):
        cache.store(0, torch.zeros(2, 2, 2, 4), torch.zeros(2, 2, 2, 4))
    cache.clear()
    cache.store(0, torch.ones(2, 2, 2, 4), torch.ones(2, 2, 2, 4))  # after a clear: the new batch
    assert cache.context(1)[0].shape == (2, 2, 2, 4)


def test_cache_errors():
    cache = KVCache(max_frames=4, tokens_per_frame=2)
    with pytest.raises(RuntimeError, match="frames 0..2, which are not cached"):
        cache.context(3)
    with pytest.raises(IndexError, match="overflow the cache of 4 frames"):
        cache.store(2, *_kv(3, 1.0))
    with pytest.raises(IndexError, match="overflow"):
        cache.context(5)
    with pytest.raises(ValueError, match="whole frames"):
        cache.store(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="window"):
        KVCache(4, 2, window=0)


def test_rolling_window_with_a_sink():
    """window 3 and sink 1: a chunk at frame f sees frame 0 and frames f-3 .. f-1; indices pass max_frames."""
    cache = KVCache(max_frames=4, tokens_per_frame=1, window=3, sink=1)
    for frame in range(10):
        cache.store(frame, *_kv(1, float(frame), tpf=1))
        assert len(cache.cached_frames) <= 4
    assert cache.context_frames(10) == [0, 7, 8, 9]
    k, _ = cache.context(10)
    assert k[0, 0, :, 0].tolist() == [0.0, 7.0, 8.0, 9.0]
    assert cache.cached_frames == [0, 7, 8, 9]


# ------------------------------------------------------------------------------------------------ time sampler


def _draws(iteration: int, per_sample: bool = True) -> Draws:
    return Draws(DrawContext(seed=3, iteration=iteration, per_sample=per_sample))


@pytest.mark.parametrize("per_sample", [True, False])
def test_chunk_step_indices_shape_and_chunks(per_sample):
    torch.manual_seed(0)
    k = chunk_step_indices(_draws(0, per_sample), 64, 7, 3, 4, device="cpu")
    assert k.shape == (64, 7) and k.dtype == torch.long
    assert k.min() >= 0 and k.max() <= 4
    assert torch.equal(k[:, 1], k[:, 2]) and torch.equal(k[:, 1], k[:, 3]) and torch.equal(k[:, 4], k[:, 6])
    assert not torch.equal(k[:, 0], k[:, 1])  # chunks draw independently
    times = step_times(k, student_schedule("cosmos_4step", "rectified_flow", 1.0), dtype=torch.float32, device="cpu")
    assert times.dtype == torch.float32 and times.shape == (64, 7)
    grid = torch.cat([student_schedule("cosmos_4step", "rectified_flow", 1.0), torch.zeros(1, dtype=torch.float64)])
    assert torch.equal(times, grid[k].float())
    assert (times == 0).any()  # index K is clean


def test_chunk_step_indices_are_uniform():
    """Chi-square over 4,096 samples x 3 chunks on 0..4 (5 bins): below the 0.999 quantile (18.47, 4 dof)."""
    k = chunk_step_indices(_draws(7), 4096, 8, 3, 4)[:, [0, 2, 5]]
    counts = torch.bincount(k.flatten(), minlength=5).double()
    expected = k.numel() / 5
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, (counts.tolist(), chi2)
    assert all(c > 0 for c in counts)


def test_chunk_step_indices_are_split_invariant():
    """Sample i's indices depend on its global index only: a rank holding samples 4..7 draws what one process
    drew for them."""
    whole = chunk_step_indices(Draws(DrawContext(seed=3, iteration=5)), 8, 8, 3, 4)
    part = chunk_step_indices(Draws(DrawContext(seed=3, iteration=5, first_index=4)), 4, 8, 3, 4)
    assert torch.equal(whole[4:], part)


def test_step_times_errors():
    with pytest.raises(ValueError, match="0..4"):
        step_times(torch.tensor([[5]]), torch.tensor([1.0, 0.9, 0.8, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps"):
        chunk_step_indices(_draws(0), 2, 8, 3, 0)
    assert math.isclose(float(step_times(torch.tensor([[0]]), torch.tensor([1.5]))), 1.5)


# ------------------------------------------------------------------------------------ chunk-wise attention


def test_block_causal_spans_known_answer():
    spans = block_causal_spans(7, 3, tokens_per_frame=4)
    assert spans.spans == ((0, 4), (4, 16), (16, 28)) and spans.tokens == 28
    assert require_spans(7, 3, 4) == spans


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_chunk_wise_attention_equals_the_masked_attention(layout):
    """Each chunk's queries over the key prefix to its end == one SDPA call with the block-causal mask (float64)."""
    g = torch.Generator().manual_seed(0)
    frames, tpf = 8, 3
    shape = (2, 4, frames * tpf, 8) if layout == "bhsd" else (2, frames * tpf, 4, 8)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    out = block_causal_attention(q, k, v, block_causal_spans(frames, 3, tpf), layout=layout)
    qh, kh, vh = (t if layout == "bhsd" else t.transpose(1, 2) for t in (q, k, v))
    masked = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=block_causal_mask(frames, 3, tpf))
    expected = masked if layout == "bhsd" else masked.transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    full = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    assert (out - (full if layout == "bhsd" else full.transpose(1, 2))).abs().max() > 1e-3  # not full attention


def test_the_layout_cannot_silently_disappear(monkeypatch):
    import distill_mixins.causal.attention as layout_module

    def broken(*args, **kwargs):
        raise ImportError("no layout machinery")

    monkeypatch.setattr(layout_module, "block_causal_spans", broken)
    with pytest.raises(RuntimeError, match="could not be built.*does not fall back to full attention"):
        require_spans(7, 3, 2)
    monkeypatch.setattr(layout_module, "block_causal_spans", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="not chunks covering 14 tokens; a causal forward does not fall back"):
        require_spans(7, 3, 2)
    with pytest.raises(ValueError, match="layout 14"):
        block_causal_attention(*(torch.zeros(1, 1, 12, 2) for _ in range(3)), block_causal_spans(7, 3, 2))
