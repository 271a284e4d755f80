"""``distill-mixins demo-causal``: its config errors, the pipeline it runs (the library's, with the demo's values),
the goals of its report on known figures, and the timing of a stream."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from distill_mixins.causal import StreamedChunk
from distill_mixins.toy.demo_causal import (
    CausalDemoConfig,
    CausalDemoResult,
    CausalSamplerMetrics,
    LongRollout,
    Students,
    demo_pipeline,
    noise_seed,
    timed_stream,
)
from distill_mixins.toy.report_causal import acceptance, format_long_table, format_table
from distill_mixins.trigflow import student_schedule


@pytest.fixture
def weights(tmp_path) -> str:
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"")  # the config checks the file exists; the pipeline is only built here, never run
    return str(path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pairs", 0, "CausalDemoConfig.pairs=0 must be >= 1"),
    ("sf_iterations", 0, "CausalDemoConfig.sf_iterations=0 must be >= 1"),
    ("kd_lr", 0.0, "CausalDemoConfig.kd_lr=0.0 must be > 0"),
    ("sf_guidance", 0.0, "CausalDemoConfig.sf_guidance=0.0 must be > 0"),
    ("guidance", -1.0, "CausalDemoConfig.guidance=-1.0 must be > 0"),
    ("student_shift", 0.0, "CausalDemoConfig.student_shift=0.0 must be > 0"),
    ("rollouts", (1,), "CausalDemoConfig.rollouts=(1,): give whole multiples >= 2"),
    ("diversity_clips", 2000, "CausalDemoConfig.diversity_clips=2000 must be <= eval_clips=1024"),
    ("precision", "fp16", "precision"),
])
def test_config_errors_name_the_field(weights, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CausalDemoConfig(teacher_weights=weights, **{field: value})


def test_missing_teacher_names_the_command(tmp_path):
    with pytest.raises(ValueError, match="toy-teacher --arch dit"):
        CausalDemoConfig(teacher_weights=str(tmp_path / "none.safetensors"))


def test_the_demo_runs_the_library_pipeline_with_its_values(weights):
    config = CausalDemoConfig(teacher_weights=weights, out="runs/x", pairs=32, kd_iterations=7, sf_iterations=5,
                              kd_lr=2e-4, sf_student_lr=3e-6, context_noise=0.1, precision="fp32")
    pipeline = demo_pipeline(config)
    run = pipeline.run_config()
    kd, sf = run.stages
    assert (pipeline.run_dir, kd.name, sf.name, sf.init_from_previous) == ("runs/x", "causal_kd", "self_forcing",
                                                                           "student")
    assert pipeline.ode_pairs.kd_data["num_samples"] == 32 and pipeline.ode_pairs.kd_data["steps"] == 36
    assert kd.trainer["iterations"] == 7 and sf.trainer["iterations"] == 5
    assert kd.trainer["autocast"] == sf.trainer["autocast"] == "none"
    assert kd.method_config["student_optimizer"]["lr"] == 2e-4
    assert sf.method_config["student_optimizer"]["lr"] == 3e-6
    assert sf.method_config["student_optimizer"]["betas"] == [0.0, 0.999]  # Self-Forcing's (DMD), critic too
    assert sf.method_config["critic_optimizer"]["betas"] == [0.0, 0.999]
    assert kd.method_config["student_optimizer"]["betas"] == [0.9, 0.99]
    assert kd.method_config["context_noise"] == sf.method_config["context_noise"] == 0.1
    assert kd.model_args == sf.model_args == {"teacher_weights": weights}
    assert sf.method_config["guidance_scale"] == 3.0 and sf.method_config["student_update_freq"] == 2


def test_self_forcing_guidance_and_pace_are_its_own(weights):
    config = CausalDemoConfig(teacher_weights=weights, guidance=3.0, sf_guidance=2.0, sf_update_freq=5)
    pipeline = demo_pipeline(config)
    sf = pipeline.run_config().stages[1]
    assert (sf.method_config["guidance_scale"], sf.method_config["student_update_freq"]) == (2.0, 5)
    assert pipeline.ode_pairs.kd_data["guidance"] == 3.0  # the ODE pairs keep the teacher's scale


def test_the_student_shift_reaches_both_stages_and_the_evaluated_sampler(weights, monkeypatch):
    """One shift for the ODE pairs' path times (the CausalKD stage's student times), Self-Forcing and inference:
    shift 2 gives the rectified-flow times 1, 6/7, 2/3, 0.4 (tau = s u / (1 + (s - 1) u), u = 1, 3/4, 1/2, 1/4)."""
    from distill_mixins.config import DistillConfig
    from distill_mixins.run_config import method_mixin

    config = CausalDemoConfig(teacher_weights=weights, student_shift=2.0)
    kd, sf = demo_pipeline(config).run_config().stages
    assert kd.method_config["student_shift"] == sf.method_config["student_shift"] == 2.0
    assert CausalDemoConfig(teacher_weights=weights).student_shift == DistillConfig().student_shift == 5.0
    for stage, name in ((kd, "causal_kd"), (sf, "self_forcing")):
        method = method_mixin(name).config_class(**{k: v for k, v in stage.method_config.items()
                                                     if k in ("student_shift", "context_noise")})
        times = student_schedule(method.student_schedule, "rectified_flow", 1.0, shift=method.student_shift)
        rf = torch.sin(times) / (torch.sin(times) + torch.cos(times))
        torch.testing.assert_close(rf, torch.tensor([1.0, 6 / 7, 2 / 3, 0.4], dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    built = []  # the evaluation's model (its student_times drive generate_causal) gets the same shift
    monkeypatch.setattr("distill_mixins.toy.demo_causal.build_model",
                        lambda mixin, distill, teacher_weights: built.append(distill) or torch.nn.Identity())
    monkeypatch.setattr(Students, "_load", lambda self, stage_dir: None)
    Students(config)
    assert [d.student_shift for d in built] == [2.0]


def test_kd_symmetries_give_causal_kd_the_moved_ode_pairs(weights):
    plain = demo_pipeline(CausalDemoConfig(teacher_weights=weights, out="runs/x")).run_config().stages[0]
    kd = demo_pipeline(CausalDemoConfig(teacher_weights=weights, out="runs/x", kd_symmetries=True,
                                        kd_batch=4)).run_config().stages[0]
    assert plain.data == "distill_mixins.trainer.pipeline:ode_pair_data"
    assert kd.data == "distill_mixins.toy.symmetry:symmetric_ode_pairs"
    assert kd.data_args == {"batch_size": 4, "root": "runs/x/ode_pairs"}
    assert plain.data_args["root"] == kd.data_args["root"]


def _metrics(fd: float, long: dict[int, LongRollout] | None = None) -> CausalSamplerMetrics:
    return CausalSamplerMetrics(fd=fd, prompt_adherence=0.9, temporal_consistency=0.8, diversity=0.1,
                                diversity_stderr=0.01, seconds_per_clip=1.0, first_chunk_s=0.1, frames_per_s=8.0,
                                long=long or {})


def _long(last: float) -> dict[int, LongRollout]:
    return {32: LongRollout(frames=32, clips=4, fd_windows=[1.0, 2.0, 3.0, last], fd_floor_windows=[0.5] * 4,
                            prompt_adherence=0.5, temporal_consistency=0.6)}


def _result(sf_fd: float, sf_last: float, kd_last: float, elapsed: float) -> CausalDemoResult:
    samplers = {"teacher_cfg": _metrics(2.0), "causal_kd": _metrics(3.0, _long(kd_last)),
                "self_forcing": _metrics(sf_fd, _long(sf_last))}
    return CausalDemoResult(samplers=samplers, fd_floor=0.5, elapsed_s=elapsed, stage_seconds={},
                            config={"time_goal_s": 900.0}, precision={}, teacher_samples={})


def test_report_goals_known_answers():
    met = acceptance(_result(sf_fd=2.5, sf_last=4.0, kd_last=6.0, elapsed=899.0))
    assert [ok for _, ok, _ in met] == [True, True, True]
    assert "1.250x" in met[0][2] and "4.00 vs 6.00" in met[1][2]
    missed = acceptance(_result(sf_fd=2.51, sf_last=6.0, kd_last=6.0, elapsed=901.0))
    assert [ok for _, ok, _ in missed] == [False, False, False]


def test_tables_show_every_window_and_the_floor():
    result = _result(sf_fd=2.5, sf_last=4.0, kd_last=6.0, elapsed=1.0)
    table, long = format_table(result), format_long_table(result)
    assert table.count("\n") == 4 and "FD floor" in table
    assert "24-31" in long and "6.00" in long and "4.00" in long and "real clips (floor)" in long


def test_timed_stream_counts_the_first_chunk_and_the_frames():
    def chunks():
        yield StreamedChunk(0, 2, torch.zeros(1))
        yield StreamedChunk(2, 5, torch.zeros(1))

    first, total, frames = timed_stream(chunks())
    assert frames == 5 and 0 <= first <= total


def test_the_result_is_json_ready():
    result = _result(sf_fd=2.5, sf_last=4.0, kd_last=6.0, elapsed=1.0)
    data = json.loads(json.dumps(dataclasses.asdict(result)))
    assert data["samplers"]["self_forcing"]["long"]["32"]["fd_windows"][-1] == 4.0


def test_fresh_re_noising_is_seeded_by_the_initial_noise():
    """Self-Forcing samples re-noise with fresh draws seeded by the initial noise: the same noise gives the same
    seed (reproducible), another noise (the diversity figure's second sample) another; with one fixed seed for both,
    the measured diversity of the Self-Forcing student was ~10x too low."""
    a = torch.randn(2, 3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    b = torch.randn(2, 3, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    assert noise_seed(a) == noise_seed(a.clone()) and noise_seed(a) != noise_seed(b)
    assert 0 <= noise_seed(a) < 2**63 and noise_seed(a[:1]) != noise_seed(a)

    seeds = []

    def fake_generate_causal(model, condition, noise, **kwargs):  # what the demo's student stream passes on
        seeds.append(kwargs["generator"].initial_seed())
        return iter(())

    students = object.__new__(Students)  # only the attributes stream() reads
    students.model, students.nets, students.renoise, students.context_time = None, {"sf": None}, {"sf": "fresh"}, 0.0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("distill_mixins.toy.demo_causal.generate_causal", fake_generate_causal)
        for noise in (a, a.clone(), b):
            students.stream("sf", None, noise)
    assert seeds == [noise_seed(a), noise_seed(a), noise_seed(b)]
