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
        "dmd2_iterations": 2, "refine_iterations": 2, "batch_size": 8, "sample_batch": 16}
"""A tiny demo: 32 pairs, a few iterations per stage, 32 held-out clips (the first 32 of the shipped samples)."""
TINY_FLAGS = ["demo", "--quick", "--pairs", "32", "--eval-clips", "32", "--spot-check", "8", "--kd-iterations", "6",
              "--dmd2-iterations", "2", "--refine-iterations", "2", "--batch-size", "8", "--sample-batch", "16"]
"""The same run as command-line flags (``--quick`` sets diversity_clips 32, as TINY does)."""
QUALITY = ("fd", "prompt_adherence", "temporal_consistency", "diversity")
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
    assert "| gap_closed >= 0.85 |" in report and "Precision: " in report and "spot-checked" in report
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
