"""Draws: per-sample randomness independent of the batch split, shared decisions equal on every rank."""

from __future__ import annotations

import pytest
import torch

from distill_mixins import DMD2Config, DMD2Mixin, OptimizerConfig
from distill_mixins import draws as draws_module
from distill_mixins.config import TimeSamplerConfig
from distill_mixins.draws import DrawContext, Draws, splitmix64
from distill_mixins.testing import MLPDenoiser, ToyHost, mixture_batch, ring_mixture
from distill_mixins.trigflow import sample_time, time_from_variate, time_variate

SHAPE = (2, 2, 1, 1)


def test_a_split_batch_draws_what_the_whole_batch_draws():
    x = torch.zeros(8, *SHAPE)
    whole = Draws(DrawContext(seed=3, iteration=5))
    halves = [Draws(DrawContext(seed=3, iteration=5, first_index=4 * r)) for r in range(2)]
    for _ in range(3):  # the streams of successive draws line up too
        expected = whole.randn_like(x)
        parts = [d.randn_like(x[:4]) for d in halves]
        assert torch.equal(torch.cat(parts), expected)


def uniforms(iteration: int = 0, micro: int = 0, seed: int = 0) -> torch.Tensor:
    return Draws(DrawContext(seed=seed, iteration=iteration, micro=micro)).rand(6)


def test_per_sample_draws_differ_between_samples_micro_batches_iterations_and_seeds():
    t = uniforms()
    assert t.shape == (6,) and t.dtype == torch.float64 and len(set(t.tolist())) == 6
    assert torch.equal(t, uniforms())
    for other in (uniforms(iteration=1), uniforms(micro=1), uniforms(seed=1)):
        assert not torch.equal(t, other)


def test_splitmix64_gives_the_reference_outputs():
    """SplitMix64 seeded with 1234567: the published first outputs (wrapping int64 arithmetic in torch)."""
    golden = 0x9E3779B97F4A7C15
    states = [(1234567 + k * golden) % 2**64 for k in (1, 2, 3)]
    out = splitmix64(torch.tensor([s - 2**64 if s >= 2**63 else s for s in states]))
    assert [v % 2**64 for v in out.tolist()] == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_per_sample_normals_and_uniforms_have_the_right_moments():
    z = Draws(DrawContext(seed=0, iteration=0)).randn_like(torch.zeros(1000, 400, dtype=torch.float64))
    assert abs(float(z.mean())) < 0.005 and abs(float(z.var()) - 1) < 0.01  # 4e5 values: 5 and 3.5 sigma
    assert abs(float((z.abs() < 1).double().mean()) - 0.682689) < 0.004
    assert abs(float((z[:, 0::2] * z[:, 1::2]).mean())) < 0.01  # the cosine and sine halves are uncorrelated
    assert abs(float((z[:-1] * z[1:]).mean())) < 0.01  # neighbouring samples too
    u = Draws(DrawContext(seed=0, iteration=0)).rand(100000)
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and float(((counts - 1e4) ** 2 / 1e4).sum()) < 27.9  # chi2_9
    k = Draws(DrawContext(seed=0, iteration=0)).randint(2, 5, 3000)
    assert set(k.tolist()) == {2, 3, 4} and k.dtype == torch.long


def test_chunking_a_big_draw_does_not_change_it(monkeypatch):
    x = torch.zeros(3, 7, 5)
    whole = Draws(DrawContext(seed=2, iteration=9)).randn_like(x)
    monkeypatch.setattr(draws_module, "_CHUNK", 4)
    assert torch.equal(Draws(DrawContext(seed=2, iteration=9)).randn_like(x), whole)
    assert Draws(DrawContext(seed=2, iteration=9)).randn_like(x[:0]).shape == (0, 7, 5)


def test_shared_decisions_do_not_depend_on_the_rank():
    for it in range(20):
        values = {Draws(DrawContext(seed=1, iteration=it, first_index=8 * r)).shared_randint(1, 5) for r in range(4)}
        assert len(values) == 1
    drawn = {Draws(DrawContext(seed=1, iteration=it)).shared_randint(1, 5) for it in range(200)}
    assert drawn == {1, 2, 3, 4}


