"""RCMMixin: sCM + DMD built from the two methods' pieces. Known answers: with the DMD weight 0 (or before
``scm_only_iterations``) the step is sCM's exactly; the DMD term's gradient is linear in its weight and vanishes while
the critic equals the teacher; phases step only their networks; the 1-4 step student sampler is the consistency
sampler; presets; the step on a tiny diffusers Wan host."""

from __future__ import annotations

import math

import pytest
import torch

from distill_mixins import OptimizerConfig, RCMConfig, RCMMixin, SCMConfig, SCMMixin, TimeSamplerConfig
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, mixture_batch, ring_mixture
from distill_mixins.trigflow import add_noise
from tests.conftest import param_hash

torch.set_num_threads(1)

SHAPE = (2, 2, 1, 1)


class ToyRCM(RCMMixin, ToyHost):
    """rCM on the exact mixture teacher."""


class ToySCM(SCMMixin, ToyHost):
    """sCM on the same host (the reference)."""


def sgd() -> OptimizerConfig:
    return OptimizerConfig(name="sgd", lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=None)


def student() -> MLPDenoiser:
    torch.manual_seed(0)
    return MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=32, depth=2)


def critic() -> MLPDenoiser:
    torch.manual_seed(1)
    return MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=32, depth=2)


def common(**overrides) -> dict:
    return {"student_net": student(), "guidance_scale": 2.0, "tangent_warmup": 10, "student_optimizer": sgd(),
            "loss_scale": 1.0, **overrides}


def rcm_model(**overrides) -> ToyRCM:
    values = common(critic_net=critic(), critic_optimizer=sgd(), student_update_freq=2, **overrides)
    return ToyRCM(**analytic_host_args(ring_mixture(shape=SHAPE), "rf_velocity"), distill=RCMConfig(**values)).double()


def scm_model() -> ToySCM:
    host = analytic_host_args(ring_mixture(shape=SHAPE), "rf_velocity")
    return ToySCM(**host, distill=SCMConfig(**common())).double()


@pytest.fixture
def batch():
    return mixture_batch(ring_mixture(shape=SHAPE), 16, torch.Generator().manual_seed(0), dtype=torch.float64)


def student_grad(model, batch, iteration: int = 10) -> tuple[dict, torch.Tensor]:
    out, loss = model.training_step(batch, iteration)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.net.parameters()])
    model.optimizers()["net"].zero_grad(set_to_none=True)
    return out, grad


def test_without_the_dmd_term_the_step_is_scms_exactly(batch):
    """``dmd_loss_weight=0``, or a student phase before ``scm_only_iterations``: the same loss and gradient as sCM
    (sCM's draws come first, so they are the same)."""
    _, reference = student_grad(scm_model(), batch)
    for model in (rcm_model(dmd_loss_weight=0.0), rcm_model(scm_only_iterations=11)):
        out, grad = student_grad(model, batch)
        assert torch.equal(grad, reference) and "loss_dmd" not in out
    out, grad = student_grad(rcm_model(), batch)
    assert "loss_dmd" in out and not torch.equal(grad, reference)
    assert torch.allclose(out["loss_rcm"], out["loss_scm"] + out["loss_dmd"])


def test_the_dmd_gradient_is_linear_in_its_weight_and_zero_while_the_critic_is_the_teacher(batch):
    """grad(lambda) = grad_sCM + lambda grad_DMD; a critic that is a copy of the teacher, without guidance, gives
    grad_DMD = 0 (DMD2's ``x0_fake - x0_teacher``). Float64."""
    grads = {w: student_grad(rcm_model(dmd_loss_weight=w), batch)[1] for w in (0.0, 1.0, 2.5)}
    dmd = grads[1.0] - grads[0.0]
    assert dmd.norm() > 1e-3 * grads[0.0].norm()
    assert torch.allclose(grads[2.5] - grads[0.0], 2.5 * dmd, rtol=1e-9, atol=1e-12)

    class NeuralRCM(RCMMixin, ToyHost):
        """A neural teacher, so the default critic is its copy."""

    teacher = critic()
    def make(w: float) -> NeuralRCM:
        return NeuralRCM(teacher, "rf_velocity", distill=RCMConfig(**common(dmd_loss_weight=w, guidance_scale=1.0)))


    out, with_dmd = student_grad(make(1.0).double(), batch)
    without = student_grad(make(0.0).double(), batch)[1]
    assert out["loss_dmd"] == 0 and torch.allclose(with_dmd, without, rtol=0, atol=1e-14)


