"""SCMMixin: known answers in float64 (the closed-form consistency function of a Gaussian teacher), the JVP through
attention (a tiny DiT, a tiny diffusers Wan host), the finite-difference fallback, the time sampler, normalisation,
NaN dropping, warm-up, adaptive weighting, config errors and the consistency sampler.

Single-Gaussian teacher, data N(mu, s^2 I), TrigFlow ``x_t = cos t x0 + sin t sigma_d eps``: the marginal of x_t is
N(cos t mu, v(t) I) with ``v(t) = cos^2 t s^2 + sin^2 t sigma_d^2``, and its probability-flow ODE, being linear,
keeps the standardised state ``z = (x_t - cos t mu) / sqrt(v(t))`` fixed. So a trajectory is
``x(t) = cos t mu + sqrt(v(t)) z`` and the consistency function (the x0 of the trajectory through x_t) is

    f(x_t, t) = mu + s (x_t - cos t mu) / sqrt(v(t)).

Along the ODE the teacher's velocity is ``F_T = x'(t) / sigma_d``, so its derivative is ``x''(t) / sigma_d`` with
``x'' = -cos t mu + (v'' / (2 sqrt v) - v'^2 / (4 v^1.5)) z``, ``v' = sin 2t (sigma_d^2 - s^2)``,
``v'' = 2 cos 2t (sigma_d^2 - s^2)``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F_nn
from loguru import logger
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill_mixins import OptimizerConfig, SCMConfig, SCMMixin
from distill_mixins.methods.scm import (
    adaptive_weighted,
    consistency_times,
    normalize_tangent,
    scm_distance,
    scm_tangent,
    velocity_central_difference,
    velocity_jvp,
    warmup_ratio,
)
from distill_mixins.sampling import guided_x0, ode_step
from distill_mixins.testing import (
    GaussianMixture,
    MLPDenoiser,
    TinyVideoDiT,
    ToyHost,
    analytic_host_args,
    mixture_batch,
    ring_mixture,
)
from distill_mixins.testing.hosts import FORMS
from distill_mixins.trigflow import add_noise, native_to_trigflow_state, native_to_trigflow_time, x0_to_native_output
from tests.conftest import param_hash

torch.set_num_threads(1)

SHAPE = (2, 2, 1, 1)
S = 0.3  # the Gaussian teacher's data std


class ToySCM(SCMMixin, ToyHost):
    """sCM on a toy host."""


def adam(lr: float = 1e-3) -> OptimizerConfig:
    return OptimizerConfig(name="adam", lr=lr, weight_decay=0.0)


def gaussian() -> GaussianMixture:
    mu = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return GaussianMixture(mu, torch.tensor([S], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), SHAPE)


def consistency_function(mu: torch.Tensor, s: torch.Tensor | float, x_t: torch.Tensor, t: torch.Tensor,
                         sigma_data: float) -> torch.Tensor:
    """``f(x_t, t) = mu + s (x_t - cos t mu) / sqrt(cos^2 t s^2 + sin^2 t sigma_d^2)`` (module docstring)."""
    te = t.reshape(-1, 1, 1, 1, 1)
    v = torch.cos(te) ** 2 * s**2 + torch.sin(te) ** 2 * sigma_data**2
    return mu + s * (x_t - torch.cos(te) * mu) / torch.sqrt(v)


class ConsistencyNet(nn.Module):
    """The exact consistency function of the Gaussian teacher in a native form; ``log s`` is a parameter, so the sCM
    loss has something to differentiate."""

    def __init__(self, mixture: GaussianMixture, form: str, sigma_data: float) -> None:
        super().__init__()
        self.mu = mixture.means[0].reshape(1, *SHAPE)
        self.log_s = nn.Parameter(torch.tensor(math.log(float(mixture.stds[0])), dtype=torch.float64))
        self.scaling, self.prediction_type = FORMS[form]
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, time: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = native_to_trigflow_time(time, self.scaling, self.sigma_data)
        x_t = native_to_trigflow_state(x, t, self.scaling, self.sigma_data)
        f = consistency_function(self.mu, self.log_s.exp(), x_t, t, self.sigma_data)
        return x0_to_native_output(f, x, t, self.scaling, self.prediction_type, self.sigma_data)


class TrainableDenoiser(nn.Module):
    """The Gaussian teacher's own denoiser (a one-step x0 predictor, not a consistency function), with a parameter."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.gain = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, time, labels):
        return self.gain * self.teacher(x, time, labels)


