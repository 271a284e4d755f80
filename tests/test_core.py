"""DistillationCoreMixin: networks, phases, freezing, optimizers, EMA, state dicts, sampling."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHAPE, NeuralDistill, make_neural_model, param_hash

from distill_mixins import DistillConfig, EMAConfig, OptimizerConfig
from distill_mixins.testing import MLPDenoiser


def snapshot(model):
    return {name: param_hash(net) for name, net in model.named_children()}


def run_iteration(model, batch, iteration):
    _, loss = model.training_step(batch, iteration)
    loss.backward()
    model.optimizer_step(iteration)


def test_networks_after_construction():
    model = make_neural_model(ema=EMAConfig())
    assert set(dict(model.named_children())) == {"net", "net_teacher", "net_fake_score", "net_ema"}
    assert all(not p.requires_grad for p in model.net_teacher.parameters())
    assert not model.net_teacher.training and not model.net_ema.training
    assert model.net is not model.net_teacher and model.net_fake_score is not model.net_teacher
    # the critic (and the student, before make_neural_model perturbs it) start as copies of the teacher
    assert param_hash(model.net_fake_score) == param_hash(model.net_teacher)
    model.train()
    assert not model.net_teacher.training and not model.net_ema.training


def test_size_distillation_uses_supplied_architectures():
    student = MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=8, depth=1)
    model = make_neural_model(student_net=student, critic_net=lambda: MLPDenoiser(SHAPE, "edm_eps", 2, hidden=16))
    assert model.net is student
    assert model.net_fake_score.head.in_features == 16
    with pytest.raises(ValueError, match="student_net is the teacher"):
        teacher = MLPDenoiser(SHAPE, "edm_eps", 2)
        NeuralDistill(teacher, "edm_eps", distill=DistillConfig(student_net=teacher))


def test_phase_schedule_1_to_4_over_100_iterations():
    model = make_neural_model(student_update_freq=5)
    phases = [model.is_student_phase(i) for i in range(100)]
    assert sum(phases) == 20 and len(phases) - sum(phases) == 80
    assert [i for i in range(10) if phases[i]] == [0, 5]


def test_warmup_iterations_are_student_only():
    model = make_neural_model(student_update_freq=5, warmup_student_iters=7)
    assert all(model.is_student_phase(i) for i in range(7))
    assert [i for i in range(7, 20) if model.is_student_phase(i)] == [10, 15]


def test_only_the_phase_networks_change(batch):
    model = make_neural_model(ema=EMAConfig(halflife_steps=2.0))
    teacher_hash = param_hash(model.net_teacher)
    for iteration in range(12):
        before = snapshot(model)
        run_iteration(model, batch, iteration)
        after = snapshot(model)
        changed = {name for name in before if before[name] != after[name]}
        if model.is_student_phase(iteration):
            assert changed == {"net", "net_ema"}, (iteration, changed)
        else:
            assert changed == {"net_fake_score"}, (iteration, changed)
        assert param_hash(model.net_teacher) == teacher_hash


def test_freezing_is_per_phase(batch):
    model = make_neural_model()
    model.training_step(batch, 0)
    assert all(p.requires_grad for p in model.net.parameters())
    assert not any(p.requires_grad for p in model.net_fake_score.parameters())
    assert model.net.training and not model.net_fake_score.training
    model.training_step(batch, 1)
    assert not any(p.requires_grad for p in model.net.parameters())
    assert all(p.requires_grad for p in model.net_fake_score.parameters())
    assert not model.net.training and model.net_fake_score.training


def test_get_optimizers_returns_only_the_current_phase():
    model = make_neural_model(critic_optimizer=OptimizerConfig(lr=2e-7), student_optimizer=OptimizerConfig(lr=1e-6))
    (student_opt,) = model.get_optimizers(0)
    (critic_opt,) = model.get_optimizers(1)
    assert student_opt.param_groups[0]["lr"] == 1e-6 and critic_opt.param_groups[0]["lr"] == 2e-7
    assert {id(p) for p in student_opt.param_groups[0]["params"]} == {id(p) for p in model.net.parameters()}
    assert len(model.get_lr_schedulers(0)) == 1 and model.get_lr_schedulers(0)[0].optimizer is student_opt


def scheduled_lrs(optimizer: OptimizerConfig, steps: int) -> list[float]:
    """The student's learning rate at each of ``steps`` optimizer steps of a model built with ``optimizer``."""
    model = make_neural_model(student_update_freq=1, student_optimizer=optimizer)
    opt = model.get_optimizers(0)[0]
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        model.get_lr_schedulers(0)[0].step()
    return lrs


