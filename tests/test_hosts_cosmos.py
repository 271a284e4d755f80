"""CosmosVideo2WorldHost: a tiny random diffusers CosmosTransformer3DModel as a KD / DMD2 teacher.

Phases, save/load, parity with FlowMatchEulerDiscreteScheduler, the Predict2.5 pipeline's transformer inputs,
feature taps, loading, gradient checkpointing, contract errors, the text conditioner, and the guide's code.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")  # the [diffusers] extra (installed by `make test`)
from diffusers.utils import is_torchvision_available

from distill_mixins import DMD2Mixin, KDConfig, KDMixin
from distill_mixins.hosts import ByteTokenizer, CosmosVideo2WorldHost, TextConditioner, VideoCondition
from tests.hosts_helpers import (
    SHAPE,
    TAU_C,
    TEXT_DIM,
    TEXT_LEN,
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
    sampler_gap,
    scheduler_x0_gap,
    tiny_cosmos,
)

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

DOCS = Path(__file__).resolve().parents[1] / "docs"


class CosmosKD(KDMixin, CosmosVideo2WorldHost):
    """KD onto the Cosmos host."""


class CosmosDMD2(DMD2Mixin, CosmosVideo2WorldHost):
    """DMD2 onto the Cosmos host (the issue's composition)."""


def make_kd(config: KDConfig | None = None, **host_args) -> CosmosKD:
    return CosmosKD(tiny_cosmos(), distill=config or KDConfig(student_optimizer=adam()), **host_args)


def make_dmd2() -> CosmosDMD2:
    return CosmosDMD2(tiny_cosmos(), distill=dmd2_config(source="critic"))


def pipeline_velocity(net, latents, scheduler, i, prompt_embeds):
    """The transformer call of Cosmos2_5_PredictBasePipeline.__call__ (text-to-world: no conditioning frames)."""
    b, _, t, h, w = latents.shape
    cond_indicator = torch.zeros(b, 1, t, 1, 1)
    cond_mask = torch.zeros(b, 1, t, h, w)
    sigma_t = scheduler.sigmas[i].expand(b).to(dtype=torch.float32)
    in_timestep = cond_indicator * 0.0001 + (1 - cond_indicator) * sigma_t.view(b, 1, 1, 1, 1)
    return net(
        hidden_states=latents, condition_mask=cond_mask, timestep=in_timestep, encoder_hidden_states=prompt_embeds,
        padding_mask=latents.new_zeros(1, 1, h, w), return_dict=False,
    )[0]


# ------------------------------------------------------------------------------------------------ methods


def test_kd_step_has_a_finite_loss_and_trains_only_the_student():
    check_kd_step(make_kd())


def test_dmd2_phases_with_gan_heads_on_critic_blocks_change_only_their_networks():
    check_dmd2_phases(make_dmd2())


def test_save_load_gives_bit_identical_student_samples():
    check_save_load(make_dmd2)


# ------------------------------------------------------------------------------------------------- parity


def test_host_x0_equals_the_flow_match_scheduler_x0():
    gap, _ = scheduler_x0_gap(make_kd(), pipeline_velocity)
    print(f"Cosmos: max |x0_host - x0 of FlowMatchEulerDiscreteScheduler.step| = {gap:.2e} (float32 transformer)")
    assert gap < 1e-5
    model64 = CosmosKD(tiny_cosmos(extra_pos_embed_type=None), distill=KDConfig()).double()  # learnable pos: f32 only
    gap, rule_gap = scheduler_x0_gap(model64, pipeline_velocity)
    print(f"Cosmos float64: step (computes in float32) {gap:.2e}, update rule x - sigma v {rule_gap:.2e}")
    assert gap < 1e-5 and rule_gap < 1e-12


def test_few_step_sampling_equals_the_diffusers_euler_loop():
    gap = sampler_gap(make_kd, pipeline_velocity)
    print(f"Cosmos: max |generate(renoise='ode') - scheduler.step loop| over 4 steps = {gap:.2e}")
    assert gap < 1e-5


def test_transformer_inputs_follow_the_cosmos_video2world_pipeline():
    model = make_kd(fps=24)
    seen = {}
    model.net_teacher.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    x0, condition, _ = model.get_data_and_condition(batch(1))
    t = torch.tensor([0.7, 1.2], dtype=torch.float64)
    x_t = torch.randn(SHAPE, dtype=torch.float64)
    model.trigflow_denoise(model.net_teacher, x_t, t, condition)
    tau = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    assert seen["timestep"].shape == (B, 1, T, 1, 1) and seen["timestep"].dtype == torch.float32
    expected_time = torch.stack([torch.full((B,), TAU_C, dtype=torch.float64), tau, tau], 1)
    assert torch.allclose(seen["timestep"][:, 0, :, 0, 0].double(), expected_time, rtol=1e-6, atol=0)
    mask = seen["condition_mask"]
    assert mask.shape == (B, 1, T, H, W) and mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    assert seen["padding_mask"] is None and seen["fps"] == 24  # this tiny config concatenates no padding mask
    hidden = seen["hidden_states"]
    assert torch.allclose(hidden[:, :, 0].double(), (1 - TAU_C) * x0[:, :, 0].double(), atol=1e-6)
    x_native = x_t / (torch.cos(t) + torch.sin(t)).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(hidden[:, :, 1:].double(), x_native[:, :, 1:], atol=1e-6)
    assert torch.equal(seen["encoder_hidden_states"], batch(1)["prompt_embeds"])


def test_the_first_frame_is_the_given_one_in_the_output():
    model = make_kd()
    x0, condition, _ = model.get_data_and_condition(batch(2))
    out = model.generate(condition, torch.randn(SHAPE))
    assert torch.equal(out[:, :, 0], x0[:, :, 0]) and not torch.equal(out[:, :, 1], x0[:, :, 1])
    two = model.build_condition(condition.encoder_hidden_states, x0, torch.tensor([0, 2]))
    assert two.frame_mask[:, 0, :, 0, 0].tolist() == [[0, 0, 0], [1, 1, 0]]


@pytest.mark.skipif(is_torchvision_available(), reason="torchvision is installed")
def test_a_padding_mask_model_without_torchvision_fails_at_construction_with_the_fix():
    with pytest.raises(ImportError, match="concat_padding_mask=True.*pip install torchvision"):
        CosmosVideo2WorldHost(tiny_cosmos(concat_padding_mask=True))


# ------------------------------------------------------------------------------------- taps and loading


def test_feature_taps_leave_the_output_bit_identical_and_are_removed():
    check_taps_leave_output_unchanged(CosmosVideo2WorldHost(tiny_cosmos()))


def test_loading_from_a_diffusers_folder_and_a_safetensors_file(tmp_path):
    check_loading(CosmosVideo2WorldHost, tiny_cosmos(seed=3), tmp_path)
    model = CosmosDMD2.from_pretrained(tmp_path / "transformer", distill=dmd2_config())  # the composed class
    assert isinstance(model, CosmosDMD2) and model.net_fake_score is not model.net_teacher
    assert torch.equal(model.net_teacher.proj_out.weight, tiny_cosmos(seed=3).proj_out.weight)


def test_gradient_checkpointing_switch_keeps_the_gradients():
    check_gradient_checkpointing(make_kd)


def test_gan_taps_on_a_checkpointed_critic_give_the_same_losses_and_head_gradients():
    results = []
    for enabled in (False, True):
        model = CosmosDMD2(tiny_cosmos(), distill=dmd2_config(source="critic"), gradient_checkpointing=enabled)
        assert model.net_fake_score.gradient_checkpointing is enabled
        torch.manual_seed(1)
        out, loss = model.training_step(batch(7), 1)  # a critic phase: taps on the critic, with gradients
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.net_discriminator.parameters()])
        results.append((out["loss_gan_discriminator"], grads))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6) and results[0][1].abs().sum() > 0
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------- contract errors


