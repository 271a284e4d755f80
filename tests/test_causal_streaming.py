"""stream_causal: the call sequence of chunk-by-chunk sampling, and a known answer (a frame-wise denoiser streams
exactly what the few-step student sampler gives on the whole clip)."""

from __future__ import annotations

import math

import pytest
import torch

from distill_mixins.causal import stream_causal
from distill_mixins.sampling import sample_student
from distill_mixins.trigflow import student_schedule

TS = student_schedule("cosmos_4step", "rectified_flow", 1.0)


def framewise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A denoiser acting on each frame alone (no attention across frames): x0 = 0.3 cos(t) x_t + 0.1."""
    return 0.3 * torch.cos(t)[:, None, :, None, None] * x_t + 0.1


@pytest.mark.parametrize("renoise", ["ode", "initial"])
def test_a_framewise_denoiser_streams_the_student_samplers_clip(renoise):
    noise = torch.randn(2, 3, 7, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoise_chunk(x_t, t, start, store_kv):
        return framewise(x_t, t)

    chunks = list(stream_causal(denoise_chunk, noise, TS, chunk_size=3, sigma_data=1.0, renoise=renoise))
    assert [(c.start, c.end) for c in chunks] == [(0, 1), (1, 4), (4, 7)]
    streamed = torch.cat([c.x0 for c in chunks], dim=2)

    def denoise_clip(x_t, t):
        return framewise(x_t, t[:, None].expand(x_t.shape[0], x_t.shape[2]))

    whole = sample_student(denoise_clip, noise, TS, sigma_data=1.0, renoise=renoise)
    torch.testing.assert_close(streamed, whole, atol=1e-12, rtol=0)


def test_call_sequence_and_cache_refresh():
    """Per chunk: the K steps without storing, then one store of the finished chunk at time 0 (or at the
    context time, re-noised with the generator's noise)."""
    noise = torch.randn(1, 2, 5, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for context_time in (0.0, 0.2):
        calls = []

        def denoise_chunk(x_t, t, start, store_kv, calls=calls):
            calls.append((start, x_t.shape[2], float(t[0, 0]), store_kv, x_t.clone()))
            return torch.full_like(x_t, 0.5)

        generator = torch.Generator().manual_seed(3)
        list(stream_causal(denoise_chunk, noise, TS, chunk_size=2, sigma_data=1.0, generator=generator,
                           renoise="ode", context_time=context_time))
        expected = []
        for start, n in ((0, 1), (1, 2), (3, 2)):
            expected += [(start, n, float(t), False) for t in TS] + [(start, n, context_time, True)]
        assert [c[:4] for c in calls] == expected
        stores = [c[4] for c in calls if c[3]]
        if context_time == 0:
            assert all(torch.equal(s, torch.full_like(s, 0.5)) for s in stores)  # the clean chunk
        else:
            g = torch.Generator().manual_seed(3)  # "ode" re-noising draws nothing: only the context noise
            for s in stores:
                eps = torch.randn(s.shape, dtype=s.dtype, generator=g)
                expected_state = math.cos(0.2) * 0.5 + math.sin(0.2) * eps
                torch.testing.assert_close(s, expected_state, atol=1e-12, rtol=0)


def test_unknown_renoise_raises():
    with pytest.raises(ValueError, match="renoise"):
        list(stream_causal(lambda *a: a[0], torch.zeros(1, 1, 3, 1, 1), TS, chunk_size=3, sigma_data=1.0,
                           renoise="nope"))