def test_lr_warmup_is_linear():
    assert scheduled_lrs(OptimizerConfig(lr=1.0, warmup_iters=4), 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_lr_decay_after_the_warmup():
    """Cosine and linear decays reach min_lr_ratio at decay_iters and stay; the scheduler follows lr_factor."""
    cosine = OptimizerConfig(lr=1.0, warmup_iters=2, decay="cosine", decay_iters=6, min_lr_ratio=0.2)
    assert [cosine.lr_factor(n) for n in range(8)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.2 + 0.8 * (0.5 + 0.5 * math.cos(math.pi / 4)), 0.6,
         0.2 + 0.8 * (0.5 - 0.5 * math.cos(math.pi / 4)), 0.2, 0.2])
    linear = OptimizerConfig(lr=1.0, decay="linear", decay_iters=4)
    assert [linear.lr_factor(n) for n in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert scheduled_lrs(linear, 6) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


@pytest.mark.parametrize(("fields", "named"), [
    ({"decay": "exp", "decay_iters": 10}, "OptimizerConfig.decay"),
    ({"decay": "cosine"}, "OptimizerConfig.decay_iters"),
    ({"decay": "linear", "warmup_iters": 10, "decay_iters": 10}, "OptimizerConfig.decay_iters"),
    ({"min_lr_ratio": 1.5}, "OptimizerConfig.min_lr_ratio"),
])
def test_lr_decay_fields_are_checked(fields, named):
    with pytest.raises(ValueError, match=named):
        OptimizerConfig(**fields)


def test_ema_moves_only_in_student_phases(batch):
    model = make_neural_model(ema=EMAConfig(kind="halflife", halflife_steps=1.0))
    for iteration in range(10):
        before = param_hash(model.net_ema)
        run_iteration(model, batch, iteration)
        assert (param_hash(model.net_ema) != before) == model.is_student_phase(iteration)
    assert int(model.ema_num_updates) == 2


def test_ema_halflife_known_answer():
    model = make_neural_model(student_update_freq=1, ema=EMAConfig(kind="halflife", halflife_steps=1.0))
    with torch.no_grad():
        for p in model.net_ema.parameters():
            p.zero_()
        for p in model.net.parameters():
            p.fill_(1.0)
    model.update_ema(0)
    model.update_ema(1)
    # beta = 0.5 per update: 0 -> 0.5 -> 0.75
    assert all(torch.allclose(p, torch.full_like(p, 0.75)) for p in model.net_ema.parameters())


def test_ema_power_form_known_answer():
    config = EMAConfig(kind="power", gamma=1.0)
    assert config.beta(1) == 0.0  # first update copies the student
    assert config.beta(4) == pytest.approx((3 / 4) ** 2)
    model = make_neural_model(student_update_freq=1, ema=config)
    with torch.no_grad():
        for p in model.net.parameters():
            p.fill_(2.0)
    model.update_ema(0)
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in model.net_ema.parameters())


def test_nonfinite_gradients_are_zeroed_and_counted(batch):
    model = make_neural_model(student_update_freq=1)
    _, loss = model.training_step(batch, 0)
    (loss * float("nan")).backward()
    before = param_hash(model.net)
    norms = model.clip_gradients(0)
    assert math.isnan(norms["net"])
    assert model.nonfinite_grad_counts == {"net": 1, "net_fake_score": 0}
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.net.parameters())
    assert param_hash(model.net) == before


def test_gradient_clipping_bounds_the_norm(batch):
    model = make_neural_model(student_update_freq=1, student_optimizer=OptimizerConfig(grad_clip=1e-3))
    _, loss = model.training_step(batch, 0)
    (loss * 1e3).backward()
    norm_before = model.clip_gradients(0)["net"]
    norm_after = torch.nn.utils.get_total_norm([p.grad for p in model.net.parameters()])
    assert norm_before > 1e-3 and float(norm_after) == pytest.approx(1e-3, rel=1e-4)