def test_the_dmd_term_starts_when_the_tangent_warm_up_ends_unless_told(batch):
    """``scm_only_iterations=None`` (the default): sCM alone until ``tangent_warmup`` (NVlabs/rcm's ``emit_dmd``)."""
    assert (RCMConfig().dmd_start, RCMConfig(scm_only_iterations=3).dmd_start) == (1000, 3)
    model = rcm_model()  # tangent_warmup 10
    assert "loss_dmd" not in model.training_step(batch, 8)[0] and "loss_dmd" in model.training_step(batch, 10)[0]


def test_phases_step_only_their_networks_and_never_the_teacher(batch):
    model = rcm_model(adaptive_weighting=True, scm_only_iterations=0)
    teacher = param_hash(model.net_teacher)
    assert set(model.trainable_networks()) == {"net", "net_logvar", "net_fake_score"}
    for it in range(6):
        before = {name: param_hash(net) for name, net in model.trainable_networks().items()}
        out, loss = model.training_step(batch, it)
        assert torch.isfinite(loss)
        loss.backward()
        model.optimizer_step(it)
        changed = {name for name, net in model.trainable_networks().items() if param_hash(net) != before[name]}
        assert changed == ({"net", "net_logvar"} if it % 2 == 0 else {"net_fake_score"}), it
        assert ("loss_scm" in out) == ("loss_dmd" in out) == (it % 2 == 0)
        assert ("loss_fake_score" in out) == (it % 2 == 1)
    assert param_hash(model.net_teacher) == teacher


def test_the_simulated_student_is_the_consistency_sampler(batch):
    """DMD's student sample with ``backward_simulation=False`` over ``consistency_times(3)`` is ``generate`` with
    the same times and the same noise draws (``renoise="fresh"``)."""
    base = rcm_model()
    times = base.consistency_times(3, (1.0, 0.5))
    model = rcm_model(student_schedule=times, backward_simulation=False, simulation="schedule")
    data = model.prepare_data(batch)
    with model.drawing(7, 16) as draws:
        noise = draws.randn_like(data.x0)
        G = model.student_sample(data, noise, grad=False)
    x = math.sin(times[0]) * model.sigma_data * noise  # the state at t_0 = atan(sigma_max / sigma_d)
    with torch.no_grad(), model.drawing(7, 16) as draws:
        draws.randn_like(data.x0)  # the initial noise, drawn above
        for k, t in enumerate(times):
            x0 = model.trigflow_denoise(model.net, x, torch.full((16,), t, dtype=torch.float64), data.condition).x0
            if k + 1 < len(times):
                s = torch.tensor(times[k + 1], dtype=torch.float64)
                x = torch.cos(s) * x0 + torch.sin(s) * model.sigma_data * draws.randn_like(x0)
    assert torch.allclose(G, x0, rtol=0, atol=1e-12)


def test_the_random_simulation_is_the_consistency_sampler_at_drawn_times(batch):
    """``simulation="random"`` (NVlabs/rcm): from ``t_max``, each later time is drawn per sample from ``critic_time``
    and capped by the one before, with fresh noise; written out with the same draws (1e-12), and one step is the
    one-step student."""
    model = rcm_model(simulation_steps=3, critic_time=TimeSamplerConfig(kind="uniform"))
    data = model.prepare_data(batch)
    with model.drawing(7, 16) as draws:
        noise = draws.randn_like(data.x0)
        G = model.student_sample(data, noise, grad=False, simulate=False)  # all 3 steps
    t = torch.full((16,), math.atan(80.0), dtype=torch.float64)
    x, times = math.sin(t[0]) * model.sigma_data * noise, [t]
    with torch.no_grad(), model.drawing(7, 16) as draws:
        draws.randn_like(data.x0)
        for k in range(3):
            x0 = model.trigflow_denoise(model.net, x, t, data.condition).x0
            if k < 2:
                t = torch.minimum(model.sample_t(16, model.distill_config.critic_time), t)
                x = add_noise(x0, draws.randn_like(x0), t, model.sigma_data)
                times.append(t)
    assert torch.allclose(G, x0, rtol=0, atol=1e-12)
    assert all(bool((a >= b).all()) for a, b in zip(times, times[1:], strict=False))
    assert len({float(v) for v in times[2]}) > 1  # per-sample times
    one = rcm_model(simulation_steps=1)
    with one.drawing(7, 16) as draws:
        G1 = one.student_sample(data, draws.randn_like(data.x0), grad=False)
    with torch.no_grad():
        assert torch.equal(G1, one.generate(batch["label"], noise, schedule=one.consistency_times(1)))