def test_contract_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"List the mixins first: class Bad\(DMD2Mixin, CosmosVideo2WorldHost\)"):
        type("Bad", (CosmosVideo2WorldHost, DMD2Mixin), {})
    from tests.hosts_helpers import tiny_wan

    with pytest.raises(TypeError, match="needs a diffusers CosmosTransformer3DModel as net, got WanTransformer3DModel"):
        CosmosVideo2WorldHost(tiny_wan())
    with pytest.raises(ValueError, match="in_channels = out_channels \\+ 1"):
        CosmosVideo2WorldHost(tiny_cosmos(in_channels=C))
    host = CosmosVideo2WorldHost(tiny_cosmos())
    with pytest.raises(TypeError, match="needs a VideoCondition condition"):
        host.predict(host.net, torch.randn(SHAPE), torch.rand(B), torch.randn(B, TEXT_LEN, TEXT_DIM))
    with pytest.raises(KeyError, match="'prompt_embeds' .* or 'prompt'"):
        host.get_data_and_condition({"x0": torch.randn(SHAPE)})
    with pytest.raises(ValueError, match="num_conditional_frames=\\[4, 4\\] must lie in 0..3"):
        host.build_condition(torch.randn(B, TEXT_LEN, TEXT_DIM), torch.randn(SHAPE), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the host shadows no mixin name
        type("Fine", (KDMixin, CosmosVideo2WorldHost), {})


# -------------------------------------------------------------------------------------------- conditioner


def tiny_text_encoder(layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    config = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=8, d_kv=4, d_ff=16, num_layers=layers, num_heads=2)
    return T5EncoderModel(config)


def test_cosmos_style_conditioner_concatenates_every_layer_standardized():
    encoder = tiny_text_encoder(layers=2)
    conditioner = TextConditioner(
        encoder, ByteTokenizer(), max_length=TEXT_LEN, hidden_states="all_normalized", zero_padding=False,
        pass_attention_mask=False,
    )
    emb = conditioner.encode(["a red car", "rain"])
    assert emb.shape == (2, TEXT_LEN, 2 * 8)
    ids = ByteTokenizer()(["a red car", "rain"], max_length=TEXT_LEN)["input_ids"]
    hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states
    for k, h in enumerate(hidden[1:]):
        expected = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8)
        assert torch.allclose(emb[..., 8 * k: 8 * (k + 1)], expected, atol=1e-6)
    assert torch.allclose(conditioner.empty(3), conditioner.encode([""] * 3), atol=1e-6)  # cached, batch 1

    model = CosmosKD(tiny_cosmos(text_embed_dim=16), conditioner=conditioner, distill=KDConfig())
    prompts = {"x0": torch.randn(SHAPE), "prompt": ["a red car", "rain"], "noise": torch.randn(SHAPE),
               "teacher_x0": torch.randn(SHAPE)}
    _, condition, uncondition = model.get_data_and_condition(prompts)
    assert isinstance(condition, VideoCondition) and torch.equal(condition.encoder_hidden_states, emb)
    assert torch.equal(uncondition.encoder_hidden_states, conditioner.empty(2))  # CFG: the empty prompt
    assert torch.isfinite(model.training_step(prompts, 0)[1])
    assert not any(k.startswith("conditioner") for k in model.state_dict())


