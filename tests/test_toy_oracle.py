"""The toy domain's exact denoiser (distill_mixins.toy.oracle): known answers."""

from __future__ import annotations

import pytest
import torch

from distill_mixins.eval.motion import prompt_adherence, speed_errors
from distill_mixins.toy.clips import DIRECTIONS, SPEEDS, make_clips
from distill_mixins.toy.host import ToyVideo2World
from distill_mixins.toy.oracle import exact_x0, future_weights, futures


def test_futures_hold_the_real_clip_and_every_speed():
    clips = make_clips(6, seed=3)
    latent = ToyVideo2World.encode(clips.video)
    cond, uncond = futures(clips.specs), futures(clips.specs, conditional=False)
    assert cond.shape == (6, len(SPEEDS), *latent.shape[1:])
    assert uncond.shape == (6, len(SPEEDS) * len(DIRECTIONS), *latent.shape[1:])
    for n, spec in enumerate(clips.specs):
        assert torch.equal(cond[n, SPEEDS.index(spec.speed)], latent[n])  # the clip itself is one future
        assert torch.equal(cond[n, :, :, 0], latent[n, None, :, 0].expand_as(cond[n, :, :, 0]))  # the given frame
    directions = list(DIRECTIONS)
    for n, spec in enumerate(clips.specs):  # the prompt's direction is among the unconditional futures
        k = directions.index(spec.direction) * len(SPEEDS)
        assert torch.equal(uncond[n, k : k + len(SPEEDS)], cond[n])


def test_exact_x0_known_answers():
    clips = make_clips(4, seed=5)
    c = futures(clips.specs).double()  # (4, 2, 3, T, H, W)
    tau = torch.full((4,), 0.3, dtype=torch.float64)
    eps = torch.randn(c[:, 0].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    near = (1 - 0.3) * c[:, 1] + 0.01 * eps  # next to future 1 (tiny noise): the posterior is sure
    torch.testing.assert_close(exact_x0(near, tau, c), c[:, 1], atol=1e-12, rtol=0)
    halfway = (1 - 0.3) * 0.5 * (c[:, 0] + c[:, 1])  # equally far from both: their mean, exactly
    torch.testing.assert_close(exact_x0(halfway, tau, c), 0.5 * (c[:, 0] + c[:, 1]), atol=1e-12, rtol=0)
    pure_noise = exact_x0(eps, torch.ones(4, dtype=torch.float64), c)  # tau = 1: x carries no information
    torch.testing.assert_close(pure_noise, c.mean(dim=1), atol=1e-12, rtol=0)


def test_future_weights_known_answers():
    clips = make_clips(4, seed=5)
    cand = futures(clips.specs)  # (4, 2, C, T, H, W)
    w = torch.tensor([[0.0, 0.2, 0.5, 0.7, 1.0, 0.3, 0.9], [1.0] * 7, [0.0] * 7, [0.25] * 7], dtype=torch.float64)
    wb = w[:, None, :, None, None]
    x0 = cand[:, 1].double().clone()
    x0[:, :, 1:] = wb * cand[:, 0, :, 1:].double() + (1 - wb) * cand[:, 1, :, 1:].double()
    assert torch.allclose(future_weights(x0, cand), w, atol=1e-12)  # per frame, exactly the mixing weight
    exact = exact_x0(x0.float(), torch.full((4,), 0.5), cand).double()  # the exact denoiser weighs whole futures
    assert float(future_weights(exact, cand).std(dim=1).max()) < 1e-6
    with pytest.raises(ValueError, match="two speeds"):
        future_weights(x0, futures(clips.specs, conditional=False))


def test_exact_x0_rejects_mismatched_inputs():
    c = futures(make_clips(2, seed=0).specs)
    with pytest.raises(ValueError, match="futures"):
        exact_x0(torch.zeros(3, *c.shape[2:]), torch.ones(3), c)
    with pytest.raises(ValueError, match="tau"):
        exact_x0(torch.zeros(2, *c.shape[2:]), torch.zeros(2), c)
    with pytest.raises(ValueError, match="ClipSpec"):
        futures([])


def test_exact_denoiser_ode_follows_the_prompt():
    """DDIM on the exact conditional denoiser lands on one of the condition's futures: adherence 1."""
    clips = make_clips(16, seed=11)
    c = futures(clips.specs).double()
    first = c[:, 0, :, :1]
    x = torch.randn(c[:, 0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = torch.linspace(1.0, 0.0, 37, dtype=torch.float64)
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        x[:, :, :1] = (1 - t) * first  # the given frame, noised like the rest (its posterior term is 0 anyway)
        x0 = exact_x0(x, torch.full((16,), t, dtype=torch.float64), c)
        x = x0 if s == 0 else (1 - s) * x0 + s * (x - (1 - t) * x0) / t
    distance = (x[:, None] - c).flatten(2).abs().amax(-1).min(dim=1).values
    assert float(distance.max()) < 1e-6
    assert prompt_adherence(ToyVideo2World.decode(x.float()), clips.prompts) == 1.0


def test_speed_errors_pick_each_futures_own_speed():
    clips = make_clips(8, seed=2)
    c = ToyVideo2World.decode(futures(clips.specs))  # (8, 2, 3, T, H, W) RGB
    for k in range(len(SPEEDS)):
        errors = speed_errors(c[:, k], clips.prompts, [*SPEEDS, 2.5])  # (3, 8)
        assert errors.shape == (3, 8)
        assert float(errors[k].max()) < 0.5  # its own speed fits within half a pixel
        assert bool((errors[k] < errors[2]).all())  # better than the speed between the two
