"""The demo end to end at tiny sizes: finite figures, outputs, resume, the shipped teacher samples, and a signal
that stops the whole pipeline (no later stage starts from an unfinished one; a rerun gives the same figures)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distill_mixins.toy.demo import DemoConfig, run_demo

TINY = {"pairs": 32, "eval_clips": 32, "diversity_clips": 32, "spot_check": 8, "kd_iterations": 6,
        "dmd2_iterations": 2, "refine_iterations": 2, "batch_size": 8, "sample_batch": 16, "steps_curve": True}
"""A tiny demo: 32 pairs, a few iterations per stage, 32 held-out clips (the first 32 of the shipped samples)."""
TINY_FLAGS = ["demo", "--quick", "--pairs", "32", "--eval-clips", "32", "--spot-check", "8", "--kd-iterations", "6",
              "--dmd2-iterations", "2", "--refine-iterations", "2", "--batch-size", "8", "--sample-batch", "16"]
"""The same run as command-line flags (``--quick`` sets diversity_clips 32, as TINY does)."""
QUALITY = ("fd", "prompt_adherence", "temporal_consistency", "diversity", "diversity_stderr")
"""Figures that must not depend on interruptions (latencies do)."""


def tiny_config(out: Path) -> DemoConfig:
    return DemoConfig.quick(out=str(out), **TINY)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(tiny_config(out))


def test_demo_end_to_end_tiny(tiny_run):
    out, result = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("teacher_36step_cfg", "teacher_1step", "student_1step"):
        entry = metrics[key]
        for field in ("fd", "prompt_adherence", "temporal_consistency", "nfe", "latency_s_per_clip"):
            assert math.isfinite(entry[field]), (key, field)
        assert entry["diversity"] > 0 and 0 < entry["diversity_stderr"] < entry["diversity"], key
        assert math.isnan(entry["speed_split"]) or 0 <= entry["speed_split"] <= 1, key  # NaN: no pair both adheres
    assert metrics["teacher_36step_cfg"]["nfe"] == 72 and metrics["student_1step"]["nfe"] == 1
    for key in ("fd_floor", "gap_closed", "speedup_wall", "elapsed_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["precision"]["requested"] == "auto" and metrics["precision"]["resolved"] in ("bf16", "fp32")
    source = metrics["teacher_samples"]
    assert source["source"] == "shipped" and source["spot_check"]["clips"] == 8
    assert source["spot_check"]["share_within"] >= 0.9
    assert result.speedup_wall > 1
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.gif").read_bytes()[:6] == b"GIF89a"
    report = (out / "report.md").read_text()
    assert "| gap_closed >= 0.95 |" in report and "Precision: " in report and "spot-checked" in report
    assert "speed split" in report
    assert "## Quality vs steps" in report and (out / "steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_demo(tiny_config(out))  # resumable: every stage is found done and skipped, the figures are the same
    for figure in QUALITY:
        assert getattr(again.samplers["student_1step"], figure) == getattr(result.samplers["student_1step"], figure)


def _checkpoints(stage_dir: Path) -> list[Path]:
    return sorted((stage_dir / "checkpoints").glob("iter_*")) if (stage_dir / "checkpoints").is_dir() else []


STOPPER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from distill_mixins.trainer import DistillationTrainer

    train_iteration = DistillationTrainer.train_iteration

    def stop_at_iteration_3_of_kd(self, iteration):  # a real SIGTERM to this process during the first stage
        out = train_iteration(self, iteration)
        if iteration == 2 and Path(self.config.run_dir).name == "kd":
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    if os.environ.get("STOP_DURING_KD"):
        DistillationTrainer.train_iteration = stop_at_iteration_3_of_kd
    from distill_mixins.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_cli(out: Path, stop: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "STOP_DURING_KD": "1" if stop else ""}
    flags = [*TINY_FLAGS, "--out", str(out)]
    return subprocess.run([sys.executable, "-c", STOPPER, *flags], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.acceptance  # two demo runs (~90 s): in `make test-acceptance`, which CI runs too
def test_sigterm_stops_the_whole_demo_and_a_rerun_resumes_to_the_same_figures(tmp_path):
    out = tmp_path / "demo"
    stopped = _run_cli(out, stop=True)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "stopped on SIGTERM in stage 'kd' after iteration 3" in stopped.stderr
    assert "run the same command again to resume" in stopped.stderr
    assert [p.name for p in _checkpoints(out / "kd")] == ["iter_000003"]
    for later in ("refined_kd", "dmd2"):
        assert not _checkpoints(out / later), later
    assert not (out / "metrics.json").exists()
    resumed = _run_cli(out, stop=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    figures = json.loads((out / "metrics.json").read_text())
    reference = tmp_path / "uninterrupted"  # the same command in the same environment (threads), never stopped
    assert _run_cli(reference, stop=False).returncode == 0
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    for name in ("teacher_36step_cfg", "teacher_1step", "student_1step"):
        for figure in QUALITY:
            assert figures[name][figure] == pytest.approx(uninterrupted[name][figure], rel=1e-9), (name, figure)


def test_precision_flags_reach_the_demo_config():
    from distill_mixins.cli import build_parser, demo_config

    def parsed(*flags: str) -> DemoConfig:
        return demo_config(build_parser().parse_args(["demo", *flags]))

    assert parsed().precision == "auto"
    assert parsed("--precision", "fp32").precision == "fp32" and parsed("--precision", "bf16").precision == "bf16"
    assert parsed("--no-bf16").precision == "fp32"  # the old flag, kept as an alias
    assert parsed("--fresh-teacher").fresh_teacher and not parsed().fresh_teacher
    with pytest.raises(ValueError, match="DemoConfig.precision='fp16' is not a precision"):
        DemoConfig(precision="fp16")
    with pytest.raises(ValueError, match="DemoConfig.spot_check=0"):
        DemoConfig(spot_check=0)


def test_steps_curve_reuses_the_main_rows_and_adds_the_teacher_steps(tiny_run):
    _, result = tiny_run
    teacher = {p.steps: p for p in result.curve if p.sampler == "teacher"}
    student = {p.steps: p for p in result.curve if p.sampler == "student"}
    assert sorted(teacher) == [1, 2, 4, 8, 36] and sorted(student) == [1]
    assert all(p.nfe == 2 * steps for steps, p in teacher.items()) and student[1].nfe == 1
    # TINY evaluates as many conditions as it samples twice: the reused points are the main table's figures
    reused = ((teacher[1], "teacher_1step"), (teacher[36], "teacher_36step_cfg"), (student[1], "student_1step"))
    for point, key in reused:
        main = result.samplers[key]
        assert (point.fd, point.prompt_adherence, point.diversity) == (main.fd, main.prompt_adherence, main.diversity)
    for p in result.curve:
        assert math.isfinite(p.fd) and 0 <= p.prompt_adherence <= 1 and 0 < p.diversity_stderr < p.diversity
    assert teacher[8].fd < teacher[1].fd  # more steps: closer to the teacher's distribution than one step


def test_predict2_5_recipe_trains_a_4_step_dmd2_student_without_kd(tmp_path):
    tiny = {key: value for key, value in TINY.items() if key not in ("kd_iterations", "refine_iterations")}
    tiny["steps_curve"] = False
    config = DemoConfig.for_recipe("predict2.5", quick=True, out=str(tmp_path / "p25"), **tiny)
    assert (config.kd_iterations, config.refine_iterations, config.dmd2_refine_weight) == (0, 0, 20.0)
    result = run_demo(config)
    assert {k: m.nfe for k, m in result.samplers.items() if k.startswith("student")} == {
        "student_4step": 4, "student_2step": 2, "student_1step": 1}
    for m in result.samplers.values():
        assert all(math.isfinite(getattr(m, figure)) for figure in QUALITY)
    assert not (tmp_path / "p25" / "kd").exists() and not (tmp_path / "p25" / "kd_data").exists()
    assert result.gap_closed == pytest.approx(  # measured against the 4-step student, the one the recipe trains
        (result.samplers["teacher_1step"].fd - result.samplers["student_4step"].fd)
        / (result.samplers["teacher_1step"].fd - result.samplers["teacher_36step_cfg"].fd))
    report = (tmp_path / "p25" / "report.md").read_text()
    assert "demo (predict2.5)" in report and "wall-clock speedup >= 15x" in report and "| gap_closed" not in report


def test_recipe_flags_and_errors():
    from distill_mixins.cli import build_parser, demo_config

    def parsed(*flags: str) -> DemoConfig:
        return demo_config(build_parser().parse_args(["demo", *flags]))

    p25 = parsed("--recipe", "predict2.5")
    assert p25.recipe == "predict2.5" and p25.out == "runs/demo-predict2.5" and p25.kd_iterations == 0
    assert parsed("--recipe", "predict2.5", "--quick").out == "runs/demo-predict2.5-quick"
    assert parsed().recipe == "transfer1" and parsed("--steps-curve").steps_curve
    assert parsed("--diversity-clips", "64").diversity_clips == 64
    assert (p25.dmd2_iterations, p25.dmd2_refine_weight) == (720, 20.0)
    with pytest.raises(ValueError, match="DemoConfig.recipe='predict2.5' is DMD2 from the teacher's weights"):
        DemoConfig(recipe="predict2.5")  # the transfer1 defaults train KD first: for_recipe sets them
    with pytest.raises(ValueError, match="recipe 'predict2' is not known"):
        DemoConfig.for_recipe("predict2")


def test_every_sampler_is_timed_on_the_spot_check_clips_at_the_teachers_batch(monkeypatch):
    """Latencies compare like with like: each sampler runs the first ``spot_check`` held-out conditions (the clips the
    teacher's spot check times) in the same batches, and the median of the timed runs is its latency."""
    import torch

    from distill_mixins.toy import demo
    from distill_mixins.toy.evalset import SamplerRun

    held = demo.held_out_set(8, 4)
    calls, seconds = [], iter([3.0, 1.0, 2.0])

    def fake_run(model, sampler, clips, noise, *, batch, precision, desc):
        calls.append((clips.prompts, noise, batch))
        return SamplerRun(torch.zeros(len(clips)), next(seconds))

    monkeypatch.setattr(demo, "run_sampler", fake_run)
    config = demo.DemoConfig(eval_clips=8, diversity_clips=4, spot_check=5, sample_batch=64)
    assert demo.spot_latency(None, None, held, config) == 2.0
    assert len(calls) == demo.TIMING_REPEATS == 3
    for prompts, noise, batch in calls:
        assert prompts == held.clips.prompts[:5] and torch.equal(noise, held.noise[:5]) and batch == 64


def test_gan_flag_puts_attention_heads_on_the_critic_at_their_own_times_and_trains_them():
    import torch

    from distill_mixins.cli import build_parser, demo_config
    from distill_mixins.toy.clips import make_clips
    from distill_mixins.toy.demo import ToyDMD2, dmd2_config, toy_discriminator
    from distill_mixins.toy.train import load_toy_teacher

    config = demo_config(build_parser().parse_args(["demo", "--dmd2-gan-weight", "0.1", "--precision", "fp32"]))
    distill = dmd2_config(config)
    assert (distill.gan_loss_weight, distill.discriminator) == (0.1, toy_discriminator())
    assert distill.discriminator.time is not None and distill.discriminator_optimizer.lr == 1e-3
    assert dmd2_config(DemoConfig()).gan_loss_weight == 0.0  # off by default
    with pytest.raises(ValueError, match="DemoConfig.dmd2_gan_weight=-1"):
        DemoConfig(dmd2_gan_weight=-1)
    teacher = load_toy_teacher()
    model = ToyDMD2(teacher.net, teacher.text_encoder, distill=distill)
    clips = make_clips(2, 0)
    batch = {"clip": clips.video, "prompt": clips.prompts}
    for it, key in ((0, "loss_gan_generator"), (1, "loss_gan_discriminator")):  # a student phase, then a critic one
        out, loss = model.training_step(batch, it)
        assert torch.isfinite(out[key]) and torch.isfinite(loss)
