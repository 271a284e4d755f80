"""The demo's held-out set and the shipped teacher samples: prefixes that do not depend on the set's size, 8-bit
round trips, the settings check, and the spot check's figures."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distill_mixins.toy.evalset import (
    SAMPLES,
    as_8bit,
    eval_noise,
    from_8bit,
    held_out,
    load_teacher_samples,
    spot_check,
    teacher_settings,
    usable_samples,
)
from distill_mixins.toy.train import WEIGHTS


def test_held_out_conditions_and_noise_do_not_depend_on_how_many_are_asked():
    few, many = held_out(8), held_out(40)
    assert torch.equal(few.video, many.video[:8]) and few.prompts == many.prompts[:8]
    assert torch.equal(eval_noise(3, (2, 2), 7), eval_noise(10, (2, 2), 7)[:3])
    assert not torch.equal(eval_noise(3, (2, 2), 7), eval_noise(3, (2, 2), 8))


def test_8bit_round_trip_is_exact_on_the_grid_and_within_half_a_level_elsewhere():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(as_8bit(from_8bit(levels)), levels)
    x = torch.rand(1000, dtype=torch.float64) * 2 - 1
    assert (from_8bit(as_8bit(x)).double() - x).abs().max() <= 0.5 / 127.5 + 1e-6
    assert as_8bit(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped, as a video file holds it


def test_spot_check_figures():
    a = torch.zeros(4, 3, 2, 2, 2)
    same = spot_check(a, a.clone())
    assert same.mean_abs == 0 and same.share_within == 1 and same.ok
    b = a.clone()
    b[0] += 1.0  # one clip of four off by 1: mean |diff| of that clip 1, of the set 0.25
    one_off = spot_check(b, a)
    assert one_off.max_abs == 1.0 and one_off.mean_abs == 0.25 and one_off.share_within == 0.75 and not one_off.ok


def test_shipped_samples_match_the_shipped_teacher_and_the_demo_defaults():
    from distill_mixins.toy.demo import DemoConfig

    config = DemoConfig()
    samples = load_teacher_samples()
    assert samples.settings == teacher_settings(WEIGHTS, config.teacher_steps, config.guidance)
    assert samples.clips.shape == (1024, 3, 8, 32, 32) and samples.again.shape[0] >= config.diversity_clips
    assert samples.clips.min() >= -1 and samples.clips.max() <= 1
    assert SAMPLES.stat().st_size < 12e6
    assert samples.metadata["precision"] == "fp32" and "toy-teacher-samples" in samples.metadata["command"]


def test_samples_of_another_teacher_or_sampler_or_too_few_are_not_used():
    config_steps, guidance = 36, 3.0
    settings = teacher_settings(WEIGHTS, config_steps, guidance)
    assert usable_samples(settings, 1024, 32) is not None
    assert usable_samples(dataclasses.replace(settings, teacher_sha256="0" * 64), 1024, 32) is None
    assert usable_samples(dataclasses.replace(settings, steps=18), 1024, 32) is None
    assert usable_samples(settings, 1025, 32) is None
    assert usable_samples(settings, 1024, 32, path=SAMPLES.with_name("missing.xz")) is None


@pytest.mark.parametrize("precision", ["fp32"])
def test_fresh_teacher_samples_reproduce_the_shipped_ones(precision):
    """Two held-out conditions re-sampled (36 DDIM steps, CFG 3) in float32 give the shipped 8-bit clips."""
    from distill_mixins.methods import KDConfig
    from distill_mixins.toy.demo import ToyKD
    from distill_mixins.toy.evalset import NOISE_SEED, run_sampler, teacher_sampler
    from distill_mixins.toy.train import load_toy_teacher

    teacher = load_toy_teacher()
    model = ToyKD(teacher.net, teacher.text_encoder, distill=KDConfig()).eval()
    clips = held_out(2)
    noise = eval_noise(2, tuple(clips.video.shape[1:]), NOISE_SEED)
    fresh = run_sampler(model, teacher_sampler(model, 36, 3.0), clips, noise, batch=2, precision=precision, desc="t")
    check = spot_check(fresh.clips, load_teacher_samples().clips[:2])
    assert check.ok and check.mean_abs < 0.005, check


def test_shipped_transformer_teacher_samples_match_it_and_reproduce():
    """The causal pipeline's teacher's shipped samples: made by it with demo-causal's settings, in float32, 1,024 + at
    least the diversity clips; two conditions re-sampled in float32 on its causal host give the shipped clips."""
    from distill_mixins.toy.cli import sampling_model
    from distill_mixins.toy.demo_causal import CausalDemoConfig
    from distill_mixins.toy.evalset import NOISE_SEED, run_sampler, teacher_sampler, teacher_samples_file
    from distill_mixins.toy.train import DIT_WEIGHTS, load_toy_teacher

    config, path = CausalDemoConfig(), teacher_samples_file(DIT_WEIGHTS)
    samples = load_teacher_samples(path)
    assert samples.settings == teacher_settings(DIT_WEIGHTS, config.teacher_steps, config.guidance)
    assert samples.clips.shape == (1024, 3, 8, 32, 32) and samples.again.shape[0] >= config.diversity_clips
    assert path.stat().st_size < 12e6 and samples.metadata["precision"] == "fp32"
    model = sampling_model(load_toy_teacher(DIT_WEIGHTS)).eval()
    clips = held_out(2)
    noise = eval_noise(2, tuple(clips.video.shape[1:]), NOISE_SEED)
    fresh = run_sampler(model, teacher_sampler(model, 36, 3.0), clips, noise, batch=2, precision="fp32", desc="t")
    check = spot_check(fresh.clips, samples.clips[:2])
    assert check.ok and check.mean_abs < 0.005, check
