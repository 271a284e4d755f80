"""The energy score (distill_mixins/methods/energy.py) and DMD2's energy-score term: known values, strict propriety on
a two-point law (a split scores 0, a collapsed or a blurred generator d/2), the gradient, a generator it trains to
both modes where L2 regression lands between them, and the DMD2 term (linear in its weight, off by default)."""

from __future__ import annotations

import math

import pytest
import torch

from distill_mixins import DMD2Config, DMD2Mixin, OptimizerConfig
from distill_mixins.methods.energy import energy_score, rms_distance
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, mixture_batch, ring_mixture

torch.set_num_threads(1)

SHAPE = (2, 2, 1, 1)


def clip(*values: float) -> torch.Tensor:
    """One condition's (1, 4, 1, 1, 1) clip, float64."""
    return torch.tensor(values, dtype=torch.float64).view(1, len(values), 1, 1, 1)


def test_known_values_with_rms_distances():
    """Two and three samples against y = 0 in 4 dimensions; distances are norms over sqrt(4) = 2."""
    y = clip(0, 0, 0, 0)
    x1, x2, x3 = clip(2, 0, 0, 0), clip(0, 2, 0, 0), clip(2, 0, 0, 0)
    assert float(rms_distance(x1, x2)) == pytest.approx(math.sqrt(8) / 2, abs=1e-15)
    # m = 2: (|x1| + |x2|) / 2 - |x1 - x2| / 2 = 1 - sqrt(2) / 2
    assert float(energy_score([x1, x2], y)) == pytest.approx(1 - math.sqrt(2) / 2, abs=1e-15)
    # m = 3: mean |x_i| = 1; pairs (1,2), (1,3), (2,3) = sqrt(2), 0, sqrt(2); sum / (m (m - 1)) = 2 sqrt(2) / 6
    assert float(energy_score([x1, x2, x3], y)) == pytest.approx(1 - 2 * math.sqrt(2) / 6, abs=1e-15)


def test_strictly_proper_on_a_two_point_law():
    """y is a or b with probability 1/2 (|a - b| = d in RMS): the expected score is 0 for samples split between a and
    b, d/2 for samples collapsed on a, and d/2 for samples at the midpoint (blur scores as badly as collapse)."""
    a, b = clip(0, 0, 0, 0), clip(1, 1, 1, 1)
    d = float(rms_distance(a, b))

    def expected(samples: list[torch.Tensor]) -> float:
        return 0.5 * float(energy_score(samples, a)) + 0.5 * float(energy_score(samples, b))

    assert expected([a, b]) == pytest.approx(0.0, abs=1e-15)
    assert expected([a, a]) == pytest.approx(d / 2, abs=1e-15)
    assert expected([(a + b) / 2, (a + b) / 2]) == pytest.approx(d / 2, abs=1e-15)


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
def test_beta_sets_what_a_sample_between_two_modes_costs(beta):
    """The two-point law (modes a, b at RMS distance d = 1): splitting scores 0 for every beta; two samples at the
    midpoint (d/2)^beta, two at one mode d^beta / 2 = 1/2: the midpoint costs more than collapse below beta = 1,
    the same at 1, less above."""
    a, b = clip(0, 0, 0, 0), clip(2, 0, 0, 0)
    mid = (a + b) / 2

    def expected(samples: list[torch.Tensor]) -> float:
        return 0.5 * float(energy_score(samples, a, beta)) + 0.5 * float(energy_score(samples, b, beta))

    assert expected([a, b]) == pytest.approx(0.0, abs=1e-15)
    assert expected([mid, mid]) == pytest.approx(0.5**beta, abs=1e-15)
    assert expected([a, a]) == pytest.approx(0.5, abs=1e-15)
    assert (expected([mid, mid]) > expected([a, a])) == (beta < 1)
    x = a.clone().requires_grad_()  # a sample on a real clip and on another sample: finite (zero) gradient
    energy_score([x, a], a, beta).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_beta_known_value_and_range():
    """m = 2 against y = 0 (the known-value case above): (1^b + 1^b) / 2 - sqrt(2)^b / 2 at b = 0.5."""
    y, x1, x2 = clip(0, 0, 0, 0), clip(2, 0, 0, 0), clip(0, 2, 0, 0)
    assert float(energy_score([x1, x2], y, beta=0.5)) == pytest.approx(1 - 2**0.25 / 2, abs=1e-15)
    for beta in (0.0, 2.0, -1.0, True):
        with pytest.raises(ValueError, match="must be in \\(0, 2\\)"):
            energy_score([x1, x2], y, beta=beta)
    with pytest.raises(ValueError, match=r"DMD2Config\.energy_beta=2\.5 must be in"):
        DMD2Config(energy_beta=2.5)


