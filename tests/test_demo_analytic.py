"""The analytic demo (the main job until the toy demo lands) distills for real and writes its files."""

from __future__ import annotations

import json
import math

import pytest

from distill_mixins.cli import main
from distill_mixins.demo_analytic import format_result, run_analytic_demo


@pytest.mark.acceptance  # a KD training on the exact mixture (~15 s): make test-acceptance
def test_demo_student_reaches_the_teacher(tmp_path):
    result = run_analytic_demo(tmp_path, iterations=1500, pairs=8192, eval_samples=4096)
    print(format_result(result))
    assert result.sw2_student_1step <= 1.6 * result.sw2_floor
    assert result.sw2_teacher_1step >= 10 * result.sw2_floor
    assert result.mode_mass_error_student <= 0.02
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values())
    assert json.loads((tmp_path / "config.json").read_text())["type"] == "AnalyticDemoConfig"
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick_demo(tmp_path, capsys):
    assert main(["demo-analytic", "--quick", "--iterations", "20", "--out", str(tmp_path / "run")]) == 0
    assert "student 1-step" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").exists()