def gaussian_model(form: str, student: str, **config) -> ToySCM:
    mixture = gaussian()
    host = analytic_host_args(mixture, form)
    sd = 0.5 if form.startswith("edm") else 1.0
    net = ConsistencyNet(mixture, form, sd) if student == "consistency" else TrainableDenoiser(host["net"])
    config = {"student_net": net, "guidance_scale": 1.0, "tangent_warmup": 0, "student_optimizer": adam(), **config}
    return ToySCM(**host, distill=SCMConfig(**config)).double()


def states(n: int = 8, t_max: float = 1.5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, dtype=torch.float64, generator=g), torch.linspace(0.05, t_max, n, dtype=torch.float64)


def tangent_of(model: ToySCM, x_t: torch.Tensor, t: torch.Tensor, r: float = 1.0):
    labels = torch.zeros(x_t.shape[0], dtype=torch.long)
    data = model.prepare_data({"x0": x_t, "label": labels})
    dxdt = model.teacher_velocity(data, x_t, t)
    F_minus, dF = velocity_jvp(model.student_velocity(data), x_t, t, dxdt)
    g = scm_tangent(F_minus, dF, dxdt, x_t, t, model.sigma_data, r)
    cos, sin = torch.cos(t).reshape(-1, 1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1, 1)
    scale = (cos**2 * (model.sigma_data * F_minus - dxdt)).norm() + (cos * sin * x_t).norm()
    return g, scale + model.sigma_data * dF.norm()


# ------------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("form", ["rf_velocity", "edm_eps"])
def test_the_closed_form_consistency_function_is_the_teachers_ode_endpoint(form):
    model = gaussian_model(form, "consistency")
    x_t, t = states(4, t_max=1.4)
    mu = model.net_teacher.mixture.means[0].reshape(1, *SHAPE)
    f = consistency_function(mu, S, x_t, t, model.sigma_data)
    denoise = model.guided_denoiser(model.net_teacher, torch.zeros(1, dtype=torch.long))
    for i in range(4):  # 400 Heun steps from t_i down to 0 on the exact teacher (its last step is Euler: ~1e-5)
        grid = torch.linspace(float(t[i]), 0.0, 401, dtype=torch.float64).tolist()
        x = x_t[i : i + 1]
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            x = ode_step(denoise, x, a, b, "heun", sigma_data=model.sigma_data)
        assert torch.allclose(x, f[i : i + 1], rtol=0, atol=5e-5), (i, (x - f[i : i + 1]).abs().max())


@pytest.mark.parametrize("form", ["rf_velocity", "edm_eps"])
def test_tangent_vanishes_for_the_exact_consistency_student_and_so_does_the_loss_gradient(form):
    model = gaussian_model(form, "consistency")
    x_t, t = states(t_max=1.5 if form == "rf_velocity" else 1.55)
    g, scale = tangent_of(model, x_t, t)
    assert g.norm() <= 1e-8 * scale, (g.norm(), scale)
    batch = {"x0": x_t, "label": torch.zeros(8, dtype=torch.long)}
    _, loss = model.training_step(batch, 0)
    loss.backward()
    exact = model.net.log_s.grad.abs()

    denoiser = gaussian_model(form, "denoiser")  # the teacher's one-step x0: not a consistency function
    g_d, scale_d = tangent_of(denoiser, x_t, t)
    assert g_d.norm() >= 1e-2 * scale_d
    _, loss_d = denoiser.training_step(batch, 0)
    loss_d.backward()
    assert exact <= 1e-8 * denoiser.net.gain.grad.abs() and denoiser.net.gain.grad.abs() > 1e-3


