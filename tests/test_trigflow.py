"""TrigFlow conversions, time samplers, schedules and Video2World conditioning (MATH.md section 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from distill_mixins import DistillationCoreMixin, DistillConfig, TimeSamplerConfig
from distill_mixins.trigflow import (
    F_to_x0,
    add_noise,
    expand_time,
    native_output_to_x0,
    native_to_trigflow_state,
    native_to_trigflow_time,
    sample_time,
    shifted_rf_schedule,
    student_schedule,
    trigflow_to_native_state,
    trigflow_to_native_time,
    x0_to_F,
    x0_to_native_output,
)

HALF_PI = math.pi / 2
SCALINGS = ("edm", "rectified_flow", "trigflow")
PREDICTIONS = ("x0", "eps", "v", "velocity")
B, SHAPE = 3, (3, 2, 2, 1, 1)

SETTINGS = settings(max_examples=60, deadline=None)

sigma_datas = st.sampled_from([0.5, 1.0]) | st.floats(0.1, 4.0)
# interior times: every conversion is regular there (b > 0 for eps/v/velocity, sigma finite for EDM)
interior_times = arrays(np.float64, (B,), elements=st.floats(1e-3, HALF_PI - 1e-3))
states = arrays(np.float64, SHAPE, elements=st.floats(-10.0, 10.0))


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64))


def assert_close(actual, expected, tol=1e-10):
    """Relative tolerance, with an absolute floor scaled by the largest expected magnitude."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), expected, rtol=tol, atol=tol * scale)


def col(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1, 1, 1, 1)


# ------------------------------------------------------------------ round trips


@SETTINGS
@given(scaling=st.sampled_from(SCALINGS), sigma_data=sigma_datas, t=interior_times)
def test_time_round_trip_from_trigflow(scaling, sigma_data, t):
    t = tensor(t)
    native = trigflow_to_native_time(t, scaling, sigma_data)
    assert native.dtype == torch.float64
    assert_close(native_to_trigflow_time(native, scaling, sigma_data), t)


@SETTINGS
@given(sigma_data=sigma_datas, sigma=st.floats(1e-4, 1e4), tau=st.floats(0.0, 1.0))
def test_time_round_trip_from_native(sigma_data, sigma, tau):
    sigma, tau = torch.tensor([sigma], dtype=torch.float64), torch.tensor([tau], dtype=torch.float64)
    t_edm = native_to_trigflow_time(sigma, "edm", sigma_data)
    assert_close(trigflow_to_native_time(t_edm, "edm", sigma_data), sigma)
    t_rf = native_to_trigflow_time(tau, "rectified_flow", sigma_data)
    assert 0.0 <= float(t_rf) <= HALF_PI
    assert_close(trigflow_to_native_time(t_rf, "rectified_flow", sigma_data), tau)
    assert_close(trigflow_to_native_time(t_rf, "trigflow", sigma_data), t_rf)


@SETTINGS
@given(scaling=st.sampled_from(SCALINGS), sigma_data=sigma_datas, t=interior_times, x_t=states)
def test_state_round_trip(scaling, sigma_data, t, x_t):
    t, x_t = tensor(t), tensor(x_t)
    x = trigflow_to_native_state(x_t, t, scaling, sigma_data)
    assert_close(native_to_trigflow_state(x, t, scaling, sigma_data), x_t)


@SETTINGS
@given(
    scaling=st.sampled_from(SCALINGS), prediction=st.sampled_from(PREDICTIONS), sigma_data=sigma_datas,
    t=interior_times, x=states, y=states,
)
def test_output_round_trips(scaling, prediction, sigma_data, t, x, y):
    t, x, y = tensor(t), tensor(x), tensor(y)
    out = x0_to_native_output(y, x, t, scaling, prediction, sigma_data)  # y read as x0
    assert_close(native_output_to_x0(out, x, t, scaling, prediction, sigma_data), y)
    x0 = native_output_to_x0(y, x, t, scaling, prediction, sigma_data)  # y read as a native output
    assert_close(x0_to_native_output(x0, x, t, scaling, prediction, sigma_data), y)


