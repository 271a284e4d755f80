"""DDIM: the rectified-flow host's own Euler (flow matching), exact in one step, 1 NFE a step."""

from __future__ import annotations

import math

import pytest
import torch

from distill_mixins import DistillationCoreMixin, DistillConfig
from distill_mixins.data.kd_data import SAMPLER_NAMES
from distill_mixins.sampling import SAMPLERS, sample_ddim, sample_ode_states, time_grid
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, ring_mixture
from distill_mixins.trigflow import native_to_trigflow_state, trigflow_to_native_state, trigflow_to_native_time

MIX = ring_mixture()


class Distill(DistillationCoreMixin, ToyHost):
    pass


def rf_model() -> Distill:
    student = MLPDenoiser(MIX.shape, "rf_velocity", MIX.num_labels, hidden=8, depth=1)
    return Distill(**analytic_host_args(MIX, "rf_velocity"), distill=DistillConfig(student_net=student))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ddim_is_the_flow_matching_euler_of_a_rectified_flow_host():
    """Known answer: x_{tau'} = x_tau + (tau' - tau) v(x_tau, tau) in the host's own time and state, with the
    host's velocity output, equals DDIM in TrigFlow time to 1e-12 (float64) on every step of a 12-step grid."""
    model = rf_model()
    labels = torch.tensor([0, 1, -1, 0])
    noise = torch.randn(4, *MIX.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = time_grid(12, "shifted_rf", 1.0, shift=3.0)
    denoise = model.guided_denoiser(model.net_teacher, labels)
    x_trig = sample_ddim(denoise, noise, ts, sigma_data=1.0)
    taus = trigflow_to_native_time(ts, "rectified_flow", 1.0)
    x = trigflow_to_native_state(noise, ts[0], "rectified_flow", 1.0)  # tau = 1: x = eps
    for tau, tau_next in zip(taus[:-1], taus[1:], strict=True):
        v = model.predict(model.net_teacher, x, tau.expand(4), labels)
        x = x + (tau_next - tau) * v
    assert torch.allclose(x_trig, native_to_trigflow_state(x, ts[-1], "rectified_flow", 1.0), atol=1e-12, rtol=0)


def test_one_ddim_step_is_the_denoiser_and_the_recorded_path_matches():
    model = rf_model()
    labels = torch.tensor([0, 1])
    noise = torch.randn(2, *MIX.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    denoise = model.guided_denoiser(model.net_teacher, labels)
    ts = torch.tensor([math.pi / 2, 0.0], dtype=torch.float64)
    one = sample_ddim(denoise, noise, ts, sigma_data=1.0)
    x0 = denoise(noise * 1.0, torch.full((2,), math.pi / 2, dtype=torch.float64))
    assert torch.equal(one, x0)
    grid = time_grid(8, "shifted_rf", 1.0)
    final, path = sample_ode_states(denoise, noise, grid, sigma_data=1.0, record=(0, 4), sampler="ddim")
    assert torch.equal(final, sample_ddim(denoise, noise, grid, sigma_data=1.0))
    assert torch.equal(path[:, 1], sample_ddim(denoise, noise, grid[:5], sigma_data=1.0))
    assert "ddim" in SAMPLERS and "ddim" in SAMPLER_NAMES


def test_generate_teacher_accepts_ddim_and_counts_one_evaluation_a_step():
    model = rf_model()
    calls = []
    original = model.predict

    def counting_predict(net, x, time, condition):
        calls.append(1)
        return original(net, x, time, condition)

    model.predict = counting_predict
    noise = torch.randn(3, *MIX.shape, dtype=torch.float64)
    out = model.generate_teacher(torch.tensor([0, 1, 0]), noise, steps=36, sampler="ddim")
    assert len(calls) == 36 and torch.isfinite(out).all()