def test_the_tangent_is_cos_t_times_the_derivative_of_f_along_the_ode():
    """g = cos t df/dt at r = 1: check against a central difference of f(x(t), t) along the exact ODE trajectory."""
    model = gaussian_model("rf_velocity", "denoiser")
    x_t, t = states()
    g, _ = tangent_of(model, x_t, t)
    labels = torch.zeros(8, dtype=torch.long)
    data = model.prepare_data({"x0": x_t, "label": labels})
    mu = model.net_teacher.mixture.means[0].reshape(1, *SHAPE)
    te = t.reshape(-1, 1, 1, 1, 1)
    z = (x_t - torch.cos(te) * mu) / torch.sqrt(torch.cos(te) ** 2 * S**2 + torch.sin(te) ** 2)

    def f_along(tt: torch.Tensor) -> torch.Tensor:  # the student's x0 at the trajectory's state at tt
        tte = tt.reshape(-1, 1, 1, 1, 1)
        x = torch.cos(tte) * mu + torch.sqrt(torch.cos(tte) ** 2 * S**2 + torch.sin(tte) ** 2) * z
        return model.trigflow_denoise(model.net, x, tt, data.condition).x0

    h = 1e-5
    df_dt = (f_along(t + h) - f_along(t - h)) / (2 * h)
    assert torch.allclose(g, torch.cos(te) * df_dt, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("form", ["rf_velocity", "edm_eps"])
def test_jvp_of_the_gaussian_teachers_velocity_is_its_analytic_derivative_along_the_ode(form):
    model = gaussian_model(form, "consistency")
    sd = model.sigma_data
    x_t, t = states(t_max=1.5)
    labels = torch.zeros(8, dtype=torch.long)
    data = model.prepare_data({"x0": x_t, "label": labels})
    dxdt = model.teacher_velocity(data, x_t, t)

    def F_teacher(x, tt):
        return model.trigflow_denoise(model.net_teacher, x, tt, data.condition).F

    _, dF = velocity_jvp(F_teacher, x_t, t, dxdt)
    mu = model.net_teacher.mixture.means[0].reshape(1, *SHAPE)
    te = t.reshape(-1, 1, 1, 1, 1)
    v = torch.cos(te) ** 2 * S**2 + torch.sin(te) ** 2 * sd**2
    dv = torch.sin(2 * te) * (sd**2 - S**2)
    ddv = 2 * torch.cos(2 * te) * (sd**2 - S**2)
    z = (x_t - torch.cos(te) * mu) / torch.sqrt(v)
    x_dd = -torch.cos(te) * mu + (ddv / (2 * v.sqrt()) - dv**2 / (4 * v**1.5)) * z
    expected = torch.cos(te) * torch.sin(te) * x_dd / sd
    assert torch.allclose(dF, expected, rtol=1e-9, atol=1e-12), (dF - expected).abs().max()
    x_d = -torch.sin(te) * mu + dv / (2 * v.sqrt()) * z  # and dx/dt is the trajectory's velocity
    assert torch.allclose(dxdt, x_d, rtol=1e-10, atol=1e-12)
    fd = velocity_central_difference(F_teacher, x_t, t, dxdt, 1e-5)
    assert torch.allclose(fd, expected, rtol=1e-6, atol=1e-9)


def test_teacher_velocity_is_the_guided_teacher_in_x0_or_F_alike():
    mixture = ring_mixture(shape=SHAPE)
    model = ToySCM(**analytic_host_args(mixture, "rf_velocity"),
                   distill=SCMConfig(student_net=MLPDenoiser(SHAPE, "rf_velocity", 2), guidance_scale=2.5)).double()
    batch = mixture_batch(mixture, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    data = model.prepare_data(batch)
    x_t, t = states()
    out_c = model.trigflow_denoise(model.net_teacher, x_t, t, data.condition)
    out_u = model.trigflow_denoise(model.net_teacher, x_t, t, data.uncondition)
    dxdt = model.teacher_velocity(data, x_t, t)
    assert torch.allclose(dxdt, guided_x0(out_c.F, out_u.F, 2.5) * model.sigma_data, rtol=1e-10, atol=1e-12)
    te = t.reshape(-1, 1, 1, 1, 1)
    x0 = guided_x0(out_c.x0, out_u.x0, 2.5)
    assert torch.allclose(dxdt, (torch.cos(te) * x_t - x0) / torch.sin(te), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- forward-mode AD through attention


def test_the_default_cpu_sdpa_kernel_has_no_forward_rule_and_the_math_backend_has():
    q, k, v = torch.randn(3, 1, 2, 6, 8, dtype=torch.float64)
    tangent = (torch.randn_like(q),)
    with pytest.raises(NotImplementedError, match="forward AD with _scaled_dot_product_flash_attention_for_cpu"):
        torch.func.jvp(lambda q: F_nn.scaled_dot_product_attention(q, k, v), (q,), tangent)
    with sdpa_kernel(SDPBackend.MATH):
        torch.func.jvp(lambda q: F_nn.scaled_dot_product_attention(q, k, v), (q,), tangent)


def dit_model() -> ToySCM:
    torch.manual_seed(0)
    teacher = TinyVideoDiT(4, dim=24, depth=2, heads=2, seed=0)
    student = TinyVideoDiT(4, dim=24, depth=2, heads=2, seed=1)
    return ToySCM(teacher, "rf_velocity", distill=SCMConfig(student_net=student, guidance_scale=2.0)).double()


def test_jvp_through_a_tiny_dit_equals_the_central_difference_in_float64():
    model = dit_model()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 2, 4, 4, dtype=torch.float64, generator=g)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    data = model.prepare_data({"x0": x_t, "label": labels})
    dxdt = model.teacher_velocity(data, x_t, t)
    F = model.student_velocity(data)
    _, dF = velocity_jvp(F, x_t, t, dxdt)
    fd = velocity_central_difference(F, x_t, t, dxdt, 1e-5)
    assert (fd - dF).norm() <= 1e-6 * dF.norm(), (fd - dF).norm() / dF.norm()
    # the library's attention dispatch runs its explicit attention (with a forward rule) by itself under forward-mode AD
    _, dF_plain = torch.func.jvp(F, (x_t, t), (torch.ones_like(x_t), torch.ones_like(t)))
    assert torch.isfinite(dF_plain).all()


def count_explicit_sdpa(monkeypatch) -> list[int]:
    """Counts the SDPA calls :class:`ExplicitSDPA` sends to the explicit attention."""
    import distill_mixins.parallel.explicit_attention as module

    calls, explicit = [], module.explicit_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return explicit(*args, **kwargs)

    monkeypatch.setattr(module, "explicit_attention", counted)
    return calls


def test_sdpa_called_directly_runs_the_explicit_rule_in_velocity_jvp_and_equals_the_math_backend(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 6, 8, dtype=torch.float64, generator=g)
    mask = torch.rand(6, 6, generator=g) > 0.3
    mask[:, 0] = True

    def net(kind):
        def F(x, t):  # SDPA called as diffusers' processors call it (keywords, a mask, a scale)
            out = F_nn.scaled_dot_product_attention(x * t.cos().view(-1, 1, 1, 1), k, v, **kind)
            return out * t.sin().view(-1, 1, 1, 1)
        return F

    t, dxdt = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.randn(q.shape, dtype=torch.float64, generator=g)
    for kind, explicit in (({"attn_mask": mask, "scale": 0.3}, True), ({"is_causal": True}, True),
                           ({"dropout_p": 0.0, "enable_gqa": True}, False)):
        calls = count_explicit_sdpa(monkeypatch)
        out, dF = velocity_jvp(net(kind), q, t, dxdt)
        assert bool(calls) == explicit, kind  # grouped-query attention falls through to SDPA's math backend
        cos_sin = torch.cos(t) * torch.sin(t)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            ref, ref_dF = torch.func.jvp(net(kind), (q, t), (cos_sin.view(-1, 1, 1, 1) * dxdt, cos_sin))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(dF, ref_dF, rtol=0, atol=1e-12)
    # the dispatch's math backend asked for by name stays SDPA's math backend under the mode
    from distill_mixins.parallel.attention import attention

    calls = count_explicit_sdpa(monkeypatch)
    velocity_jvp(lambda x, t: attention(x * t.cos().view(-1, 1, 1, 1), k, v, backend="math"), q, t, dxdt)
    assert not calls


def test_jvp_through_a_tiny_diffusers_wan_host(monkeypatch):
    from distill_mixins.hosts import WanVideo2WorldHost
    from tests.hosts_helpers import batch, tiny_wan

    class WanSCM(SCMMixin, WanVideo2WorldHost):
        pass

    def velocity(model, b, t):
        data = model.prepare_data(b)
        x_t = add_noise(data.x0, torch.randn(data.x0.shape, generator=torch.Generator().manual_seed(3)).to(
            data.x0.dtype), t, model.sigma_data)
        return model.student_velocity(data), x_t, model.teacher_velocity(data, x_t, t)

    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    m32 = WanSCM(tiny_wan(), distill=SCMConfig(guidance_scale=2.0), num_conditional_frames=0)
    F32, x32, v32 = velocity(m32, batch(1), t)
    with pytest.raises(NotImplementedError, match="forward AD"):  # diffusers' processor calls the fused CPU kernel
        torch.func.jvp(F32, (x32, t), (v32, t))
    calls = count_explicit_sdpa(monkeypatch)
    _, dF32 = velocity_jvp(F32, x32, t, v32)
    assert calls  # diffusers' SDPA calls ran the explicit attention's forward rule
    m64 = WanSCM(tiny_wan(), distill=SCMConfig(guidance_scale=2.0), num_conditional_frames=0).double()
    F64, x64, v64 = velocity(m64, {k: v.double() for k, v in batch(1).items()}, t)
    _, dF64 = velocity_jvp(F64, x64, t, v64)
    fd = velocity_central_difference(F64, x64, t, v64, 1e-4)
    # diffusers runs its timestep embedding and FP32LayerNorms in float32 even in a float64 model: float32 tolerances
    assert (dF32.double() - dF64).norm() <= 1e-4 * dF64.norm()
    assert (fd - dF64).norm() <= 3e-3 * dF64.norm(), (fd - dF64).norm() / dF64.norm()
    out, loss = m32.training_step(batch(2), 3)
    assert torch.isfinite(loss) and out["finite_difference"] == 0
    loss.backward()
    assert all(p.grad is None for p in m32.net_teacher.parameters())


# ------------------------------------------------------------------------------------------ pieces


def test_time_sampler_is_lognormal_on_sigma_and_clamped():
    model = gaussian_model("rf_velocity", "consistency", p_mean=-1.0, p_std=1.4)
    with model.drawing(0, 20000):
        t = model.sample_t(20000, model.scm_time_config())
    log_sigma = torch.log(model.sigma_data * torch.tan(t))
    assert abs(float(log_sigma.mean()) + 1.0) < 0.03 and abs(float(log_sigma.std()) - 1.4) < 0.03
    assert float(t.min()) >= math.atan(0.002) - 1e-15 and float(t.max()) <= math.atan(80.0) + 1e-15
    wide = gaussian_model("edm_eps", "consistency", p_mean=0.0, p_std=5.0)  # sigma_d = 0.5: clamps at both ends
    with wide.drawing(0, 20000):
        t = wide.sample_t(20000, wide.scm_time_config())
    assert math.isclose(float(t.min()), math.atan2(0.002, 0.5)) and math.isclose(float(t.max()), math.atan2(80, 0.5))
    quantiles = torch.quantile(torch.log(0.5 * torch.tan(t)), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert torch.allclose(quantiles, torch.tensor([-3.372, 0.0, 3.372], dtype=torch.float64), atol=0.15)


def test_normalizations():
    g = torch.full((2, 4, 1, 1, 1), 2.0, dtype=torch.float64)  # ||g|| = 4, D = 4
    assert torch.allclose(normalize_tangent(g, "fastgen", 0.1), g / (4 / 2 + 0.1))
    assert torch.allclose(normalize_tangent(g, "rcm", 0.1), g / (4 + 0.1))
    g[1] = 0.0
    assert torch.equal(normalize_tangent(g, "rcm")[1], g[1])


def test_distance_gradient_is_minus_two_g_and_adaptive_weighting_is_exp_minus_u_L_plus_u():
    F = torch.randn(3, *SHAPE, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, *SHAPE, dtype=torch.float64)
    d = scm_distance(F, g, "sum")
    assert torch.allclose(d, g.pow(2).flatten(1).sum(1))
    d.sum().backward()
    assert torch.allclose(F.grad, -2 * g)
    assert torch.allclose(scm_distance(F, g, "mean"), d / 4)
    u = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    assert torch.allclose(adaptive_weighted(d, u), torch.exp(-u) * d + u)


def test_warmup_ratio_and_the_two_warmup_forms():
    assert [warmup_ratio(i, 1000) for i in (0, 250, 1000, 5000)] == [0.0, 0.25, 1.0, 1.0]
    assert warmup_ratio(0, 0) == 1.0
    g = torch.Generator().manual_seed(0)
    F, dF, dxdt, x_t = torch.randn(4, 3, *SHAPE, dtype=torch.float64, generator=g)
    t = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64)
    te = t.reshape(-1, 1, 1, 1, 1)
    cos, sin = torch.cos(te), torch.sin(te)
    assert torch.allclose(scm_tangent(F, dF, dxdt, x_t, t, 0.5, 0.0, "scm"), -cos**2 * (0.5 * F - dxdt))
    assert torch.allclose(scm_tangent(F, dF, dxdt, x_t, t, 0.5, 0.0, "rcm"), -cos * (0.5 * F - dxdt))
    full = -cos**2 * (0.5 * F - dxdt) - (cos * sin * x_t + 0.5 * dF)
    for form in ("scm", "rcm"):
        assert torch.allclose(scm_tangent(F, dF, dxdt, x_t, t, 0.5, 1.0, form), full)
    model = gaussian_model("rf_velocity", "denoiser", tangent_warmup=100)
    out, _ = model.training_step({"x0": states()[0], "label": torch.zeros(8, dtype=torch.long)}, 25)
    assert float(out["warmup_ratio"]) == 0.25


class NaNTeacher(nn.Module):
    """The Gaussian teacher, returning NaN for samples of label 1."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x, time, labels):
        out = self.net(x, time, labels)
        return torch.where((labels == 1).reshape(-1, 1, 1, 1, 1), torch.nan, out)


def test_nan_samples_are_dropped_from_the_loss_and_counted():
    mixture = gaussian()
    host = analytic_host_args(mixture, "rf_velocity")
    config = dict(student_net=TrainableDenoiser(host["net"]), guidance_scale=1.0, tangent_warmup=0,
                  student_optimizer=adam())
    nan_model = ToySCM(NaNTeacher(host["net"]), "rf_velocity", distill=SCMConfig(**config)).double()
    x0 = states()[0]
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0])
    out, loss = nan_model.training_step({"x0": x0, "label": labels}, 0)
    assert int(out["nan_dropped"]) == 2 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(nan_model.net.gain.grad)
    # the kept samples' loss, as sum / B: the same per-sample terms as a batch of label-0 samples with the same draws
    clean = ToySCM(**host, distill=SCMConfig(**{**config, "student_net": TrainableDenoiser(host["net"])})).double()
    out_c, loss_c = clean.training_step({"x0": x0, "label": torch.zeros(8, dtype=torch.long)}, 0)
    assert int(out_c["nan_dropped"]) == 0
    # per-sample losses differ only by the dropped rows; recompute the kept ones through the public pieces
    assert 0 < float(loss) < float(loss_c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"derivative": "forward"}, "SCMConfig.derivative"),
        ({"normalization": "l2"}, "SCMConfig.normalization"),
        ({"warmup_form": "linear"}, "SCMConfig.warmup_form"),
        ({"loss_reduction": "max"}, "SCMConfig.loss_reduction"),
        ({"guidance_scale": 0.0}, "SCMConfig.guidance_scale"),
        ({"p_std": -1.0}, "SCMConfig.p_std"),
        ({"p_mean": math.nan}, "SCMConfig.p_mean"),
        ({"sigma_min": 100.0}, "SCMConfig.sigma_min"),
        ({"tangent_warmup": -1}, "SCMConfig.tangent_warmup"),
        ({"tangent_warmup": 1.5}, "SCMConfig.tangent_warmup"),
        ({"fd_step": 0.5}, "SCMConfig.fd_step"),
        ({"normalization_const": 0.0}, "SCMConfig.normalization_const"),
        ({"loss_scale": -1.0}, "SCMConfig.loss_scale"),
        ({"student_update_freq": 5}, "SCMConfig.student_update_freq"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        SCMConfig(**kwargs)


def test_presets_carry_the_published_values():
    rcm = SCMConfig.rcm_wan2_1_1_3b()
    assert (rcm.guidance_scale, rcm.p_mean, rcm.p_std, rcm.tangent_warmup) == (6.0, 0.7, 1.6, 1000)
    assert (rcm.normalization, rcm.loss_reduction, rcm.loss_scale, rcm.adaptive_weighting) == ("rcm", "sum", 100.0,
                                                                                                 False)
    opt = rcm.student_optimizer
    assert (opt.name, opt.lr, opt.betas, opt.weight_decay, opt.grad_clip) == ("adamw", 2e-6, (0.0, 0.999), 0.01, None)
    big = SCMConfig.rcm_wan2_1_14b()
    assert (big.student_optimizer.lr, big.tangent_warmup, big.sigma_max) == (1e-6, 300, 200.0)
    fg = SCMConfig.fastgen()
    assert (fg.p_mean, fg.p_std, fg.tangent_warmup, fg.normalization, fg.normalization_const) == (
        -1.0, 1.4, 10000, "fastgen", 0.1)
    assert fg.adaptive_weighting and fg.prior_weighting and fg.loss_reduction == "mean" and fg.warmup_form == "scm"


# ------------------------------------------------------------------------- derivative: fallback and errors


def mlp_model(**config) -> ToySCM:
    torch.manual_seed(0)
    student = MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=32, depth=2)
    mixture = ring_mixture(shape=SHAPE)
    config = {"student_net": student, "guidance_scale": 2.0, "tangent_warmup": 10, "student_optimizer": adam(),
              **config}
    return ToySCM(**analytic_host_args(mixture, "rf_velocity"), distill=SCMConfig(**config)).double()


def test_finite_difference_fallback_equals_the_jvp():
    batch = mixture_batch(ring_mixture(shape=SHAPE), 16, torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for how in ("jvp", "finite_difference"):
        model = mlp_model(derivative=how)
        out, loss = model.training_step(batch, 20)
        loss.backward()
        grads[how] = (loss.item(), torch.cat([p.grad.flatten() for p in model.net.parameters()]))
        assert float(out["finite_difference"]) == (how == "finite_difference")
    (l_j, g_j), (l_f, g_f) = grads["jvp"], grads["finite_difference"]
    assert l_f == pytest.approx(l_j, rel=1e-5)  # the MLP computes in float32
    assert (g_f - g_j).norm() <= 1e-3 * g_j.norm()


class FusedAttentionMLP(MLPDenoiser):
    """An MLP student whose forward calls a fused attention kernel directly (no forward-mode rule, and out of reach of
    ``sdpa_kernel``), as custom kernels do."""

    def forward(self, x, time, labels):
        out = super().forward(x, time, labels)
        q = out.reshape(out.shape[0], 1, 1, -1).float()
        mixed = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]
        return out + 0.0 * mixed.reshape(out.shape).to(out.dtype)


def test_auto_falls_back_to_the_finite_difference_with_a_logged_reason_and_jvp_raises():
    batch = mixture_batch(ring_mixture(shape=SHAPE), 8, torch.Generator().manual_seed(0), dtype=torch.float64)

    def fused() -> FusedAttentionMLP:
        torch.manual_seed(0)
        return FusedAttentionMLP(SHAPE, "rf_velocity", 2, hidden=32, depth=2)

    strict = mlp_model(student_net=fused(), derivative="jvp")
    with pytest.raises(RuntimeError, match="derivative='jvp'.*_scaled_dot_product_flash_attention_for_cpu.*'auto'"):
        strict.training_step(batch, 0)
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        model = mlp_model(student_net=fused(), derivative="auto")
        out, loss = model.training_step(batch, 0)
        out2, _ = model.training_step(batch, 1)
    finally:
        logger.remove(sink)
    assert float(out["finite_difference"]) == 1 and float(out2["finite_difference"]) == 1 and torch.isfinite(loss)
    assert "_scaled_dot_product_flash_attention_for_cpu" in model.derivative_fallback_reason
    assert len([m for m in messages if "finite difference instead of torch.func.jvp" in m]) == 1  # logged once


def test_an_fsdp_wrapped_student_is_recognised_before_any_jvp():
    batch = mixture_batch(ring_mixture(shape=SHAPE), 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    for how in ("jvp", "auto"):
        model = mlp_model(derivative=how)
        body = model.net.body  # fully_shard swaps the class like this (FSDP<Class> over FSDPModule)
        body.__class__ = type(f"FSDP{type(body).__name__}", (FSDPModule, type(body)), {})
        if how == "jvp":
            with pytest.raises(RuntimeError, match=r"'body' is FSDP-wrapped.*pytorch#182641"):
                model.training_step(batch, 0)
        else:
            out, _ = model.training_step(batch, 0)
            assert float(out["finite_difference"]) == 1 and "pytorch#182641" in model.derivative_fallback_reason


# ------------------------------------------------------------------------------ networks, phases, sampling


def test_adaptive_weighting_head_trains_with_the_student_and_never_the_teacher():
    model = mlp_model(adaptive_weighting=True, prior_weighting=True)
    assert set(model.trainable_networks()) == {"net", "net_logvar"}
    assert float(model.net_logvar(torch.tensor([0.3, 1.0])).abs().max()) == 0.0  # starts at u = 0
    batch = mixture_batch(ring_mixture(shape=SHAPE), 16, torch.Generator().manual_seed(0), dtype=torch.float64)
    before = {name: param_hash(net) for name, net in model.trainable_networks().items()}
    teacher = param_hash(model.net_teacher)
    out, loss = model.training_step(batch, 5)
    assert "logvar_mean" in out
    loss.backward()
    assert all(p.grad is not None for p in model.net_logvar.parameters())
    model.optimizer_step(5)
    assert all(param_hash(net) != before[name] for name, net in model.trainable_networks().items())
    assert param_hash(model.net_teacher) == teacher
    state = model.state_dict()
    assert any(k.startswith("net_logvar.") for k in state) and not any(k.startswith("net_teacher.") for k in state)


def test_consistency_times_and_the_student_sampler_is_the_consistency_sampler():
    assert consistency_times(4, 1.55) == (1.55, 1.5, 1.4, 1.0)
    assert consistency_times(1, 1.55) == (1.55,)
    with pytest.raises(ValueError, match="intermediate"):
        consistency_times(5, 1.55)
    with pytest.raises(ValueError, match="descending"):
        consistency_times(2, 1.45)
    model = gaussian_model("rf_velocity", "consistency")
    ts = model.consistency_times(3, (1.2, 0.6))
    assert ts == (math.atan(80.0), 1.2, 0.6)
    labels = torch.zeros(5, dtype=torch.long)
    noise = torch.randn(5, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = model.generate(labels, noise, schedule=ts, generator=torch.Generator().manual_seed(7))
    # MATH.md section 5 written out: x = sigma_d sin(t_0) eps; x0 = f(x, t_i); x = cos t' x0 + sin t' sigma_d eps_i
    g = torch.Generator().manual_seed(7)
    mu = model.net_teacher.mixture.means[0].reshape(1, *SHAPE)
    x = math.sin(ts[0]) * noise
    for i, t in enumerate(ts):
        x0 = consistency_function(mu, S, x, torch.full((5,), t, dtype=torch.float64), 1.0)
        if i + 1 < len(ts):
            x = math.cos(ts[i + 1]) * x0 + math.sin(ts[i + 1]) * torch.randn(x.shape, dtype=x.dtype, generator=g)
    assert torch.allclose(got, x0, rtol=1e-12, atol=1e-12)
    # an exact consistency student samples the data distribution at every step count (up to the start state)
    many = torch.randn(20000, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for steps in (1, 2, 4):
        x0 = model.generate(torch.zeros(20000, dtype=torch.long), many, schedule=model.consistency_times(steps),
                            generator=torch.Generator().manual_seed(2))
        assert torch.allclose(x0.mean(0), mu[0], atol=0.01) and abs(float(x0.std(0).mean()) - S) < 0.01


def test_training_steps_move_only_the_student_and_sample_from_the_draws():
    model = mlp_model()
    batch = mixture_batch(ring_mixture(shape=SHAPE), 16, torch.Generator().manual_seed(0), dtype=torch.float64)
    teacher, student = param_hash(model.net_teacher), param_hash(model.net)
    out_a, loss_a = model.training_step(batch, 3)
    out_b, loss_b = mlp_model().training_step(batch, 3)  # same seed, iteration, batch: the same draws
    assert loss_a.item() == loss_b.item() and out_a["t_mean"] == out_b["t_mean"]
    loss_a.backward()
    model.optimizer_step(3)
    assert param_hash(model.net) != student and param_hash(model.net_teacher) == teacher
    assert model.get_optimizers(7) == [model.optimizers()["net"]]


def test_training_moves_a_wrong_gaussian_consistency_student_to_the_exact_one():
    """The sign and size of the update: a student f = mu + s' z'(x_t, t) with s' = 0.5 (z' standardised with s')
    is consistent only at s' = s = 0.3; SGD on the sCM loss finds it."""
    model = gaussian_model("rf_velocity", "consistency",
                           student_optimizer=OptimizerConfig(name="sgd", lr=1e-2, betas=(0.0, 0.999), weight_decay=0.0))
    with torch.no_grad():
        model.net.log_s.fill_(math.log(0.5))
    mixture, g = model.net_teacher.mixture, torch.Generator().manual_seed(0)
    labels = torch.zeros(64, dtype=torch.long)
    for it in range(150):
        _, loss = model.training_step({"x0": mixture.sample(labels, g), "label": labels}, it)
        loss.backward()
        model.optimizer_step(it)
    assert abs(float(model.net.log_s.exp()) - S) < 3e-3
