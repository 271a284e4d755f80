"""Shared pieces of the diffusers host tests: tiny random-weight transformers built in code (no downloads),
batches, and checks that every host must pass (phases, save/load, parity with FlowMatchEulerDiscreteScheduler,
feature taps, loading, gradient checkpointing)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from diffusers import CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from distill_mixins import DiscriminatorConfig, DMD2Config, KDConfig, OptimizerConfig
from distill_mixins.discriminator import FeatureTaps
from distill_mixins.trigflow import native_to_trigflow_state, native_to_trigflow_time
from tests.conftest import param_hash

B, C, T, H, W = 2, 4, 3, 8, 8
TEXT_LEN, TEXT_DIM = 7, 16
HEADS, HEAD_DIM = 2, 12
WIDTH = HEADS * HEAD_DIM  # width of the transformer blocks' token features
SHAPE = (B, C, T, H, W)
TAU_C = 1e-4 / (1 + 1e-4)  # RF time of the conditioning frames at the default conditional_sigma (EDM 1e-4)

Net = torch.nn.Module
PipelineVelocity = Callable[[Net, torch.Tensor, FlowMatchEulerDiscreteScheduler, int, torch.Tensor], torch.Tensor]
"""``(net, latents, scheduler, i, prompt_embeds) -> velocity``: the transformer call of a diffusers pipeline."""


def tiny_cosmos(seed: int = 0, **overrides) -> CosmosTransformer3DModel:
    """A 2-block Cosmos Predict2.5-style Video2World DiT (in_channels = C + 1) with random weights."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=C + 1, out_channels=C, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2,
        mlp_ratio=2.0, text_embed_dim=TEXT_DIM, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable",
    )
    return CosmosTransformer3DModel(**{**config, **overrides})


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A 2-block Wan DiT (in_channels = out_channels: T2V / Wan 2.2 TI2V layout) with random weights."""
    torch.manual_seed(seed)
    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    return WanTransformer3DModel(**{**config, **overrides})


def batch(seed: int = 0, *, kd: bool = False) -> dict[str, torch.Tensor]:
    """``{"x0", "prompt_embeds"}`` (+ ``noise``, ``teacher_x0`` for KD) of shape SHAPE / (B, TEXT_LEN, TEXT_DIM)."""
    g = torch.Generator().manual_seed(seed)
    out = {"x0": torch.randn(SHAPE, generator=g), "prompt_embeds": torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)}
    if kd:
        out["noise"] = torch.randn(SHAPE, generator=g)
        out["teacher_x0"] = torch.randn(SHAPE, generator=g)
    return out


def adam(lr: float = 1e-3) -> OptimizerConfig:
    return OptimizerConfig(name="adam", lr=lr, weight_decay=0.0)


def gan_config(source: str, r1_weight: float = 0.0) -> DiscriminatorConfig:
    """Query-attention GAN heads on the token features (B, N, WIDTH) of blocks 0 and -1."""
    return DiscriminatorConfig(
        kind="attention", feature_dim=WIDTH, taps=(0, -1), source=source, hidden=16, heads=2, r1_weight=r1_weight
    )


def dmd2_config(source: str = "teacher", **overrides) -> DMD2Config:
    values = dict(
        gan_loss_weight=1e-2, discriminator=gan_config(source), guidance_scale=2.0, student_optimizer=adam(),
        critic_optimizer=adam(), discriminator_optimizer=adam(),
    )
    return DMD2Config(**{**values, **overrides})


def hooks_left(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# ------------------------------------------------------------------------------------------------ checks


def check_kd_step(model) -> None:
    """One KD step: finite loss, gradients on the student only, and the student moves."""
    student, teacher = param_hash(model.net), param_hash(model.net_teacher)
    out, loss = model.training_step(batch(1, kd=True), 0)
    assert torch.isfinite(loss) and loss.item() > 0 and set(out) == {"loss_kd", "t_mean"}
    loss.backward()
    assert all(p.grad is None for p in model.net_teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    model.optimizer_step(0)
    assert param_hash(model.net) != student and param_hash(model.net_teacher) == teacher


def check_dmd2_phases(model, iterations: int = 6) -> None:
    """Student phases change only ``net``, critic phases only the critic and the GAN heads; the teacher never
    changes; every loss is finite; no feature-tap hook is left behind."""
    teacher = param_hash(model.net_teacher)
    for it in range(iterations):
        before = {name: param_hash(net) for name, net in model.trainable_networks().items()}
        out, loss = model.training_step(batch(10 + it), it)
        student_phase = it % 5 == 0
        keys = {"loss_dmd", "loss_gan_generator"} if student_phase else {"loss_fake_score", "loss_gan_discriminator"}
        assert keys <= set(out) and all(torch.isfinite(v) for v in out.values()) and torch.isfinite(loss), out
        loss.backward()
        model.optimizer_step(it)
        changed = {name for name, net in model.trainable_networks().items() if param_hash(net) != before[name]}
        assert changed == ({"net"} if student_phase else {"net_fake_score", "net_discriminator"}), (it, changed)
        assert param_hash(model.net_teacher) == teacher
        assert hooks_left(model) == 0


def check_save_load(make_model: Callable[[], torch.nn.Module]) -> None:
    """state_dict -> a fresh model -> bit-identical student samples (and different ones before loading)."""
    model = make_model()
    for it in range(2):  # a student step, then a critic step
        _, loss = model.training_step(batch(20 + it), it)
        loss.backward()
        model.optimizer_step(it)
    state = model.state_dict()
    assert not any(k.startswith("net_teacher.") for k in state)
    assert not any("conditioner" in k for k in state)
    fresh = make_model()
    condition = fresh.get_data_and_condition(batch(30))[1]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(31))
    expected = model.generate(condition, noise)
    assert not torch.equal(fresh.generate(condition, noise), expected)  # the trained student differs
    fresh.load_state_dict(state)
    assert torch.equal(fresh.generate(condition, noise), expected)
    assert all(param_hash(getattr(fresh, n)) == param_hash(getattr(model, n)) for n in model.trainable_networks())


def scheduler_x0_gap(
    model, pipeline_velocity: PipelineVelocity, shift: float = 5.0, steps: int = 6
) -> tuple[float, float]:
    """Largest |x0_host - x0_scheduler| over a shifted FlowMatchEulerDiscreteScheduler grid (text-to-world).

    The scheduler side: ``x = scale_noise(x0, t, eps)`` (float64), the velocity from the transformer called as the
    diffusers pipeline calls it, and x0 from the scheduler's own Euler step to sigma = 0 (which computes in
    float32), and from its update rule ``x + (0 - sigma) v`` in the model's precision. The host side: the same
    state in TrigFlow, through ``trigflow_denoise`` (the host's ``predict`` and the library's conversion).
    Returns ``(gap to scheduler.step, gap to the update rule)``.
    """
    dtype = next(model.net_teacher.parameters()).dtype
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(40)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    embeds = torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    condition = model.build_condition(embeds, torch.zeros(SHAPE), 0)
    gaps, rule_gaps = [], []
    for i in range(steps):
        sigma, timestep = sched.sigmas[i], sched.timesteps[i]
        x = sched.scale_noise(x0, timestep.expand(B), eps)  # (1 - sigma) x0 + sigma eps
        with torch.no_grad():
            velocity = pipeline_velocity(model.net_teacher, x.to(dtype), sched, i, embeds.to(dtype))
        final = FlowMatchEulerDiscreteScheduler(shift=1.0)
        final.set_timesteps(sigmas=[float(sigma)])  # sigmas [sigma, 0]: one step lands on x0
        x0_sched = final.step(velocity, final.timesteps[0], x.to(dtype), return_dict=False)[0]
        x0_rule = x.to(dtype) + (final.sigmas[1] - final.sigmas[0]).to(dtype) * velocity
        t = native_to_trigflow_time(sigma.double().expand(B), "rectified_flow", 1.0)
        x_t = native_to_trigflow_state(x, t, "rectified_flow", 1.0)
        with torch.no_grad():
            x0_host = model.trigflow_denoise(model.net_teacher, x_t, t, condition).x0
        gaps.append(float((x0_host - x0_sched.double()).abs().max()))
        rule_gaps.append(float((x0_host - x0_rule.double()).abs().max()))
    return max(gaps), max(rule_gaps)


def sampler_gap(make_kd: Callable[..., torch.nn.Module], pipeline_velocity: PipelineVelocity, shift: float = 5.0,
                steps: int = 4) -> float:
    """|library few-step sample - diffusers Euler loop| with the same grid: ``generate`` with ``renoise="ode"``
    (DDIM on the x0 prediction, which is the RF Euler step) vs ``scheduler.step`` over the pipeline's calls."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ts = native_to_trigflow_time(sched.sigmas[:-1].double(), "rectified_flow", 1.0)
    model = make_kd(KDConfig(student_schedule=tuple(ts.tolist()), renoise="ode"))
    g = torch.Generator().manual_seed(50)
    noise = torch.randn(SHAPE, generator=g)
    embeds = torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    sample = model.generate(model.build_condition(embeds, torch.zeros(SHAPE), 0), noise)
    latents = noise
    with torch.no_grad():
        for i, timestep in enumerate(sched.timesteps):
            velocity = pipeline_velocity(model.net_teacher, latents, sched, i, embeds)
            latents = sched.step(velocity, timestep, latents, return_dict=False)[0]
    return float((sample - latents).abs().max())


