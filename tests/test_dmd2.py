"""DMD2Mixin: loss formulas with known answers, CFG convention, phases, start from KD, presets."""

from __future__ import annotations

import pytest
import torch

from distill_mixins import (
    DiscriminatorConfig,
    DMD2Config,
    DMD2Mixin,
    KDConfig,
    KDMixin,
    OptimizerConfig,
    TimeSamplerConfig,
)
from distill_mixins.methods.dmd2 import dmd_loss, fake_score_loss
from distill_mixins.sampling import cosmos_guidance_to_w
from distill_mixins.testing import MLPDenoiser, ToyHost, mixture_batch, ring_mixture
from tests.conftest import param_hash

torch.set_num_threads(1)

SHAPE = (2, 2, 1, 1)


class NeuralDMD2(DMD2Mixin, ToyHost):
    """A tiny random MLP teacher with DMD2."""


class NeuralKD(KDMixin, ToyHost):
    """The same host with KD (stage 1)."""


def teacher_net() -> MLPDenoiser:
    torch.manual_seed(0)
    return MLPDenoiser(SHAPE, "rf_velocity", num_labels=2, hidden=32, depth=2)


def make_dmd2(**kwargs) -> NeuralDMD2:
    kwargs.setdefault("student_optimizer", OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0))
    kwargs.setdefault("critic_optimizer", OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0))
    return NeuralDMD2(teacher_net(), "rf_velocity", distill=DMD2Config(**kwargs))


@pytest.fixture
def batch():
    return mixture_batch(ring_mixture(shape=SHAPE), 16, torch.Generator().manual_seed(0))


