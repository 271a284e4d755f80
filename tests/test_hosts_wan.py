"""WanVideo2WorldHost: a tiny random diffusers WanTransformer3DModel as a KD / DMD2 teacher.

Phases, save/load, parity with FlowMatchEulerDiscreteScheduler (1000 tau timesteps), the two Video2World
layouts (Wan 2.2 expand_timesteps, Wan 2.1 I2V channel concat), feature taps, R1, loading, gradient
checkpointing, the umT5-style text conditioner, and the ImportError without diffusers.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("diffusers")  # the [diffusers] extra (installed by `make test`)

from distill_mixins import DMD2Mixin, FrameConditioning, KDConfig, KDMixin
from distill_mixins.hosts import ByteTokenizer, TextConditioner, VideoCondition, WanImageCondition, WanVideo2WorldHost
from tests.hosts_helpers import (
    SHAPE,
    TAU_C,
    TEXT_DIM,
    TEXT_LEN,
    WIDTH,
    B,
    C,
    H,
    T,
    W,
    adam,
    batch,
    check_dmd2_phases,
    check_gradient_checkpointing,
    check_kd_step,
    check_loading,
    check_save_load,
    check_taps_leave_output_unchanged,
    dmd2_config,
    gan_config,
    sampler_gap,
    scheduler_x0_gap,
    tiny_wan,
)

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

MASK_CHANNELS = 4  # Wan 2.1 I2V: 36 = 2 * 16 + 4
IMAGE_DIM, IMAGE_TOKENS = 8, 5


class WanKD(KDMixin, WanVideo2WorldHost):
    """KD onto the Wan host."""


class WanDMD2(DMD2Mixin, WanVideo2WorldHost):
    """DMD2 onto the Wan host."""


def make_kd(config: KDConfig | None = None, **host_args) -> WanKD:
    return WanKD(tiny_wan(), distill=config or KDConfig(student_optimizer=adam()), **host_args)


def make_dmd2() -> WanDMD2:
    return WanDMD2(tiny_wan(), distill=dmd2_config(source="teacher"))


def tiny_wan_i2v(**overrides):
    """Wan 2.1 I2V layout: latents + 4 mask channels + condition latents in, CLIP image tokens cross-attended."""
    return tiny_wan(in_channels=2 * C + MASK_CHANNELS, image_dim=IMAGE_DIM, added_kv_proj_dim=WIDTH, **overrides)


def pipeline_velocity(net, latents, scheduler, i, prompt_embeds):
    """The transformer call of WanPipeline.__call__ (no expand_timesteps): timestep = t.expand(B)."""
    t = scheduler.timesteps[i]
    return net(
        hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=prompt_embeds,
        return_dict=False,
    )[0]


def capture(net) -> dict:
    seen: dict = {}
    net.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


# ------------------------------------------------------------------------------------------------ methods


def test_kd_step_has_a_finite_loss_and_trains_only_the_student():
    check_kd_step(make_kd())


def test_dmd2_phases_with_gan_heads_on_teacher_blocks_change_only_their_networks():
    check_dmd2_phases(make_dmd2())


def test_save_load_gives_bit_identical_student_samples():
    check_save_load(make_dmd2)


def test_r1_through_the_transformer_needs_the_math_attention_kernel():
    model = WanDMD2(tiny_wan(), distill=dmd2_config(discriminator=gan_config("teacher", r1_weight=0.1)))
    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward (docs/distill_your_model.md)
        out, loss = model.training_step(batch(5), 1)
    loss.backward()
    assert out["loss_r1"] > 0 and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net_discriminator.parameters())


# ------------------------------------------------------------------------------------------------- parity


def test_host_x0_equals_the_flow_match_scheduler_x0():
    gap, _ = scheduler_x0_gap(make_kd(), pipeline_velocity)
    print(f"Wan: max |x0_host - x0 of FlowMatchEulerDiscreteScheduler.step| = {gap:.2e} (float32 transformer)")
    assert gap < 1e-5
    gap, rule_gap = scheduler_x0_gap(WanKD(tiny_wan(), distill=KDConfig()).double(), pipeline_velocity)
    print(f"Wan float64: step (computes in float32) {gap:.2e}, update rule x - sigma v {rule_gap:.2e}")
    assert gap < 1e-5 and rule_gap < 1e-12


def test_few_step_sampling_equals_the_diffusers_euler_loop():
    gap = sampler_gap(make_kd, pipeline_velocity)
    print(f"Wan: max |generate(renoise='ode') - scheduler.step loop| over 4 steps = {gap:.2e}")
    assert gap < 1e-5


def test_expand_timesteps_inputs_give_each_frames_tokens_their_time():
    model = make_kd()
    assert model.conditioning == "expand_timesteps" and model.supports_per_frame_time
    seen = capture(model.net_teacher)
    x0, condition, _ = model.get_data_and_condition(batch(1))
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    x_t = torch.randn(SHAPE, dtype=torch.float64)
    model.trigflow_denoise(model.net_teacher, x_t, t, condition)
    tau = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    tokens = (H // 2) * (W // 2)
    expected = torch.cat([torch.full((B, tokens), 1000 * TAU_C, dtype=torch.float64),
                          (1000 * tau)[:, None].expand(B, (T - 1) * tokens)], 1)
    assert seen["timestep"].shape == (B, T * tokens)
    assert torch.allclose(seen["timestep"].double(), expected, rtol=1e-6, atol=0)
    assert torch.allclose(seen["hidden_states"][:, :, 0].double(), (1 - TAU_C) * x0[:, :, 0].double(), atol=1e-6)
    text_to_video = model.build_condition(condition.encoder_hidden_states, x0, 0)
    model.trigflow_denoise(model.net_teacher, x_t, t, text_to_video)
    assert seen["timestep"].shape == (B,) and torch.allclose(seen["timestep"].double(), 1000 * tau, rtol=1e-6)
    assert seen["encoder_hidden_states_image"] is None


def test_channel_concat_i2v_layout_gets_mask_and_condition_channels_and_is_not_pasted():
    model = WanKD(tiny_wan_i2v(), distill=KDConfig(student_optimizer=adam()))
    assert model.conditioning == "channel_concat" and not model.supports_per_frame_time
    g = torch.Generator().manual_seed(2)
    image_embeds = torch.randn(B, IMAGE_TOKENS, IMAGE_DIM, generator=g)
    data = {**batch(2, kd=True), "image_embeds": image_embeds}
    x0, condition, uncondition = model.get_data_and_condition(data)
    assert isinstance(condition, WanImageCondition) and not isinstance(condition, FrameConditioning)
    assert torch.equal(uncondition.image_embeds, image_embeds)  # CFG changes the text only
    seen = capture(model.net_teacher)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    x_t = torch.randn(SHAPE, dtype=torch.float64)
    model.trigflow_denoise(model.net_teacher, x_t, t, condition)
    hidden = seen["hidden_states"]
    assert hidden.shape == (B, 2 * C + MASK_CHANNELS, T, H, W)
    x_native = (x_t / (torch.cos(t) + torch.sin(t)).reshape(-1, 1, 1, 1, 1)).float()
    assert torch.allclose(hidden[:, :C], x_native, atol=1e-6)  # frame 0 stays noisy, as in the pipeline
    mask = hidden[:, C:C + MASK_CHANNELS]
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    assert torch.equal(hidden[:, C + MASK_CHANNELS:, 0], x0[:, :, 0]) and hidden[:, C + MASK_CHANNELS:, 1:].eq(0).all()
    tau = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    assert seen["timestep"].shape == (B,) and torch.allclose(seen["timestep"].double(), 1000 * tau, rtol=1e-6)
    assert torch.equal(seen["encoder_hidden_states_image"], image_embeds)
    _, loss = model.training_step(data, 0)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="image_dim=8: it needs CLIP image embeddings"):
        model.training_step(batch(2, kd=True), 0)


# ------------------------------------------------------------------------------------- taps and loading


def test_feature_taps_leave_the_output_bit_identical_and_are_removed():
    check_taps_leave_output_unchanged(WanVideo2WorldHost(tiny_wan()))


def test_loading_from_a_diffusers_folder_and_a_safetensors_file(tmp_path):
    check_loading(WanVideo2WorldHost, tiny_wan(seed=4), tmp_path)


def test_bf16_loading_keeps_the_float32_modules(tmp_path):
    from distill_mixins.hosts import load_transformer

    net = tiny_wan(seed=4)
    net.save_pretrained(tmp_path)
    loaded = load_transformer(type(net), tmp_path, torch_dtype=torch.bfloat16)
    assert loaded.scale_shift_table.dtype == torch.float32  # listed in _keep_in_fp32_modules
    assert loaded.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.proj_out.weight, net.proj_out.weight.bfloat16())


def test_gradient_checkpointing_switch_keeps_the_gradients():
    check_gradient_checkpointing(make_kd)


def test_contract_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"List the mixins first: class Bad\(KDMixin, WanVideo2WorldHost\)"):
        type("Bad", (WanVideo2WorldHost, KDMixin), {})
    with pytest.raises(ValueError, match="fit neither Wan layout"):
        WanVideo2WorldHost(tiny_wan(in_channels=C + 2))
    with pytest.raises(TypeError, match="needs a WanImageCondition condition"):
        host = WanVideo2WorldHost(tiny_wan_i2v())
        condition = VideoCondition(torch.randn(B, TEXT_LEN, TEXT_DIM), torch.randn(SHAPE), torch.ones(B, 1, T, 1, 1))
        host.predict(host.net, torch.randn(SHAPE), torch.rand(B), condition)


# -------------------------------------------------------------------------------------------- conditioner


def test_byte_tokenizer_known_ids_padding_and_truncation():
    tokens = ByteTokenizer()(["hi", "abcdef"], max_length=4)
    assert tokens["input_ids"].tolist() == [[3 + 104, 3 + 105, 1, 0], [3 + 97, 3 + 98, 3 + 99, 1]]
    assert tokens["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_wan_style_conditioner_zero_pads_after_the_prompt_and_feeds_the_teacher():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(6)
    encoder = T5EncoderModel(T5Config(vocab_size=259, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    conditioner = TextConditioner(encoder, ByteTokenizer(), max_length=TEXT_LEN)
    emb = conditioner.encode(["cat", "a dog"])
    tokens = ByteTokenizer()(["cat", "a dog"], max_length=TEXT_LEN)
    direct = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    for row, n in enumerate([len("cat") + 1, len("a dog") + 1]):  # bytes + end token
        assert torch.equal(emb[row, :n], direct[row, :n]) and emb[row, n:].eq(0).all()
    model = WanKD(tiny_wan(), conditioner=conditioner, distill=KDConfig())
    data = {"x0": torch.randn(SHAPE), "prompt": ["cat", "a dog"], "noise": torch.randn(SHAPE),
            "teacher_x0": torch.randn(SHAPE)}
    _, condition, uncondition = model.get_data_and_condition(data)
    assert torch.equal(condition.encoder_hidden_states, emb)
    assert torch.allclose(uncondition.encoder_hidden_states, conditioner.encode(["", ""]), atol=1e-6)
    assert torch.isfinite(model.training_step(data, 0)[1])


# ----------------------------------------------------------------------------------------------- packaging


def _ours(name: str) -> bool:
    return name == "distill_mixins" or name.startswith("distill_mixins.")


def test_without_diffusers_the_package_imports_and_hosts_name_the_extra():
    saved = {name: module for name, module in sys.modules.items() if _ours(name) or name == "diffusers"}
    try:
        for name in saved:
            del sys.modules[name]
        sys.modules["diffusers"] = None  # import diffusers -> ImportError
        core = importlib.import_module("distill_mixins")  # a fresh import of the package without diffusers
        assert core.DMD2Mixin is not saved["distill_mixins"].DMD2Mixin
        with pytest.raises(ImportError, match=r"hosts needs diffusers.*pip install 'distill-mixins\[diffusers\]'"):
            importlib.import_module("distill_mixins.hosts")
    finally:
        for name in [name for name in sys.modules if _ours(name) or name == "diffusers"]:
            del sys.modules[name]
        sys.modules.update(saved)