def test_without_a_conditioner_the_uncondition_is_zeros_or_the_given_embedding():
    model = make_kd()
    _, _, uncondition = model.get_data_and_condition(batch(3))
    assert torch.equal(uncondition.encoder_hidden_states, torch.zeros(B, TEXT_LEN, TEXT_DIM))
    negative = torch.randn(B, TEXT_LEN, TEXT_DIM)
    _, condition, uncondition = model.get_data_and_condition({**batch(3), "uncond_prompt_embeds": negative})
    assert torch.equal(uncondition.encoder_hidden_states, negative)
    assert torch.equal(uncondition.gt_frames, condition.gt_frames)  # both CFG branches see the same frames
    with pytest.raises(ValueError, match="has no conditioner"):
        model.get_data_and_condition({"x0": torch.randn(SHAPE), "prompt": ["a", "b"]})


# ------------------------------------------------------------------------------------------------- docs


def guide_snippet(name: str) -> str:
    text = (DOCS / "distill_your_model.md").read_text()
    match = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"docs/distill_your_model.md lost its snippet marker {name!r}"
    return match.group(1)


def test_the_guides_cosmos_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(guide_snippet("cosmos-end-to-end"), scope)
    video = scope["video"]
    assert video.shape == (2, 16, 3, 8, 8) and torch.isfinite(video).all()
    assert torch.equal(video[:, :, 0], scope["batch"]["x0"][:, :, 0])  # the given first frame


def test_the_guides_custom_host_example_and_its_errors_are_real():
    scope: dict = {}
    exec(guide_snippet("custom-host"), scope)
    assert torch.isfinite(scope["loss"])
    text = (DOCS / "distill_your_model.md").read_text()
    for message in scope["errors"]:
        assert message in text, f"the guide does not show the real error:\n{message}"
