"""The toy Video2World domain: clips, prompts, the text conditioner, the host and the teacher's training."""

from __future__ import annotations

import math

import pytest
import torch

from distill_mixins import DMD2Mixin, FrameConditioning, KDMixin
from distill_mixins.text import ByteTokenizer
from distill_mixins.toy.clips import (
    RADIUS,
    SIZE,
    all_prompts,
    make_clips,
    parse_prompt,
    reflect,
    render_specs,
    trajectory,
)
from distill_mixins.toy.host import ToyCondition, ToyVideo2World
from distill_mixins.toy.text import MAX_TOKENS, ToyTextEncoder, tokenize, word_membership
from distill_mixins.toy.train import TeacherTrainConfig, conditional_scale, train_toy_teacher
from distill_mixins.toy.unet import ToyUNet
from distill_mixins.trigflow import add_noise

SMALL_UNET = {"widths": (8, 16), "blocks": 1, "emb_dim": 32, "text_dim": 16}


def small_host() -> ToyVideo2World:
    torch.manual_seed(0)
    return ToyVideo2World(ToyUNet(**SMALL_UNET), ToyTextEncoder(dim=16, layers=1, heads=2))


def test_bounce_trajectory_known_answer():
    """Left from x = 6 at 3 px/frame, walls at RADIUS = 4 and SIZE - RADIUS = 28: 6, 5 (bounced), 8, 11, ..."""
    start = torch.tensor([[6.0, 10.0]], dtype=torch.float64)
    step = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    centers = trajectory(start, step, torch.tensor([3.0], dtype=torch.float64), frames=5)
    assert centers[0, :, 0].tolist() == [6.0, 5.0, 8.0, 11.0, 14.0]
    assert centers[0, :, 1].tolist() == [10.0] * 5
    far = reflect(torch.tensor([30.0, 53.0, -1.0], dtype=torch.float64), RADIUS, SIZE - RADIUS)
    assert far.tolist() == [26.0, 5.0, 9.0]


def test_clips_are_seeded_in_range_and_show_their_shape():
    a, b = make_clips(16, seed=3), make_clips(16, seed=3)
    assert torch.equal(a.video, b.video) and a.prompts == b.prompts
    assert not torch.equal(a.video, make_clips(16, seed=4).video)
    assert a.video.shape == (16, 3, 8, 32, 32) and a.video.min() >= -1 and a.video.max() <= 1
    area = ((a.video + 1) / 2).amax(dim=1).sum(dim=(-1, -2))  # (N, T) shape coverage in pixels
    square = torch.tensor([s.shape == "square" for s in a.specs])
    assert torch.allclose(area[square], torch.full_like(area[square], (2 * RADIUS) ** 2), atol=1.0)
    assert torch.allclose(area[~square], torch.full_like(area[~square], math.pi * RADIUS**2), atol=1.5)
    assert torch.equal(render_specs(a.specs), a.video)


def test_prompts_parse_and_bad_prompts_name_the_fix():
    assert len(all_prompts()) == 32
    assert parse_prompt("red square moving left") == ("red", "square", "left")
    with pytest.raises(ValueError, match="'<color> <shape> moving <direction>'"):
        parse_prompt("purple square moving left")


def test_byte_tokenizer_known_ids_and_limit():
    ids, mask = tokenize(["ab", ""])
    a, b = ord("a") + ByteTokenizer.offset, ord("b") + ByteTokenizer.offset
    assert ids.shape == (2, MAX_TOKENS) and ids[:, :4].tolist() == [[a, b, 1, 0], [1, 0, 0, 0]]
    assert mask.sum(dim=1).tolist() == [3, 1]
    with pytest.raises(ValueError, match="longer than"):
        tokenize(["x" * 60])


