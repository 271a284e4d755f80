"""The shipped toy teacher meets its quality bar, and the demo runs end to end (tiny sizes) with finite figures."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distill_mixins.toy.demo import DemoConfig, ToyKD, gap_closed
from distill_mixins.toy.quality import TeacherQuality, teacher_quality
from distill_mixins.toy.train import WEIGHTS, load_toy_teacher


@pytest.fixture(scope="module")
def teacher_model():
    host = load_toy_teacher()
    return ToyKD(host.net, host.text_encoder).eval()


@pytest.mark.acceptance  # samples the shipped teacher 36 steps x CFG (~85 s in float32): make test-acceptance
def test_shipped_teacher_quality_bar(teacher_model):
    """The bar of distill_mixins.toy.quality on 96 held-out conditions. Measured: adherence 0.885, consistency 0.843
    against 0.685 for one step, FD 2.30 against 5.18 (biased at 96 clips)."""
    quality = teacher_quality(teacher_model, clips=96)
    print(quality)
    assert quality.ok, quality.goals()
    assert WEIGHTS.stat().st_size < 20e6


def test_quality_bar_goals_known_answers():
    good = TeacherQuality(clips=96, steps=36, adherence=0.85, consistency=0.84, consistency_1step=0.68, fd=2.3,
                          fd_1step=5.2)
    assert good.ok and [met for _, met, _ in good.goals()] == [True, True, True]
    for field, value in (("adherence", 0.79), ("consistency", 0.77), ("consistency_1step", 0.75), ("fd", 2.7)):
        bad = dataclasses.replace(good, **{field: value})
        assert not bad.ok, field


def test_toy_teacher_eval_reads_a_training_state(tmp_path, capsys):
    """A run's train_state.pt (its EMA, the arch from teacher_config.json) samples as the weights file would."""
    from distill_mixins.cli import main
    from distill_mixins.toy.quality import load_for_quality
    from distill_mixins.toy.train import TeacherTrainConfig, train_toy_teacher

    weights = train_toy_teacher(tmp_path, TeacherTrainConfig(iterations=1, batch_size=2, precision="fp32",
                                                             save_every=1))
    from_state, from_file = load_for_quality(tmp_path / "train_state.pt"), load_for_quality(weights)
    state, shipped = from_state.net_teacher.state_dict(), from_file.net_teacher.state_dict()
    assert all(torch.equal(state[k].to(torch.bfloat16), shipped[k].to(torch.bfloat16)) for k in state)
    code = main(["toy-teacher-eval", str(tmp_path / "train_state.pt"), "--clips", "4", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert code == 1 and "NO   prompt adherence >= 0.8" in out  # one iteration from scratch misses the bar
    (tmp_path / "teacher_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no teacher_config.json beside it"):
        load_for_quality(tmp_path / "train_state.pt")


def test_demo_help_states_the_config_defaults(capsys):
    from distill_mixins.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = DemoConfig()
    for flag, value in (("pairs", defaults.pairs), ("held-out clips", defaults.eval_clips),
                        ("every stage", defaults.batch_size), ("clips per sampling batch", defaults.sample_batch),
                        ("time itself", defaults.spot_check),
                        ("KD iterations", defaults.kd_iterations), ("DMD2 iterations", defaults.dmd2_iterations),
                        ("refined-KD iterations between KD and DMD2, 0 skips them", defaults.refine_iterations),
                        ("0 runs plain DMD2", f"{defaults.dmd2_refine_weight:g}"),
                        ("keeps per-condition diversity", f"{defaults.dmd2_energy_weight:g}"),
                        ("a sample between two modes costs more", f"{defaults.dmd2_energy_beta:g}"),
                        ("student learning rate", f"{defaults.dmd2_student_lr:g}")):
        assert f"{flag} (default {value})" in text, flag
    assert f"(default {defaults.guidance:g})" in text


def test_demo_refined_kd_settings_reach_the_method():
    from distill_mixins.cli import build_parser, demo_config
    from distill_mixins.toy.demo import dmd2_config, refined_kd_config

    assert DemoConfig().refine_iterations == 0 and DemoConfig().dmd2_refine_weight == 20.0
    assert demo_config(build_parser().parse_args(["demo", "--refine-iterations", "0"])).refine_iterations == 0
    config = refined_kd_config(DemoConfig(refine_tau=0.35, refine_teacher_steps=4, guidance=3.0))
    assert config.refine_time == pytest.approx(math.atan2(0.35, 0.65), abs=1e-12)  # rectified flow, sigma_d = 1
    assert config.teacher_steps == 4 and config.guidance_scale == 3.0
    dmd2 = dmd2_config(DemoConfig(dmd2_refine_weight=20.0, refine_teacher_steps=4))
    assert dmd2.refine_weight == 20.0 and dmd2.refine_time == config.refine_time and dmd2.refine_teacher_steps == 4
    assert demo_config(build_parser().parse_args(["demo", "--dmd2-refine-weight", "0"])).dmd2_refine_weight == 0.0
    with pytest.raises(ValueError, match="DemoConfig.refine_tau=1.0"):
        DemoConfig(refine_tau=1.0)
    with pytest.raises(ValueError, match="DemoConfig.refine_teacher_steps=0"):
        DemoConfig(refine_teacher_steps=0)
    with pytest.raises(ValueError, match="DemoConfig.refine_iterations=-1"):
        DemoConfig(refine_iterations=-1)
    with pytest.raises(ValueError, match="DemoConfig.dmd2_refine_weight=-1.0"):
        DemoConfig(dmd2_refine_weight=-1.0)


def test_demo_energy_term_and_student_lr_reach_dmd2():
    from distill_mixins.cli import build_parser, demo_config
    from distill_mixins.toy.demo import dmd2_config

    assert DemoConfig().dmd2_energy_weight == 1.0 and dmd2_config(DemoConfig()).energy_weight == 1.0
    assert dmd2_config(DemoConfig.for_recipe("predict2.5")).energy_weight == 0.0  # its student keeps its diversity
    args = build_parser().parse_args(["demo", "--dmd2-energy-weight", "0", "--dmd2-student-lr", "1e-5"])
    config = dmd2_config(demo_config(args))
    assert config.energy_weight == 0.0 and config.energy_samples == 2 and config.student_optimizer.lr == 1e-5
    with pytest.raises(ValueError, match="DemoConfig.dmd2_energy_weight=-1.0"):
        DemoConfig(dmd2_energy_weight=-1.0)
    beta = dmd2_config(demo_config(build_parser().parse_args(["demo", "--dmd2-energy-beta", "0.5"])))
    assert beta.energy_beta == 0.5 and dmd2_config(DemoConfig()).energy_beta == DemoConfig().dmd2_energy_beta
    with pytest.raises(ValueError, match=r"DemoConfig.dmd2_energy_beta=2.0 must be in \(0, 2\)"):
        DemoConfig(dmd2_energy_beta=2.0)


def test_gap_closed_known_answers():
    assert gap_closed(10.0, 2.0, 2.0) == 1.0 and gap_closed(10.0, 10.0, 2.0) == 0.0
    assert gap_closed(10.0, 4.0, 2.0) == 0.75


def test_denoiser_distillation_target_known_answers(tmp_path):
    """With the shipped UNet as both the network and the target, the loss is exactly 0; against the data it is not;
    a missing target file is refused naming the field."""
    from distill_mixins.toy.clips import make_clips
    from distill_mixins.toy.train import TeacherTrainConfig, teacher_loss

    config = TeacherTrainConfig(precision="fp32", target_teacher=str(WEIGHTS))
    host, target = load_toy_teacher(), load_toy_teacher(WEIGHTS)
    clips = make_clips(4, seed=5)

    def loss(against):
        return teacher_loss(host, clips.video, clips.prompts, config, torch.Generator().manual_seed(0), against)

    with torch.no_grad():
        assert loss(target).item() == 0.0 and loss(None).item() > 1e-4
    with pytest.raises(ValueError, match="TeacherTrainConfig.target_teacher='nope' is not a file"):
        TeacherTrainConfig(target_teacher="nope")


def test_fine_tuning_starts_from_the_weights_and_checks_them(tmp_path):
    """``init_weights``: a 1-iteration run at lr ~0 from the shipped UNet writes (to bf16) the same weights; a file of
    another arch or a missing file is refused naming the field; ``logit_mean`` moves the logit-normal times (its
    median is sigmoid(mean))."""
    from safetensors.torch import load_file

    from distill_mixins.toy.train import DIT_WEIGHTS, TeacherTrainConfig, sample_tau, train_toy_teacher

    config = TeacherTrainConfig(iterations=1, batch_size=2, precision="fp32", lr=1e-30, init_weights=str(WEIGHTS))
    written, shipped = load_file(str(train_toy_teacher(tmp_path, config))), load_file(str(WEIGHTS))
    assert written.keys() == shipped.keys()
    assert all(torch.equal(written[k], shipped[k]) for k in shipped)
    with pytest.raises(ValueError, match=r"init_weights=.* holds a 'dit' teacher, not the arch='unet'"):
        train_toy_teacher(tmp_path / "b", TeacherTrainConfig(iterations=1, init_weights=str(DIT_WEIGHTS)))
    with pytest.raises(ValueError, match="TeacherTrainConfig.init_weights='nope' is not a file"):
        TeacherTrainConfig(init_weights="nope")
    tau = sample_tau(20_000, 0.0, torch.Generator().manual_seed(0), logit_mean=1.0)
    assert abs(tau.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01