def test_dmd_loss_gradient_is_the_normalized_score_difference():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(4, *SHAPE, generator=g, dtype=torch.float64).requires_grad_(True)
    x0_teacher, x0_fake = torch.randn(2, 4, *SHAPE, generator=g, dtype=torch.float64)
    dmd_loss(G, x0_teacher, x0_fake).backward()
    w = (G.detach() - x0_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (x0_fake - x0_teacher) / w / G.numel()
    assert torch.allclose(G.grad, expected, rtol=1e-12, atol=0)
    G.grad = None  # rCM's reduction: summed per sample, averaged over the batch
    dmd_loss(G, x0_teacher, x0_fake, reduction="sum").backward()
    assert torch.allclose(G.grad, 2 * (x0_fake - x0_teacher) / w / G.shape[0], rtol=1e-12, atol=0)


def test_dmd_loss_is_zero_when_critic_equals_teacher_and_clamps_its_normalizer():
    G = torch.randn(3, *SHAPE, requires_grad=True)
    x0 = torch.randn(3, *SHAPE)
    loss = dmd_loss(G, x0, x0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(G.grad, torch.zeros_like(G))
    G = torch.zeros(1, *SHAPE, requires_grad=True)  # |G - x0_teacher| = 0: w clamps at 1e-5
    dmd_loss(G, torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE)).backward()
    assert torch.allclose(G.grad, torch.full_like(G, 1e5 / G.numel()))
    assert dmd_loss(G.half(), torch.zeros(1, *SHAPE).half(), torch.ones(1, *SHAPE).half()).dtype == torch.float64


def test_fake_score_loss_weights_each_sample_by_one_over_sin_squared_t():
    G = torch.zeros(2, *SHAPE)
    x0_fake = torch.stack([torch.full(SHAPE, 1.0), torch.full(SHAPE, 2.0)])
    t = torch.tensor([torch.pi / 2, torch.pi / 6], dtype=torch.float64)  # sin^2 = 1, 1/4
    assert fake_score_loss(G, x0_fake, t).item() == pytest.approx((1.0 / 1.0 + 4.0 / 0.25) / 2)


def test_cfg_convention_w1_is_the_conditional_teacher_and_cosmos_g_is_w_g_plus_1(batch):
    model = make_dmd2(guidance_scale=1.0)
    data = model.prepare_data(batch)
    x_t, t = torch.randn(16, *SHAPE), torch.full((16,), 1.0, dtype=torch.float64)
    x0_c = model.trigflow_denoise(model.net_teacher, x_t, t, data.condition).x0
    x0_u = model.trigflow_denoise(model.net_teacher, x_t, t, data.uncondition).x0
    assert torch.equal(model.teacher_x0(data, x_t, t), x0_c)
    g = 3.0  # Cosmos teacher_guidance: x0_c + g (x0_c - x0_u)
    model.distill_config.guidance_scale = cosmos_guidance_to_w(g)
    assert torch.allclose(model.teacher_x0(data, x_t, t), x0_c + g * (x0_c - x0_u), atol=1e-6)


def test_negative_condition_replaces_the_uncondition(batch):
    model = make_dmd2(guidance_scale=2.0, use_negative_condition=True)
    x_t, t = torch.randn(16, *SHAPE), torch.full((16,), 1.0, dtype=torch.float64)
    with pytest.raises(KeyError, match="negative_condition"):
        model.teacher_x0(model.prepare_data(batch), x_t, t)
    negative = torch.ones_like(batch["label"])  # e.g. the other label as a "negative prompt"
    data = model.prepare_data({**batch, "negative_condition": negative})
    x0_c = model.trigflow_denoise(model.net_teacher, x_t, t, data.condition).x0
    x0_n = model.trigflow_denoise(model.net_teacher, x_t, t, negative).x0
    assert torch.allclose(model.teacher_x0(data, x_t, t), x0_n + 2.0 * (x0_c - x0_n), atol=1e-6)


def test_phases_step_only_their_networks_and_never_the_teacher(batch):
    model = make_dmd2()
    teacher = param_hash(model.net_teacher)
    names = {id(opt): name for name, opt in model.optimizers().items()}
    for it in range(10):
        before = {name: param_hash(net) for name, net in model.trainable_networks().items()}
        out, loss = model.training_step(batch, it)
        assert torch.isfinite(loss)
        loss.backward()
        stepped = {names[id(opt)] for opt in model.get_optimizers(it)}
        model.optimizer_step(it)
        changed = {name for name, net in model.trainable_networks().items() if param_hash(net) != before[name]}
        assert stepped == changed == ({"net"} if it % 5 == 0 else {"net_fake_score"})
        assert ("loss_dmd" in out) == (it % 5 == 0)
    assert param_hash(model.net_teacher) == teacher


def test_backward_simulation_keeps_the_gradient_of_the_last_step_only(batch):
    model = make_dmd2(student_schedule="cosmos_4step")
    data = model.prepare_data(batch)
    calls = []
    model.net.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    torch.manual_seed(0)
    seen = set()
    for iteration in range(30):
        calls.clear()
        with model.drawing(iteration, data.x0.shape[0]):  # n is drawn from the iteration's draws
            G = model.student_sample(data, torch.randn_like(data.x0), grad=True)
        assert G.requires_grad and calls[-1] and not any(calls[:-1])
        seen.add(len(calls))
    assert seen == {1, 2, 3, 4}  # n ~ U{1..4}
    calls.clear()
    with model.drawing(0, data.x0.shape[0]):
        assert not model.student_sample(data, torch.randn_like(data.x0), grad=False).requires_grad


def test_student_phase_keeps_no_teacher_or_critic_graph(batch):
    model = make_dmd2()
    model.set_phase(True)
    graph_inputs = []
    for net in (model.net_teacher, model.net_fake_score):
        net.register_forward_hook(lambda m, i, o: graph_inputs.append(o.requires_grad))
    with model.drawing(0, batch["x0"].shape[0]):
        model.training_step_generator(model.prepare_data(batch), 0)
    assert graph_inputs and not any(graph_inputs)


def test_dmd2_starts_from_a_kd_student(batch):
    kd = NeuralKD(teacher_net(), "rf_velocity", distill=KDConfig(
        student_optimizer=OptimizerConfig(name="adam", lr=1e-2, weight_decay=0.0)))
    kd_batch = {**batch, "noise": torch.randn(16, *SHAPE), "teacher_x0": batch["x0"]}
    for it in range(5):
        _, loss = kd.training_step(kd_batch, it)
        loss.backward()
        kd.optimizer_step(it)
    state = kd.net.state_dict()
    model = make_dmd2()
    model.load_student_state_dict(state)
    assert param_hash(model.net) == param_hash(kd.net) != param_hash(model.net_teacher)
    assert param_hash(model.net_fake_score) == param_hash(model.net_teacher)  # the critic starts as the teacher
    for it in range(6):
        _, loss = model.training_step(batch, it)
        assert torch.isfinite(loss)
        loss.backward()
        model.optimizer_step(it)


def test_presets_reproduce_the_published_recipes():
    predict = DMD2Config.cosmos_predict2_5()
    assert predict.student_schedule == "cosmos_4step" and predict.guidance_scale == 4.0
    assert (predict.student_optimizer.lr, predict.critic_optimizer.lr) == (1e-6, 2e-7)
    assert predict.student_update_freq == 5 and predict.gan_loss_weight == 0.0
    assert predict.student_optimizer.grad_clip == 1.0 and predict.critic_time.shift == 5.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gan_loss_weight": 1e-3}, "needs DMD2Config.discriminator"),
        ({"guidance_scale": 0.0}, "DMD2Config.guidance_scale"),
        ({"gan_loss_weight": -1.0}, "DMD2Config.gan_loss_weight"),
        ({"refine_weight": -1.0}, "DMD2Config.refine_weight"),
        ({"refine_time": 0.0}, "DMD2Config.refine_time"),
        ({"refine_teacher_steps": 0}, "DMD2Config.refine_teacher_steps"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DMD2Config(**kwargs)



# ----------------------------------------------------------------------------------- GAN heads

CONV_SHAPE = (2, 4, 4, 4)


class TinyConvNet(torch.nn.Module):
    """A random conv video net with tappable blocks; returns an RF velocity (B, C, T, H, W)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.inp = torch.nn.Conv3d(CONV_SHAPE[0], channels, 3, padding=1)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv3d(channels, channels, 3, padding=1) for _ in range(3))
        self.out = torch.nn.Conv3d(channels, CONV_SHAPE[0], 3, padding=1)
        self.label = torch.nn.Embedding(3, channels)

    def forward(self, x, time, labels):
        h = self.inp(x) + time.float().reshape(-1, 1, 1, 1, 1)
        h = h + self.label(torch.where(labels < 0, 2, labels))[:, :, None, None, None]
        for block in self.blocks:
            h = h + torch.nn.functional.silu(block(h))
        return self.out(h)


class ConvDMD2(DMD2Mixin, ToyHost):
    """The conv video host with DMD2."""


@pytest.mark.parametrize(("kind", "source"), [("conv3d", "teacher"), ("attention", "critic")])
def test_gan_losses_are_finite_and_the_discriminator_trains_only_in_critic_phases(kind, source):
    torch.manual_seed(0)
    disc = DiscriminatorConfig(kind=kind, feature_dim=8, taps=(0, 2), source=source, hidden=16, r1_weight=0.1)
    model = ConvDMD2(TinyConvNet(), "rf_velocity", distill=DMD2Config(
        gan_loss_weight=1e-3, discriminator=disc, guidance_scale=2.0,
        discriminator_optimizer=OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)))
    g = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(4, *CONV_SHAPE, generator=g), "label": torch.randint(0, 2, (4,), generator=g)}
    teacher = param_hash(model.net_teacher)
    for it in range(6):
        before = param_hash(model.net_discriminator)
        out, loss = model.training_step(batch, it)
        keys = {"loss_gan_generator"} if it % 5 == 0 else {"loss_gan_discriminator", "loss_r1"}
        assert keys <= set(out) and all(torch.isfinite(out[k]) for k in keys) and torch.isfinite(loss)
        loss.backward()
        model.optimizer_step(it)
        assert (param_hash(model.net_discriminator) != before) == (it % 5 != 0)
    assert param_hash(model.net_teacher) == teacher
    assert not any(m._forward_hooks for m in model.modules())  # taps removed after every step


GAN_TIME = TimeSamplerConfig(kind="uniform", t_min=0.1, t_max=0.2)


def conv_gan_model(time: TimeSamplerConfig | None, gan_loss_weight: float = 1e-3) -> ConvDMD2:
    torch.manual_seed(0)
    disc = DiscriminatorConfig(kind="attention", feature_dim=8, taps=(0, 2), source="critic", hidden=16, time=time)
    return ConvDMD2(TinyConvNet(), "rf_velocity", distill=DMD2Config(
        gan_loss_weight=gan_loss_weight, discriminator=disc, guidance_scale=2.0,
        discriminator_optimizer=OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)))


def test_gan_at_its_own_times_scores_real_and_fake_clips_noised_alike_and_leaves_the_dmd_terms_as_without_it():
    """``DiscriminatorConfig.time``: every discriminator call sees its own time law; in the critic phase the real and
    the student's clip carry the same noise at the same time; the DMD and critic losses equal the GAN-free ones."""
    g = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(4, *CONV_SHAPE, generator=g), "label": torch.randint(0, 2, (4,), generator=g)}
    model, plain = conv_gan_model(GAN_TIME), conv_gan_model(None, gan_loss_weight=0.0)
    plain.load_state_dict(model.state_dict(), strict=False)
    calls, clips = [], []
    discriminate, student_clip = model._discriminate, model.student_clip

    def spy_discriminate(data, x_t, t):
        calls.append((x_t.detach(), t))
        return discriminate(data, x_t, t)

    def spy_student_clip(*args, **kwargs):
        out = student_clip(*args, **kwargs)
        clips.append(out[0].detach())
        return out

    model._discriminate, model.student_clip = spy_discriminate, spy_student_clip
    for it, key, n in ((0, "loss_dmd", 1), (1, "loss_fake_score", 2)):  # a student phase, then a critic phase
        calls.clear(), clips.clear()
        out, _ = model.training_step(batch, it)
        assert len(calls) == n and all(((t >= 0.1) & (t <= 0.2)).all() for _, t in calls)
        assert torch.equal(out[key], plain.training_step(batch, it)[0][key])
    (x_fake, t), (x_real, t_real) = calls
    cos = torch.cos(t).reshape(-1, 1, 1, 1, 1).float()
    assert torch.equal(t, t_real)
    torch.testing.assert_close(x_fake - x_real, cos * (clips[0] - batch["x0"]), rtol=0, atol=1e-5)


def test_bad_taps_fail_at_construction():
    disc = DiscriminatorConfig(kind="conv3d", feature_dim=8, taps=(5,))
    with pytest.raises(IndexError, match="3 blocks"):
        ConvDMD2(TinyConvNet(), "rf_velocity", distill=DMD2Config(gan_loss_weight=1e-3, discriminator=disc))


def test_refine_term_adds_the_weighted_half_mse_to_the_teachers_solve(batch):
    from distill_mixins.methods.refined_kd import refine_times, refine_with_teacher

    plain, refined = make_dmd2(), make_dmd2(refine_weight=5.0, refine_time=0.6, refine_teacher_steps=3)
    refined.load_student_state_dict(plain.net.state_dict())
    refined.net_fake_score.load_state_dict(plain.net_fake_score.state_dict())
    torch.manual_seed(1)
    out_plain, loss_plain = plain.training_step(batch, 0)
    torch.manual_seed(1)
    out, loss = refined.training_step(batch, 0)
    assert "loss_refine" not in out_plain and torch.equal(out["loss_dmd"], out_plain["loss_dmd"])
    data = refined.prepare_data(batch)
    with refined.drawing(0, data.x0.shape[0]):  # the student phase draws its noise first: redraw it
        noise = refined.draws.randn_like(data.x0)
        G = refined.student_sample(data, noise, grad=False)
    target = refine_with_teacher(refined, data, G, noise, refine_times(0.6, 3), refined.distill_config.guidance_scale)
    expected = 0.5 * (G - target).pow(2).mean()
    assert torch.allclose(out["loss_refine"], expected, rtol=1e-5, atol=1e-9)
    assert torch.allclose(loss, loss_plain + 5.0 * expected, rtol=1e-5, atol=1e-8)
    loss.backward()
    assert all(p.grad is not None for p in refined.net.parameters())