def test_words_are_pooled_by_position_in_the_sentence():
    """"ab c": bytes 0-1 are word 0, byte 3 is word 1; the space, the end token and the padding belong to none."""
    ids, _ = tokenize(["ab c", ""])
    member = word_membership(ids)
    assert member[0, :5].argmax(dim=1).tolist()[:2] == [0, 0] and member[0, 3].tolist()[:2] == [0.0, 1.0]
    assert member[0, 2].sum() == 0 and member[0, 4:].sum() == 0 and member[1].sum() == 0
    with pytest.raises(ValueError, match="more than 6 words"):
        word_membership(tokenize(["a b c d e f g"])[0])


def test_text_encoder_separates_prompts_that_differ_in_one_word():
    encoder = small_host().text_encoder
    with torch.no_grad():
        z = encoder(["red square moving left", "red square moving up", "red square moving left", ""])
    assert torch.equal(z[0], z[2]) and (z[0] - z[1]).norm() > 0.1 * z[0].norm()
    assert torch.isfinite(z[3]).all()


def test_host_velocity_round_trips_to_the_networks_x0():
    """predict returns v = (x - x0_net) / tau; the mixin's conversion gives back x0_net (float64 known answer)."""

    class ToyKD(KDMixin, ToyVideo2World):
        pass

    host = small_host()
    model = ToyKD(host.net, host.text_encoder).double()
    clips = make_clips(3, seed=0)
    x0, condition, uncondition = model.get_data_and_condition({"clip": clips.video.double(), "prompt": clips.prompts})
    assert isinstance(condition, FrameConditioning)
    assert condition.frame_mask[:, 0, :, 0, 0].tolist() == [[1] + [0] * 7] * 3
    assert not torch.equal(condition.text, uncondition.text)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    x_t = add_noise(x0, torch.randn_like(x0), t, 1.0)
    out = model.trigflow_denoise(model.net_teacher, x_t, t, condition).x0
    k = torch.cos(t) + torch.sin(t)  # rectified flow, sigma_data = 1: x = x_t / (cos t + sin t), tau = sin t / k
    x, tau = x_t / k[:, None, None, None, None], torch.sin(t) / k
    c = conditional_scale(1e-4)
    x_in = torch.cat([c * x0[:, :, :1], x[:, :, 1:]], dim=2)  # the first frame pasted at the conditional level
    direct = model.net_teacher(x_in, tau, condition.frame_mask, condition.text)
    assert torch.allclose(out[:, :, 1:], direct[:, :, 1:], atol=1e-10)
    assert torch.equal(out[:, :, 0], x0[:, :, 0])  # the given frame is pasted into the output


def test_host_composes_with_dmd2_and_names_missing_batch_keys():
    class ToyDMD2(DMD2Mixin, ToyVideo2World):
        pass

    host = small_host()
    model = ToyDMD2(host.net, host.text_encoder)
    clips = make_clips(2, seed=0)
    out, loss = model.training_step({"clip": clips.video, "prompt": clips.prompts}, 1)  # a critic phase
    assert "loss_fake_score" in out and torch.isfinite(loss)
    with pytest.raises(KeyError, match="'clip'"):
        model.get_data_and_condition({"video": clips.video})
    assert isinstance(model.make_condition(host.encode(clips.video), clips.prompts)[0], ToyCondition)


def test_teacher_training_resumes_bit_exactly(tmp_path, monkeypatch):
    """4 iterations in one go == 2, stop, resume to 4 (the state file is written every 2)."""
    import distill_mixins.toy.train as train

    monkeypatch.setattr(train, "ToyUNet", lambda: ToyUNet(**SMALL_UNET))
    monkeypatch.setattr(train, "ToyTextEncoder", lambda: ToyTextEncoder(dim=16, layers=1, heads=2))
    config = {"batch_size": 4, "save_every": 2, "warmup": 2, "precision": "fp32"}
    whole = train_toy_teacher(tmp_path / "a", TeacherTrainConfig(iterations=4, **config))
    train_toy_teacher(tmp_path / "b", TeacherTrainConfig(iterations=2, **config))
    resumed = train_toy_teacher(tmp_path / "b", TeacherTrainConfig(iterations=4, **config))
    from safetensors.torch import load_file

    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.head.2.weight"], torch.zeros_like(a["net.head.2.weight"]))  # it trained