@SETTINGS
@given(
    scaling=st.sampled_from(SCALINGS), prediction=st.sampled_from(PREDICTIONS), sigma_data=sigma_datas,
    t=interior_times, x0=states, eps=states,
)
def test_native_output_matches_its_definition(scaling, prediction, sigma_data, t, x0, eps):
    """x = a x0 + b eps natively; the output of each prediction type is its textbook target."""
    t, x0, eps = tensor(t), tensor(x0), tensor(eps)
    x = trigflow_to_native_state(add_noise(x0, eps, t, sigma_data), t, scaling, sigma_data)
    sigma = sigma_data * torch.tan(t)
    a, b = {
        "edm": (torch.ones_like(t), sigma),
        "rectified_flow": (1 / (1 + sigma), sigma / (1 + sigma)),
        "trigflow": (torch.cos(t), sigma_data * torch.sin(t)),
    }[scaling]
    assert_close(x, col(a) * x0 + col(b) * eps)
    r = torch.sqrt(a * a + b * b)
    target = {
        "x0": x0, "eps": eps, "velocity": eps - x0, "v": col(a / r) * eps - col(b / r) * x0,
    }[prediction]
    assert_close(x0_to_native_output(x0, x, t, scaling, prediction, sigma_data), target, tol=1e-9)
    assert_close(native_output_to_x0(target, x, t, scaling, prediction, sigma_data), x0, tol=1e-9)


@SETTINGS
@given(sigma_data=sigma_datas, t=interior_times, x0=states, x_t=states)
def test_x0_F_round_trip(sigma_data, t, x0, x_t):
    t, x0, x_t = tensor(t), tensor(x0), tensor(x_t)
    F = x0_to_F(x0, x_t, t, sigma_data)
    assert_close(F_to_x0(F, x_t, t, sigma_data), x0)
    assert_close(x0_to_F(F_to_x0(x0, x_t, t, sigma_data), x_t, t, sigma_data), x0)  # x0 read as F


# ---------------------------------------------------------------- known answers


@SETTINGS
@given(sigma_data=sigma_datas, t=interior_times, x0=states, eps=states)
def test_F_is_the_trigflow_velocity(sigma_data, t, x0, eps):
    """With the true x0, sigma_d F = dx_t/dt = -sin t x0 + cos t z (z = sigma_d eps)."""
    t, x0, eps = tensor(t), tensor(x0), tensor(eps)
    x_t = add_noise(x0, eps, t, sigma_data)
    assert_close(x_t, col(torch.cos(t)) * x0 + col(torch.sin(t)) * sigma_data * eps)
    F = x0_to_F(x0, x_t, t, sigma_data)
    assert_close(sigma_data * F, -col(torch.sin(t)) * x0 + col(torch.cos(t)) * sigma_data * eps, tol=1e-9)


def test_native_times_known_answers():
    t = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.4], dtype=torch.float64)
    for sd in (0.5, 1.0, 2.0):
        assert_close(trigflow_to_native_time(t, "edm", sd), sd * torch.tan(t), tol=1e-14)
        assert_close(trigflow_to_native_time(t, "trigflow", sd), t, tol=0)
    assert_close(trigflow_to_native_time(t, "rectified_flow", 1.0), torch.sin(t) / (torch.sin(t) + torch.cos(t)))
    assert_close(native_to_trigflow_time(torch.tensor([80.0]), "edm", 0.5), [math.atan(160.0)], tol=1e-14)
    assert_close(native_to_trigflow_time(torch.tensor([0.5]), "rectified_flow", 1.0), [math.pi / 4], tol=1e-14)


def test_native_states_known_answers():
    t = torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64)
    x_t = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sd in (0.5, 1.0, 2.0):
        tau = trigflow_to_native_time(t, "rectified_flow", sd)
        assert_close(trigflow_to_native_state(x_t, t, "edm", sd), x_t / col(torch.cos(t)))
        assert_close(trigflow_to_native_state(x_t, t, "rectified_flow", sd), col((1 - tau) / torch.cos(t)) * x_t)
        assert_close(trigflow_to_native_state(x_t, t, "trigflow", sd), x_t, tol=0)


