"""The exact Gaussian-mixture teacher in each native form, and the teacher ODE sampler."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distill_mixins import DistillationCoreMixin, DistillConfig
from distill_mixins.eval import sliced_wasserstein2
from distill_mixins.testing import GaussianMixture, MLPDenoiser, ToyHost, analytic_host_args, ring_mixture

FORMS = ("edm_eps", "edm_x0", "rf_velocity")
MIX = ring_mixture()
B = 4


class Distill(DistillationCoreMixin, ToyHost):
    pass


@functools.cache
def analytic_model(form: str, sigma_data: float | None = None) -> Distill:
    student = MLPDenoiser(MIX.shape, form, MIX.num_labels, hidden=16, depth=1)
    return Distill(**analytic_host_args(MIX, form, sigma_data), distill=DistillConfig(student_net=student))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------- one teacher, three forms


@settings(max_examples=60, deadline=None)
@given(
    sigma_data=st.sampled_from([0.5, 1.0, 1.7]),
    t=arrays(np.float64, (B,), elements=st.floats(1e-3, math.pi / 2 - 1e-3)),
    x_t=arrays(np.float64, (B, *MIX.shape), elements=st.floats(-3.0, 3.0)),
    labels=st.lists(st.sampled_from([-1, 0, 1]), min_size=B, max_size=B),
)
def test_native_forms_agree_on_the_trigflow_x0(sigma_data, t, x_t, labels):
    """Each form's native output, converted back by the mixin, is the one posterior mean E[x0 | x_t]."""
    t, x_t, labels = torch.from_numpy(t), torch.from_numpy(x_t), torch.tensor(labels)
    exact = MIX.posterior_mean(x_t, torch.cos(t), sigma_data * torch.sin(t), labels)
    for form in FORMS:
        model = analytic_model(form, sigma_data)
        x0 = model.trigflow_denoise(model.net_teacher, x_t, t, labels).x0
        assert x0.dtype == torch.float64
        torch.testing.assert_close(x0, exact, rtol=1e-8, atol=1e-8, msg=form)


# ------------------------------------------------------------- posterior mean


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float64, (B,), elements=st.floats(0.0, 2.0)),
    b=arrays(np.float64, (B,), elements=st.floats(0.01, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_single_gaussian_posterior_mean(a, b, seed):
    g = torch.Generator().manual_seed(seed)
    mu, s = torch.randn(1, 4, dtype=torch.float64, generator=g), 0.3
    gaussian = GaussianMixture(mu, torch.tensor([s], dtype=torch.float64), torch.ones(1), (4, 1, 1, 1))
    x = torch.randn(B, 4, 1, 1, 1, dtype=torch.float64, generator=g)
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    gain = (a * s**2 / (a**2 * s**2 + b**2)).reshape(B, 1, 1, 1, 1)
    expected = mu.reshape(1, 4, 1, 1, 1) + gain * (x - a.reshape(B, 1, 1, 1, 1) * mu.reshape(1, 4, 1, 1, 1))
    posterior = gaussian.posterior_mean(x, a, b, torch.zeros(B, dtype=torch.long))
    torch.testing.assert_close(posterior, expected, rtol=1e-12, atol=1e-12)


def test_posterior_mean_limits():
    """a = 0 (no signal): the label's prior mean; b = 0 (no noise): x / a."""
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 3.0], [1.0, 1.0]], dtype=torch.float64)  # label 0: 1/4, 3/4; label 1: 1/2, 1/2
    mix = GaussianMixture(means, torch.tensor([0.2, 0.5]), weights, (2, 1, 1, 1))
    labels = torch.tensor([0, 1, -1])
    x = torch.randn(3, 2, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prior = mix.posterior_mean(x, torch.zeros(3), torch.ones(3), labels).reshape(3, 2)
    expected = torch.tensor([[0.25, 1.5], [0.5, 1.0], [0.375, 1.25]], dtype=torch.float64)  # -1: weights 3/8, 5/8
    torch.testing.assert_close(prior, expected, rtol=1e-14, atol=1e-14)
    a = torch.tensor([1.0, 0.5, 2.0])
    torch.testing.assert_close(mix.posterior_mean(x, a, torch.zeros(3), labels), x / a.reshape(3, 1, 1, 1, 1))


# ------------------------------------------------------------------------ CFG


def test_guided_denoiser_uses_the_standard_cfg_form():
    model = analytic_model("edm_eps")
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(6, *MIX.shape, dtype=torch.float64, generator=g)
    t = torch.linspace(0.2, 1.4, 6, dtype=torch.float64)
    cond, uncond = torch.tensor([0, 1, 0, 1, 0, 1]), torch.full((6,), -1)
    x0_c = model.trigflow_denoise(model.net_teacher, x_t, t, cond).x0
    x0_u = model.trigflow_denoise(model.net_teacher, x_t, t, uncond).x0
    assert not torch.allclose(x0_c, x0_u)  # the labels matter, so the checks below can fail

    def guided(w, uncondition=uncond):
        return model.guided_denoiser(model.net_teacher, cond, uncondition, w)(x_t, t)

    assert torch.equal(guided(1.0), x0_c)
    assert torch.equal(guided(1.0, uncondition=None), x0_c)  # w = 1 never needs the uncondition
    torch.testing.assert_close(guided(0.0), x0_u, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(guided(3.0), x0_u + 3.0 * (x0_c - x0_u), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="needs an uncondition"):
        guided(3.0, uncondition=None)


# ------------------------------------------------ teacher ODE sampler vs exact samples

N, R = 4096, 8
LABELS = torch.arange(N) % 3 - 1  # unconditional, label 0, label 1


def sw2(a, b, replicate):
    return sliced_wasserstein2(a, b, generator=torch.Generator().manual_seed(4000 + replicate))


def exact(seed):
    return MIX.sample(LABELS, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def references():
    """Per replicate: an exact reference set, and the noise floor SW2(independent exact set, reference)."""
    refs = [exact(1000 + r) for r in range(R)]
    floor = [sw2(exact(2000 + r), refs[r], r) for r in range(R)]
    return refs, sum(floor) / R


def mean_teacher_sw2(form, refs, **sampler):
    model = analytic_model(form)
    total = 0.0
    for r in range(R):
        noise = torch.randn(N, *MIX.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3000 + r))
        total += sw2(model.generate_teacher(LABELS, noise, **sampler), refs[r], r)
    return total / R


@pytest.mark.parametrize("form", FORMS)
def test_teacher_ode_samples_match_the_mixture(form, references):
    """Unguided (w = 1) 36-step Heun samples are as close to exact samples as exact samples are
    to each other (SW2 averaged over R replicates: one pair is dominated by mode-mass noise)."""
    refs, floor = references
    teacher = mean_teacher_sw2(form, refs, steps=36, sampler="heun")
    bad = mean_teacher_sw2(form, refs, steps=1, sampler="euler")
    print(f"\n{form}: mean SW2 over {R}x{N}: teacher {teacher:.4f}, exact floor {floor:.4f}, "
          f"ratio {teacher / floor:.2f}; 1-step Euler {bad:.4f} (ratio {bad / floor:.1f})")
    assert teacher <= 1.5 * floor
    assert bad > 3.0 * floor  # a sampler that is clearly wrong fails the same check by a wide margin