def test_bad_contexts_name_the_field():
    with pytest.raises(ValueError, match="DrawContext.first_index"):
        DrawContext(seed=0, iteration=0, first_index=-1)
    with pytest.raises(ValueError, match="DrawContext.seed"):
        DrawContext(seed=True, iteration=0)


class NeuralDMD2(DMD2Mixin, ToyHost):
    """A tiny MLP host with DMD2."""


def make(seed: int = 0) -> NeuralDMD2:
    torch.manual_seed(0)
    adam = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)
    config = DMD2Config(student_schedule="cosmos_4step", student_optimizer=adam, critic_optimizer=adam, seed=seed,
                        student_update_freq=2, draws="per_sample")
    return NeuralDMD2(MLPDenoiser(SHAPE, "rf_velocity", num_labels=2, hidden=16, depth=2), "rf_velocity",
                      distill=config)


@pytest.mark.parametrize("iteration", [0, 1])  # a student phase, a critic phase
def test_the_halves_of_a_batch_on_two_ranks_average_to_the_whole_batch_loss(iteration):
    """A DMD2 step on each half of a batch, as data-parallel ranks 0 and 1 of 2, draws each sample's noise, time and
    (shared) simulated step count as the whole batch does: the two losses average to the whole batch's."""
    batch = mixture_batch(ring_mixture(shape=SHAPE), 8, torch.Generator().manual_seed(0))
    whole = make().training_step(batch, iteration)[1]
    halves = []
    for rank in range(2):
        model = make()
        model.set_data_parallel(rank, 2)
        halves.append(model.training_step({k: v[4 * rank : 4 * rank + 4] for k, v in batch.items()}, iteration)[1])
    assert torch.allclose((halves[0] + halves[1]) / 2, whole, rtol=1e-6, atol=1e-9)


def test_the_method_seed_changes_the_draws_and_the_global_seed_does_not():
    batch = mixture_batch(ring_mixture(shape=SHAPE), 8, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = make(seed=0).training_step(batch, 0)[1]
    torch.manual_seed(2)
    b = make(seed=0).training_step(batch, 0)[1]
    c = make(seed=1).training_step(batch, 0)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_global_draws_are_the_torch_rng_and_per_sample_draws_the_default():
    batch = mixture_batch(ring_mixture(shape=SHAPE), 8, torch.Generator().manual_seed(0))
    model = make()
    model.distill_config.draws = "global"
    torch.manual_seed(5)
    a = model.training_step(batch, 0)[1]
    model = make()
    model.distill_config.draws = "global"
    torch.manual_seed(5)
    assert torch.equal(model.training_step(batch, 0)[1], a)
    from distill_mixins import DistillConfig

    assert DistillConfig().draws == "per_sample"
    with pytest.raises(ValueError, match="DistillConfig.draws='sample'"):
        DistillConfig(draws="sample")


def test_draws_outside_a_step_say_how_to_get_them():
    model = make()
    with pytest.raises(RuntimeError, match="with model.drawing"):
        model.draws.randn_like(torch.zeros(2, *SHAPE))
    with model.drawing(3, 2) as draws:
        assert draws.context.iteration == 3 and model.draws is draws


def test_sample_time_is_its_variates_mapped_and_per_sample_times_follow_the_sampler():
    """sample_time = time_from_variate of torch's own draw (the global stream is unchanged), for every sampler."""
    for kind in ("shifted_uniform", "lognormal", "logit_normal", "uniform"):
        config = TimeSamplerConfig(kind=kind)
        draw = torch.rand if time_variate(config) == "uniform" else torch.randn
        v = draw(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        t = sample_time(5, config, 1.0, generator=torch.Generator().manual_seed(4))
        assert torch.equal(t, time_from_variate(v, config, 1.0))
    config = TimeSamplerConfig(kind="shifted_uniform", shift=1.0)  # RF tau uniform: t = atan(tau / (1 - tau))
    u = Draws(DrawContext(seed=0, iteration=0)).rand(4)
    assert torch.allclose(time_from_variate(u, config, 1.0), torch.atan(u / (1 - u)).clamp(config.t_min, config.t_max))