def test_prediction_types_known_answers():
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64)
    x, out = torch.randn(SHAPE, dtype=torch.float64, generator=g), torch.randn(SHAPE, dtype=torch.float64, generator=g)
    for sd in (0.5, 1.0):
        sigma, tau = sd * torch.tan(t), sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t))
        for scaling in SCALINGS:
            assert torch.equal(native_output_to_x0(out, x, t, scaling, "x0", sd), out)
        assert_close(native_output_to_x0(out, x, t, "edm", "eps", sd), x - col(sigma) * out)
        assert_close(native_output_to_x0(out, x, t, "rectified_flow", "velocity", sd), x - col(tau) * out)
    # VP v-prediction on TrigFlow with sigma_d = 1: x0 = cos t x - sin t out
    assert_close(native_output_to_x0(out, x, t, "trigflow", "v", 1.0), col(torch.cos(t)) * x - col(torch.sin(t)) * out)


@pytest.mark.parametrize("sd", [0.5, 1.0, 1.6])
def test_cosmos_edm_preconditioner_cross_check(sd):
    """Cosmos' EDM-in-TrigFlow preconditioner on the normalized state x_t / sd: c_skip = sd cos t,
    c_out = sd sin t, c_in = 1, c_noise = log(sd tan t) / 4. These are Karras' EDM coefficients at
    sigma = sd tan t on the native x = x_t / cos t, and x0 = c_skip x_t/sd - c_out F with the library's
    F: sCM's F is the negative of EDM's raw network output F_theta (x0 = c_skip x + c_out F_theta)."""
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0.05, 0.6, 1.2, 1.55], dtype=torch.float64)
    shape = (4, 2, 2, 1, 1)
    x_t, x0 = torch.randn(shape, dtype=torch.float64, generator=g), torch.randn(shape, dtype=torch.float64, generator=g)
    sigma = trigflow_to_native_time(t, "edm", sd)
    x = trigflow_to_native_state(x_t, t, "edm", sd)
    # Karras et al. 2022, Table 1
    k_skip = sd**2 / (sigma**2 + sd**2)
    k_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
    k_in = 1 / torch.sqrt(sigma**2 + sd**2)
    c_skip, c_out = sd * torch.cos(t), sd * torch.sin(t)
    assert_close(col(k_in) * x, x_t / sd)  # c_in = 1 on the normalized state
    assert_close(col(k_skip) * x, col(c_skip) * x_t / sd)
    assert_close(k_out, c_out)
    assert_close(0.25 * torch.log(sigma), 0.25 * torch.log(sd * torch.tan(t)))
    F = x0_to_F(x0, x_t, t, sd)
    assert_close(col(c_skip) * (x_t / sd) - col(c_out) * F, x0)
    assert_close(col(k_skip) * x + col(k_out) * (-F), x0)  # EDM's F_theta = -F