def test_one_step_is_the_consistency_samplers_first_time(batch):
    """``student_schedule="one_step"`` trains (DMD) and samples at ``atan(sigma_max / sigma_d)``, the largest sCM
    training time, not the rectified-flow host's own pi/2."""
    model = rcm_model()
    assert model.student_times().tolist() == list(model.consistency_times(1)) == [math.atan(80.0)]
    labels, noise = batch["label"], torch.randn(16, *SHAPE, dtype=torch.float64)
    explicit = model.generate(labels, noise, schedule=model.consistency_times(1))
    assert torch.equal(model.generate(labels, noise), explicit)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dmd_loss_weight": -1.0}, "RCMConfig.dmd_loss_weight"),
        ({"scm_only_iterations": -2}, "RCMConfig.scm_only_iterations"),
        ({"dmd_reduction": "max"}, "RCMConfig.dmd_reduction"),
        ({"simulation": "fixed"}, "RCMConfig.simulation"),
        ({"simulation_steps": 0}, "RCMConfig.simulation_steps"),
        ({"student_schedule": (1.5, 0.5)}, "RCMConfig.student_schedule"),  # ignored by the random simulation
        ({"backward_simulation": False}, "RCMConfig.student_schedule"),
        ({"guidance_scale": 0.0}, "RCMConfig.guidance_scale"),
        ({"normalization": "l1"}, "RCMConfig.normalization"),
        ({"critic_samples": "all"}, "RCMConfig.critic_samples"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        RCMConfig(**kwargs)


def test_presets_carry_the_published_values():
    small = RCMConfig.wan2_1_1_3b()
    assert (small.student_optimizer.lr, small.critic_optimizer.lr, small.student_optimizer.betas) == (
        2e-6, 4e-7, (0.0, 0.999))
    assert (small.guidance_scale, small.loss_scale, small.dmd_loss_weight, small.student_update_freq) == (
        6.0, 100.0, 1.0, 5)
    assert (small.critic_time.kind, small.critic_time.shift, small.tangent_warmup, small.sigma_max) == (
        "shifted_uniform", 5.0, 1000, 80.0)
    assert (small.normalization, small.loss_reduction, small.p_mean, small.p_std) == ("rcm", "sum", 0.7, 1.6)
    assert (small.dmd_reduction, small.dmd_start) == ("sum", 1000)  # NVlabs/rcm: both terms summed, DMD after warm-up
    assert (small.simulation, small.simulation_steps, small.critic_samples) == ("random", 4, "simulated")
    big = RCMConfig.wan2_1_14b()
    assert (big.student_optimizer.lr, big.critic_optimizer.lr, big.student_update_freq, big.sigma_max) == (
        1e-6, 1e-7, 10, 200.0)
    assert RCMConfig.wan2_1_14b(student_update_freq=3).student_update_freq == 3
    assert big.dmd_start == 300


def test_rcm_steps_on_a_tiny_diffusers_wan_host():
    """Finite losses; a student phase changes only the student, a critic phase only the critic; JVP through the
    host's attention (math SDPA)."""
    from distill_mixins.hosts import WanVideo2WorldHost
    from tests.hosts_helpers import batch as wan_batch
    from tests.hosts_helpers import tiny_wan

    class WanRCM(RCMMixin, WanVideo2WorldHost):
        pass

    adam = OptimizerConfig(name="adamw", lr=1e-4, betas=(0.0, 0.999), weight_decay=0.0)
    config = RCMConfig(guidance_scale=2.0, student_update_freq=2, student_optimizer=adam, critic_optimizer=adam,
                       scm_only_iterations=0)  # the DMD term (rCM's random simulation, per-sample times) from step 0
    model = WanRCM(tiny_wan(), distill=config, num_conditional_frames=0)
    teacher = param_hash(model.net_teacher)
    for it in range(2):
        before = {name: param_hash(net) for name, net in model.trainable_networks().items()}
        out, loss = model.training_step(wan_batch(2), it)
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
        assert ("loss_dmd" in out) == ("loss_scm" in out) == (it == 0)
        loss.backward()
        model.optimizer_step(it)
        changed = {name for name, net in model.trainable_networks().items() if param_hash(net) != before[name]}
        assert changed == ({"net"} if it == 0 else {"net_fake_score"})
    assert out["loss_fake_score"] > 0 and param_hash(model.net_teacher) == teacher