def check_taps_leave_output_unchanged(host) -> None:
    """Feature taps on the host's blocks record (B, N, WIDTH) tokens, leave predict bit-identical, and go away."""
    g = torch.Generator().manual_seed(60)
    x = torch.randn(SHAPE, generator=g)
    time = torch.rand(B, generator=g).double()
    condition = host.build_condition(torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(SHAPE, generator=g))
    with torch.no_grad():
        expected = host.predict(host.net, x, time, condition)
        blocks = host.feature_blocks(host.net)
        with FeatureTaps(blocks, [0, -1]) as taps:
            assert hooks_left(host.net) == 2
            out = host.predict(host.net, x, time, condition)
    assert torch.equal(out, expected)
    assert [tuple(f.shape) for f in taps.features] == [(B, T * (H // 2) * (W // 2), WIDTH)] * 2
    assert not torch.equal(taps.features[0], taps.features[1])
    assert hooks_left(host.net) == 0 and all(not block._forward_hooks for block in blocks)


def check_loading(host_class, net: torch.nn.Module, tmp_path) -> None:
    """from_pretrained of a save_pretrained folder, of its safetensors file, and of a lone file with config=
    give bit-identical outputs to the saved model; mismatched keys and a missing config are named."""
    from safetensors.torch import save_file

    folder = tmp_path / "transformer"
    net.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    lone = tmp_path / "teacher.safetensors"
    lone.write_bytes(weights.read_bytes())
    hosts = [
        host_class.from_pretrained(tmp_path, subfolder="transformer"),
        host_class.from_pretrained(weights),
        host_class.from_pretrained(lone, config=dict(net.config)),
    ]
    reference = host_class(copy.deepcopy(net))
    g = torch.Generator().manual_seed(70)
    x, time = torch.randn(SHAPE, generator=g), torch.rand(B, generator=g)
    condition = reference.build_condition(torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(SHAPE))
    with torch.no_grad():
        expected = reference.predict(reference.net, x, time, condition)
        for host in hosts:
            assert torch.equal(host.predict(host.net, x, time, condition), expected)
    state = dict(net.state_dict())
    dropped = sorted(state)[0]
    del state[dropped]
    state["junk.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    import pytest

    with pytest.raises(ValueError, match=rf"missing keys {dropped}; unexpected keys junk.weight"):
        host_class.from_pretrained(bad, config=dict(net.config))
    with pytest.raises(FileNotFoundError, match="pass config="):
        host_class.from_pretrained(bad)


def check_gradient_checkpointing(make_kd: Callable[..., torch.nn.Module]) -> None:
    """The switch reaches every transformer (teacher, student) and leaves the loss and gradients unchanged."""
    grads = []
    for enabled in (False, True):
        model = make_kd(KDConfig(student_optimizer=adam()), gradient_checkpointing=enabled)
        nets = [model.net, model.net_teacher]
        assert all(net.gradient_checkpointing is enabled for net in nets)
        torch.manual_seed(0)
        _, loss = model.training_step(batch(80, kd=True), 0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.net.parameters() if p.grad is not None]))
        model.set_gradient_checkpointing(not enabled)
        assert all(net.gradient_checkpointing is (not enabled) for net in nets)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