@pytest.mark.parametrize("sd", [0.5, 1.0, 1.6])
def test_cosmos_rf_preconditioner_cross_check(sd):
    """Cosmos' RF-in-TrigFlow preconditioner: c_skip = c_in = sd / (cos t + sd sin t),
    c_out = -sd sin t / (cos t + sd sin t) = -tau, c_noise = tau; on the normalized state x_t / sd
    the native input is c_in x_t / sd and x0 = c_skip x_t / sd + c_out v for the velocity v."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.05, 0.6, 1.2, HALF_PI], dtype=torch.float64)
    shape = (4, 2, 2, 1, 1)
    x_t, x0 = torch.randn(shape, dtype=torch.float64, generator=g), torch.randn(shape, dtype=torch.float64, generator=g)
    denom = torch.cos(t) + sd * torch.sin(t)
    c_in = c_skip = sd / denom
    c_out = -sd * torch.sin(t) / denom
    tau = trigflow_to_native_time(t, "rectified_flow", sd)
    assert_close(tau, sd * torch.sin(t) / denom)
    assert_close(tau, -c_out)  # c_noise = tau
    x = trigflow_to_native_state(x_t, t, "rectified_flow", sd)
    assert_close(x, col(c_in) * x_t / sd)
    v = x0_to_native_output(x0, x, t, "rectified_flow", "velocity", sd)
    assert_close(col(c_skip) * (x_t / sd) + col(c_out) * v, x0)


@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
def test_rectified_flow_is_finite_at_pure_noise(sd):
    t = torch.full((B,), HALF_PI, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x_t, x0 = torch.randn(SHAPE, dtype=torch.float64, generator=g), torch.randn(SHAPE, dtype=torch.float64, generator=g)
    assert_close(trigflow_to_native_time(t, "rectified_flow", sd), torch.ones(B), tol=1e-15)
    assert native_to_trigflow_time(torch.ones(1, dtype=torch.float64), "rectified_flow", sd).item() == HALF_PI
    x = trigflow_to_native_state(x_t, t, "rectified_flow", sd)
    assert_close(x, x_t / sd, tol=1e-15)
    v = x0_to_native_output(x0, x, t, "rectified_flow", "velocity", sd)
    assert_close(v, x - x0)  # tau = 1: velocity = eps - x0 with x = eps
    assert_close(native_output_to_x0(v, x, t, "rectified_flow", "velocity", sd), x0)
    for prediction in ("x0", "v"):
        out = x0_to_native_output(x0, x, t, "rectified_flow", prediction, sd)
        assert torch.isfinite(out).all()
        assert_close(native_output_to_x0(out, x, t, "rectified_flow", prediction, sd), x0)
    assert_close(x0_to_F(x0, x_t, t, sd), -x0 / sd, tol=1e-9)  # cos(pi/2) = 6e-17, not 0


# -------------------------------------------------------------------- schedules


def test_cosmos_4step_schedule():
    expected = torch.tensor([HALF_PI, math.atan(15), math.atan(5), math.atan(5 / 3)], dtype=torch.float64)
    assert_close(shifted_rf_schedule(4, 5, 1.0), expected, tol=1e-12)
    assert_close(student_schedule("cosmos_4step", "rectified_flow", 1.0, shift=5.0), expected, tol=1e-12)
    # the sigmas [inf, 15, 5, 5/3] hold for any sigma_data; an EDM host's pure noise is clamped to sigma_max
    edm = student_schedule("cosmos_4step", "edm", 0.5, shift=5.0, sigma_max=80.0)
    assert_close(trigflow_to_native_time(edm, "edm", 0.5), [80.0, 15.0, 5.0, 5 / 3], tol=1e-12)


def test_student_schedules():
    assert_close(student_schedule("one_step", "edm", 0.5, sigma_max=80), [math.atan(80 / 0.5)], tol=1e-14)
    assert student_schedule("one_step", "rectified_flow", 1.0).tolist() == [HALF_PI]
    assert student_schedule((1.2, 0.7, 0.3), "rectified_flow", 1.0).tolist() == [1.2, 0.7, 0.3]
    assert student_schedule((1.2, 0.7), "edm", 0.5, sigma_max=80).tolist() == [1.2, 0.7]
    # EDM times above atan(sigma_max / sigma_d) are clamped to it
    assert_close(student_schedule((HALF_PI, 0.5), "edm", 0.5, sigma_max=80), [math.atan(160), 0.5], tol=1e-14)
    with pytest.raises(ValueError, match="'two_step' is not known"):
        student_schedule("two_step", "edm", 0.5)


# ------------------------------------------------------------------ time samplers

N = 200_000


def draw(kind, sd=1.0, seed=0, **kwargs):
    return sample_time(N, TimeSamplerConfig(kind=kind, **kwargs), sd, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_lognormal_sampler_draws_lognormal_sigma(sd):
    log_sigma = torch.log(sd * torch.tan(draw("lognormal", sd, p_mean=-0.4, p_std=1.4)))
    assert abs(log_sigma.mean().item() - (-0.4)) < 0.015  # standard error 0.003
    assert abs(log_sigma.std().item() - 1.4) < 0.01  # standard error 0.002


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_logit_normal_sampler_draws_logit_normal_tau(sd):
    t = draw("logit_normal", sd, p_mean=0.3, p_std=0.8)
    tau = sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t))
    logit = torch.log(tau / (1 - tau))
    assert abs(logit.mean().item() - 0.3) < 0.01  # standard error 0.002
    assert abs(logit.std().item() - 0.8) < 0.006
    # logit(tau) = log(sigma): with one seed and one (p_mean, p_std) the two samplers give the same times
    assert_close(t, draw("lognormal", sd, p_mean=0.3, p_std=0.8), tol=1e-12)


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_shifted_uniform_without_shift_is_uniform_in_tau(sd):
    t = draw("shifted_uniform", sd, shift=1.0)
    tau = trigflow_to_native_time(t, "rectified_flow", sd)
    assert abs(tau.mean().item() - 0.5) < 0.003  # standard error 0.0007
    assert abs(tau.var().item() - 1 / 12) < 0.001  # standard error 0.0002


def test_shifted_uniform_matches_the_analytic_cdf():
    shift = 5.0
    tau = trigflow_to_native_time(draw("shifted_uniform", 1.0, shift=shift), "rectified_flow", 1.0)
    for s in (0.2, 0.5, 0.8, 0.95):
        cdf = s / (shift - (shift - 1) * s)  # P(tau <= s) = P(u <= s / (shift - (shift - 1) s))
        assert abs((tau <= s).double().mean().item() - cdf) < 0.005, s  # standard error <= 0.0011


def test_uniform_sampler_moments():
    t = draw("uniform", t_min=0.2, t_max=1.4)
    assert abs(t.mean().item() - 0.8) < 0.005
    assert abs(t.var().item() - 1.2**2 / 12) < 0.002


@pytest.mark.parametrize("kind", ["shifted_uniform", "lognormal", "logit_normal", "uniform"])
def test_samples_stay_in_range_and_are_reproducible(kind):
    config = dict(t_min=0.3, t_max=1.2, p_std=2.5)
    t = draw(kind, 0.5, seed=7, **config)
    assert t.dtype == torch.float64 and t.shape == (N,)
    assert t.min().item() >= 0.3 and t.max().item() <= 1.2
    assert torch.equal(t, draw(kind, 0.5, seed=7, **config))
    assert not torch.equal(t, draw(kind, 0.5, seed=8, **config))
    if kind != "uniform":
        assert (t == 0.3).any() and (t == 1.2).any()  # the wide distributions are clamped, not rejected


# ------------------------------------------------------------------ expand_time


def test_expand_time_shapes():
    x = torch.zeros(2, 3, 4, 5, 6)
    assert expand_time(torch.tensor([1.0, 2.0]), x).shape == (2, 1, 1, 1, 1)
    per_frame = torch.arange(8.0).reshape(2, 4)
    expanded = expand_time(per_frame, x)
    assert expanded.shape == (2, 1, 4, 1, 1)
    assert torch.equal((expanded + x)[1, 2, :, 3, 4], per_frame[1])
    assert expand_time(torch.tensor(0.5), x).shape == ()
    assert expand_time(torch.ones_like(x), x).shape == x.shape
    with pytest.raises(ValueError, match=r"time of shape \(3,\) does not fit a state of shape \(2, 3, 4, 5, 6\)"):
        expand_time(torch.ones(3), x)
    with pytest.raises(ValueError, match="per-frame"):
        expand_time(torch.ones(2, 5), x)


# ------------------------------------------------------- Video2World conditioning


@dataclass
class FrameCondition:
    gt_frames: torch.Tensor
    frame_mask: torch.Tensor


class HalfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return self.scale * x


class FrameHost(nn.Module):
    """A host whose predict records what it was given."""

    def __init__(self, scaling, prediction_type, sigma_data, per_frame=False):
        super().__init__()
        self.net = HalfNet()
        self.scaling, self.prediction_type, self.sigma_data = scaling, prediction_type, sigma_data
        self.supports_per_frame_time = per_frame
        self.seen = []

    def predict(self, net, x, time, condition):
        self.seen.append((x.detach().clone(), time.clone()))
        return net(x)

    def get_data_and_condition(self, batch):
        return batch["x0"], batch["condition"], None


class FrameDistill(DistillationCoreMixin, FrameHost):
    pass


class PerFrameHost(FrameHost):
    supports_per_frame_time = True  # declared on the class, as hosts usually do

    def __init__(self, scaling, prediction_type, sigma_data):
        super().__init__(scaling, prediction_type, sigma_data, per_frame=True)
        del self.supports_per_frame_time  # only the class attribute remains


class PerFrameDistill(DistillationCoreMixin, PerFrameHost):
    pass


HOSTS = [("edm", "eps", 0.5), ("rectified_flow", "velocity", 1.0), ("trigflow", "v", 1.0)]


def frame_setup():
    g = torch.Generator().manual_seed(5)
    shape = (2, 2, 4, 2, 2)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64).reshape(2, 1, 4, 1, 1)
    gt = torch.randn(shape, dtype=torch.float64, generator=g)
    x_t = torch.randn(shape, dtype=torch.float64, generator=g)
    return FrameCondition(gt, mask), x_t, torch.tensor([0.9, 1.3], dtype=torch.float64)


@pytest.mark.parametrize(("scaling", "prediction", "sd"), HOSTS)
@pytest.mark.parametrize("per_frame", [False, True])
def test_video2world_conditioning(scaling, prediction, sd, per_frame):
    cond_sigma = 2e-3
    model = FrameDistill(scaling, prediction, sd, per_frame, distill=DistillConfig(conditional_sigma=cond_sigma))
    condition, x_t, t = frame_setup()
    given = condition.frame_mask.bool().expand_as(x_t)

    with torch.no_grad():
        out = model.trigflow_denoise(model.net_teacher, x_t, t, condition)
        x_in, time_in = model.seen[-1]
        plain = model.trigflow_denoise(model.net_teacher, x_t, t, None)
        x_plain, time_plain = model.seen[-1]

    # output: ground truth on the given frames, untouched elsewhere; F is consistent with the pasted x0
    assert torch.equal(out.x0[given], condition.gt_frames[given])
    assert torch.equal(out.x0[~given], plain.x0[~given])
    assert_close(F_to_x0(out.F, x_t, t, sd), out.x0)

    # input: a_c * gt on the given frames (a_c = native signal scale at the conditional sigma), x elsewhere
    t_c = math.atan(cond_sigma / sd)
    a_c = {"edm": 1.0, "rectified_flow": 1 / (1 + cond_sigma), "trigflow": math.cos(t_c)}[scaling]
    assert abs(a_c - 1) < 3e-3
    assert_close(x_in[given], a_c * condition.gt_frames[given], tol=1e-12)
    assert torch.equal(x_in[~given], x_plain[~given])

    # time: (B,) without per-frame support; (B, T) with the conditional level on the given frames
    assert time_plain.shape == (2,) and time_in.dtype == torch.float64
    if not per_frame:
        assert torch.equal(time_in, time_plain)
        return
    frame_given = condition.frame_mask[:, 0, :, 0, 0].bool()
    time_c = {"edm": cond_sigma, "rectified_flow": cond_sigma / (1 + cond_sigma), "trigflow": t_c}[scaling]
    assert time_in.shape == (2, 4)
    assert_close(time_in[frame_given], torch.full((3,), time_c, dtype=torch.float64), tol=1e-12)
    assert torch.equal(time_in[~frame_given], time_plain[:, None].expand(2, 4)[~frame_given])


def test_per_frame_time_declared_on_the_host_class():
    model = PerFrameDistill("edm", "eps", 0.5, distill=DistillConfig())
    condition, x_t, t = frame_setup()
    model.trigflow_denoise(model.net_teacher, x_t, t, condition)
    _, time_in = model.seen[-1]
    assert time_in.shape == (2, 4)
    assert_close(time_in[0], [1e-4, *(0.5 * math.tan(0.9),) * 3], tol=1e-12)