def test_gradient_is_the_unit_vectors_of_the_equation():
    """m = 2: d ES / d x1 = (u(x1 - y) - u(x1 - x2)) / (2 sqrt(D)), u the unit vector; the repulsion is unit-length
    even when the two samples nearly coincide."""
    y = clip(0.3, -1.0, 2.0, 0.5)
    x1 = clip(1.0, 0.0, 0.0, 0.0).requires_grad_()
    x2 = (x1.detach() + 1e-6 * clip(0.0, 1.0, 0.0, 0.0))
    energy_score([x1, x2], y).sum().backward()

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm()

    expected = (unit(x1.detach() - y) - unit(x1.detach() - x2)) / (2 * 2.0)
    assert torch.allclose(x1.grad, expected, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        energy_score([x1], y)


def test_a_generator_trained_on_it_reaches_both_modes_where_l2_regression_averages_them():
    """y = +1 or -1 (one draw per condition); a small generator G(z) trained on the energy score puts ~half its
    samples within 0.2 of each mode (most of them in all); trained on L2 to the same draws it sits at their mean,
    0."""
    def train(loss_name: str) -> torch.Tensor:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(600):
            y = (torch.randint(0, 2, (64, 1), generator=g) * 2 - 1).double()
            z1, z2 = torch.randn(64, 1, generator=g).double(), torch.randn(64, 1, generator=g).double()
            x1, x2 = net(z1), net(z2)
            loss = energy_score([x1, x2], y).mean() if loss_name == "energy" else (x1 - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return net(torch.randn(4096, 1, generator=g).double()).squeeze(1)

    es, l2 = train("energy"), train("l2")
    near = (es - es.sign()).abs() < 0.2  # measured 0.82 (0.85 after 1,500 steps)
    assert near.double().mean() > 0.7, near.double().mean()
    assert 0.4 < (es > 0).double().mean() < 0.6
    assert l2.abs().max() < 0.2  # no sample within 0.8 of a mode


class AnalyticDMD2(DMD2Mixin, ToyHost):
    """DMD2 on the exact mixture teacher with MLP student and critic."""


def dmd2_model(**overrides) -> AnalyticDMD2:
    torch.manual_seed(0)
    student = MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=32, depth=2)
    critic = MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=32, depth=2)
    sgd = OptimizerConfig(name="sgd", lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=None)
    config = DMD2Config(student_net=student, critic_net=critic, student_optimizer=sgd, critic_optimizer=sgd,
                        guidance_scale=2.0, student_update_freq=2, renoise="fresh", **overrides)
    return AnalyticDMD2(**analytic_host_args(ring_mixture(shape=SHAPE), "rf_velocity"), distill=config).double()


def student_grad(model: AnalyticDMD2) -> tuple[dict, torch.Tensor]:
    batch = mixture_batch(ring_mixture(shape=SHAPE), 16, torch.Generator().manual_seed(0), dtype=torch.float64)
    out, loss = model.training_step(batch, 0)
    loss.backward()
    return out, torch.cat([p.grad.flatten() for p in model.net.parameters()])


def test_dmd2s_energy_term_is_off_by_default_and_linear_in_its_weight():
    """``energy_weight=0`` (the default) is DMD2's step bit for bit (the term's draws come after DMD2's);
    grad(w) - grad(0) = w (grad(1) - grad(0)) in float64; the logged loss is the energy score."""
    out0, g0 = student_grad(dmd2_model())
    out_off, g_off = student_grad(dmd2_model(energy_weight=0.0, energy_samples=3))
    assert torch.equal(g0, g_off) and "loss_energy" not in out0
    out1, g1 = student_grad(dmd2_model(energy_weight=1.0))
    _, g3 = student_grad(dmd2_model(energy_weight=3.0))
    assert torch.equal(out1["loss_dmd"], out0["loss_dmd"]) and float(out1["loss_energy"]) > 0
    assert (g1 - g0).norm() > 1e-3 * g0.norm()
    assert torch.allclose(g3 - g0, 3.0 * (g1 - g0), rtol=1e-9, atol=1e-12)


def test_dmd2s_energy_term_uses_its_beta():
    """The logged term is the energy score at ``energy_beta`` of the same draws: with the draws equal, beta = 1
    reproduces the default run and another beta changes the term and the gradient."""
    out1, g1 = student_grad(dmd2_model(energy_weight=1.0))
    out_b1, g_b1 = student_grad(dmd2_model(energy_weight=1.0, energy_beta=1.0))
    out_half, g_half = student_grad(dmd2_model(energy_weight=1.0, energy_beta=0.5))
    assert torch.equal(g1, g_b1) and torch.equal(out1["loss_energy"], out_b1["loss_energy"])
    assert not torch.equal(out_half["loss_energy"], out1["loss_energy"]) and not torch.allclose(g_half, g1)
    assert torch.equal(out_half["loss_dmd"], out1["loss_dmd"])


def test_dmd2s_energy_fields_are_checked():
    with pytest.raises(ValueError, match=r"DMD2Config\.energy_samples=1"):
        DMD2Config(energy_samples=1)
    with pytest.raises(ValueError, match=r"DMD2Config\.energy_weight"):
        DMD2Config(energy_weight=-1.0)


def test_dmd2s_energy_term_refuses_a_scored_window_that_is_not_the_batch():
    """A method whose ``student_clip`` scores another batch (Self-Forcing's longer rollouts; its config refuses the
    combination too) would compare the student's clip with the wrong real clip: the term raises instead."""
    from dataclasses import replace

    model = dmd2_model(energy_weight=1.0)
    batch = model.prepare_data(mixture_batch(ring_mixture(shape=SHAPE), 4, torch.Generator().manual_seed(0),
                                              dtype=torch.float64))
    noise = torch.randn_like(batch.x0)
    with pytest.raises(ValueError, match="energy_weight > 0 scores the student's clip against the batch's real clip"):
        model.energy_loss(batch, replace(batch), batch.x0, noise)