def test_state_dict_never_contains_the_teacher():
    model = make_neural_model(ema=EMAConfig())
    state = model.state_dict()
    assert state and not any(k.startswith("net_teacher.") for k in state)
    assert {k.split(".")[0] for k in state} == {"net", "net_fake_score", "net_ema", "ema_num_updates"}
    wrapped = torch.nn.ModuleDict({"model": model}).state_dict()
    assert wrapped and not any(".net_teacher." in k for k in wrapped)


def test_state_dict_round_trip_and_teacher_untouched(batch):
    source = make_neural_model()
    for iteration in range(3):
        run_iteration(source, batch, iteration)
    target = make_neural_model()
    teacher_hash = param_hash(target.net_teacher)
    target.load_state_dict(source.state_dict())
    assert param_hash(target.net) == param_hash(source.net)
    assert param_hash(target.net_fake_score) == param_hash(source.net_fake_score)
    assert param_hash(target.net_teacher) == teacher_hash
    with pytest.raises(ValueError, match="teacher"):
        target.load_state_dict({**source.state_dict(), "net_teacher.head.bias": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("net_fake")})


def test_generate_is_deterministic_given_a_generator():
    model = make_neural_model(student_schedule="cosmos_4step")
    noise = torch.randn(3, *SHAPE)
    a = model.generate(torch.zeros(3, dtype=torch.long), noise, generator=torch.Generator().manual_seed(1))
    b = model.generate(torch.zeros(3, dtype=torch.long), noise, generator=torch.Generator().manual_seed(1))
    c = model.generate(torch.zeros(3, dtype=torch.long), noise, generator=torch.Generator().manual_seed(2))
    assert a.shape == noise.shape and torch.equal(a, b) and not torch.equal(a, c)
    # EDM host (sigma_data = 0.5): sigma [80 (not inf), 15, 5, 5/3], t = atan(sigma / sigma_data)
    expected = [math.atan(80 / 0.5), math.atan(15 / 0.5), math.atan(5 / 0.5), math.atan(5 / 3 / 0.5)]
    assert model.student_times().tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="EMA"):
        model.generate(torch.zeros(3, dtype=torch.long), noise, use_ema=True)


def test_student_phase_only_method_rejects_update_freq():
    class GeneratorOnly(NeuralDistill):
        uses_critic = False

    net = MLPDenoiser(SHAPE, "edm_eps", 2)
    with pytest.raises(ValueError, match="student_update_freq=5"):
        GeneratorOnly(net, "edm_eps", distill=DistillConfig(student_update_freq=5))
    model = GeneratorOnly(net, "edm_eps", distill=DistillConfig())
    assert "net_fake_score" not in dict(model.named_children())
    assert all(model.is_student_phase(i) for i in range(5))


def test_parameterless_teacher_needs_a_student_architecture(mixture):
    from distill_mixins.testing import analytic_host_args

    with pytest.raises(ValueError, match=r"no parameters to train .* set DistillConfig.student_net"):
        NeuralDistill(**analytic_host_args(mixture, "edm_eps"), distill=DistillConfig())


def test_nonfinite_network_is_not_stepped(batch):
    model = make_neural_model(student_update_freq=1, student_optimizer=OptimizerConfig(weight_decay=0.5))
    _, loss = model.training_step(batch, 0)
    (loss * float("inf")).backward()
    before = param_hash(model.net)
    model.optimizer_step(0)
    assert param_hash(model.net) == before  # no weight decay either
    assert all(p.grad is None for p in model.net.parameters())


def test_sample_t_is_capped_for_edm_hosts():
    from distill_mixins import TimeSamplerConfig

    model = make_neural_model()
    t = model.sample_t(10_000, TimeSamplerConfig(kind="uniform", t_min=1.5, t_max=math.pi / 2))
    assert float(t.max()) == pytest.approx(math.atan(80 / 0.5)) and float(t.min()) >= 1.5


def test_loading_through_a_wrapper_keeps_the_teacher_and_refuses_teacher_keys(batch):
    source, target = make_neural_model(), make_neural_model()
    run_iteration(source, batch, 0)
    teacher_hash = param_hash(target.net_teacher)
    wrapped_target = torch.nn.ModuleDict({"module": target})
    wrapped_target.load_state_dict(torch.nn.ModuleDict({"module": source}).state_dict())  # strict
    assert param_hash(target.net) == param_hash(source.net) and param_hash(target.net_teacher) == teacher_hash
    leaked = {**wrapped_target.state_dict(), "module.net_teacher.head.bias": torch.zeros(8)}
    with pytest.raises(ValueError, match="teacher weights"):
        wrapped_target.load_state_dict(leaked)
    assert param_hash(target.net_teacher) == teacher_hash


def test_bf16_student_keeps_a_float32_ema_that_moves():
    teacher = MLPDenoiser(SHAPE, "edm_eps", 2)
    student = MLPDenoiser(SHAPE, "edm_eps", 2).to(torch.bfloat16)
    config = DistillConfig(student_net=student, ema=EMAConfig(kind="halflife", halflife_steps=500.0))
    model = NeuralDistill(teacher, "edm_eps", distill=config)
    assert all(p.dtype == torch.float32 for p in model.net_ema.parameters())
    with torch.no_grad():  # the student sits one small bf16 step above its EMA
        for p_ema, p in zip(model.net_ema.parameters(), model.net.parameters(), strict=True):
            p_ema.copy_(p.float())
            p.add_(2.0**-6)
    before = [p.clone() for p in model.net_ema.parameters()]
    for iteration in range(10):
        model.update_ema(iteration)  # 1 - beta = 0.0014: below bf16 resolution, fine in float32
    assert all(not torch.equal(a, b) for a, b in zip(before, model.net_ema.parameters(), strict=True))


def test_parameters_frozen_on_purpose_stay_frozen(batch):
    torch.manual_seed(0)
    teacher = MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=32, depth=2)
    teacher.label_embedding.requires_grad_(False)  # e.g. a frozen embedder inside the network
    model = NeuralDistill(teacher, "edm_eps", distill=DistillConfig(student_update_freq=1))
    frozen = param_hash(model.net.label_embedding)
    for iteration in range(3):
        with torch.no_grad():
            model.net.head.bias.add_(0.1)
        run_iteration(model, batch, iteration)
    assert param_hash(model.net.label_embedding) == frozen
    assert not model.net.label_embedding.weight.requires_grad and model.net.head.weight.requires_grad


def test_scheduler_and_ema_do_not_advance_without_gradients():
    model = make_neural_model(
        student_update_freq=1, ema=EMAConfig(), student_optimizer=OptimizerConfig(lr=1.0, warmup_iters=4)
    )
    for iteration in range(3):
        model.optimizer_step(iteration)  # no backward: no gradients
    assert model.get_optimizers(0)[0].param_groups[0]["lr"] == pytest.approx(0.25)
    assert int(model.ema_num_updates) == 0


def test_schedule_that_collapses_at_the_edm_cap_is_refused():
    model = make_neural_model(student_schedule=(math.pi / 2, 1.569, 1.0))
    with pytest.raises(ValueError, match="not strictly descending after capping"):
        model.student_times()


def test_one_teacher_serves_two_models_in_turn(batch):
    """KD then DMD2 from the same teacher instance: the second model's copies of the teacher (student, critic) load
    their own weights; the shared teacher keeps one load guard and still refuses teacher keys."""
    first = make_neural_model()
    run_iteration(first, batch, 0)
    teacher = first.net_teacher
    second = NeuralDistill(teacher, "edm_eps", distill=DistillConfig(student_update_freq=5))
    second.load_student_state_dict(first.net.state_dict())
    assert param_hash(second.net) == param_hash(first.net) != param_hash(teacher)
    second.net_fake_score.load_state_dict(first.net_fake_score.state_dict())
    from distill_mixins.core import _keep_teacher_on_load

    guards = [h for h in teacher._load_state_dict_pre_hooks.values() if getattr(h, "hook", h) is _keep_teacher_on_load]
    assert len(guards) == 1 and not second.net._load_state_dict_pre_hooks
    with pytest.raises(ValueError, match="teacher weights"):
        second.load_state_dict({**second.state_dict(), "net_teacher.head.bias": torch.zeros(8)})
