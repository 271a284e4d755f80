"""Issue 15 item 6: a configuration or input error of any subcommand is one line on stderr and exit status 2;
``--debug`` (or DISTILL_MIXINS_DEBUG=1) shows the traceback; a bug keeps its traceback. No training runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_mixins.cli import DEBUG_ENV, main
from distill_mixins.errors import ConfigError, MissingFileError, UsageError, config_errors, one_line

ROOT = Path(__file__).resolve().parents[1]
TOY = "distill_mixins.trainer.examples"
DATA = "distill_mixins.data.examples"


def stage(name: str, **fields) -> dict:
    return {"name": name, "method": "kd", "model": f"{TOY}:toy_model", "data": f"{TOY}:toy_kd_data", **fields}


def forbidden(*args, **kwargs):
    """A model or data factory that a failing command must never reach."""
    raise AssertionError("the command did work before checking its flags")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch, tmp_path):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # a command that wrongly starts work writes under tmp_path, not the repository


def error_line(capfd, *argv: str) -> str:
    """Run ``distill-mixins argv`` in-process; check exit status 2 and exactly one stderr line, return it."""
    assert main(list(argv)) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("distill-mixins: error: ")
    return lines[0]


def write_config(path: Path, config: object) -> str:
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


# ----------------------------------------------------------------------------------------------------- train


def test_train_bad_json_names_the_file_and_the_line(tmp_path, capfd):
    path = write_config(tmp_path / "run.json", '{"run_dir": "r",\n "stages": [}')
    line = error_line(capfd, "train", "--config", path)
    assert "run.json is not valid JSON" in line and "line 2" in line and "fix the syntax" in line


def test_train_missing_run_dir_names_the_field_and_the_fix(tmp_path, capfd):
    path = write_config(tmp_path / "run.json", {"stages": [stage("kd")]})
    line = error_line(capfd, "train", "--config", path)
    assert f'{path}: run_dir is missing; add "run_dir": ' in line and "to the run config" in line


def test_train_stage_missing_a_field_names_the_stage(tmp_path, capfd):
    second = {key: value for key, value in stage("dmd2", method="dmd2").items() if key != "model"}
    path = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": [stage("kd"), second]})
    line = error_line(capfd, "train", "--config", path)
    assert 'stages.1 ("dmd2"): model is missing; add "model": "package.module:factory" to the stage' in line


def test_train_unknown_fields_are_named(tmp_path, capfd):
    path = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": [stage("kd", modle="x")]})
    assert 'stages.0 ("kd"): StageConfig has no field modle' in error_line(capfd, "train", "--config", path)
    path = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": [stage("kd", trainer={"iteratons": 3})]})
    line = error_line(capfd, "train", "--config", path)
    assert 'run.json: stages.0 ("kd").trainer: TrainerConfig has no field iteratons' in line


def test_train_wrong_types_name_the_field(tmp_path, capfd):
    optimizer = {"student_optimizer": {"name": "adam", "lr": "fast"}}
    path = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": [stage("kd", method_config=optimizer)]})
    line = error_line(capfd, "train", "--config", path)
    assert 'stages.0 ("kd").method_config.student_optimizer.lr=\'fast\' must be a number' in line
    path = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": ["kd"]})
    assert "stages.0: must be a JSON object of StageConfig fields" in error_line(capfd, "train", "--config", path)


def test_train_checks_every_stage_before_training(tmp_path, capfd):
    bad = stage("second", trainer={"iterations": -1})
    path = write_config(tmp_path / "run.json", {"run_dir": str(tmp_path / "run"), "stages": [stage("kd"), bad]})
    line = error_line(capfd, "train", "--config", path)
    assert 'stages.1 ("second").trainer: TrainerConfig.iterations=-1 must be an int >= 0' in line
    assert not (tmp_path / "run").exists()  # the first stage never started
    args = stage("kd", model_args={"hiddn": 8})
    path = write_config(tmp_path / "run.json", {"run_dir": str(tmp_path / "run"), "stages": [args]})
    line = error_line(capfd, "train", "--config", path)
    assert "got an unexpected keyword argument 'hiddn'" in line and 'fix stages.0 ("kd").model_args' in line


def test_train_bad_override_and_missing_file(tmp_path, capfd):
    path = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": [stage("kd")]})
    assert "--set stages.5.trainer: index 5 is out of range" in error_line(
        capfd, "train", "--config", path, "--set", "stages.5.trainer={}")
    line = error_line(capfd, "train", "--config", str(tmp_path / "nope.json"))
    assert "nope.json does not exist" in line and "--config" in line


# ------------------------------------------------------------------------------------------- extract-weights


def test_extract_weights_without_or_with_a_broken_checkpoint(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    line = error_line(capfd, "extract-weights", "--input", str(tmp_path / "empty"), "--output", "s.safetensors")
    assert "empty is not a checkpoint" in line
    assert "--input" in error_line(capfd, "extract-weights", "--input", "missing", "--output", "s.safetensors")
    checkpoint = tmp_path / "iter_000001"
    checkpoint.mkdir()
    (checkpoint / "manifest.json").write_text('{"format": ')
    line = error_line(capfd, "extract-weights", "--input", str(checkpoint), "--output", "s.safetensors")
    assert "manifest.json is not valid JSON" in line and "damaged" in line
    manifest = {"format": "distill-mixins-checkpoint/1", "iteration": 1, "networks": {"net": "student.safetensors"},
                "files": {"student.safetensors": {"bytes": 100, "sha256": "0" * 64}}}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    (checkpoint / "student.safetensors").write_bytes(b"abc")
    line = error_line(capfd, "extract-weights", "--input", str(checkpoint), "--output", "s.safetensors")
    assert "student.safetensors" in line and not Path("s.safetensors").exists()


# ------------------------------------------------------------------------------------------ generate-kd-data


def test_generate_kd_data_bad_values_fail_before_the_model_is_built(capfd):
    base = ["generate-kd-data", "--model", "tests.test_cli_errors:forbidden", "--data", f"{DATA}:analytic_batches",
            "--out", "kd"]
    assert "KDDataConfig.num_samples=-5 must be an int >= 1" in error_line(capfd, *base, "--num-samples", "-5")
    assert "--data needs --num-samples" in error_line(capfd, *base)
    line = error_line(capfd, *base, "--num-samples", "4", "--path-times", "1.5,x")
    assert line.startswith("distill-mixins: error: --path-times: ")
    assert "--device: " in error_line(capfd, *base, "--num-samples", "4", "--device", "nope")
    assert not Path("kd").exists()


# ------------------------------------------------------------------------------------- demo and the toy teacher


def test_demo_bad_value_fails_before_any_work(monkeypatch, capfd):
    monkeypatch.setattr("distill_mixins.toy.demo.run_demo", forbidden)
    assert "DemoConfig.eval_clips=0 must be >= 1" in error_line(capfd, "demo", "--eval-clips", "0")
    assert "DemoConfig.pairs=-5" in error_line(capfd, "demo", "--quick", "--pairs", "-5")
    assert "teacher_weights='nope.safetensors' is not a file" in error_line(
        capfd, "demo", "--teacher-weights", "nope.safetensors")
    assert not Path("runs").exists()


def test_demo_analytic_bad_value(monkeypatch, capfd):
    monkeypatch.setattr("distill_mixins.demo_analytic.run_analytic_demo", forbidden)
    assert "demo-analytic --pairs=-5 must be >= 1" in error_line(capfd, "demo-analytic", "--pairs", "-5")


def test_toy_teacher_bad_value(monkeypatch, capfd):
    monkeypatch.setattr("distill_mixins.toy.train.train_toy_teacher", forbidden)
    line = error_line(capfd, "toy-teacher", "--iterations", "0", "--out", "teacher")
    assert "TeacherTrainConfig.iterations=0 must be >= 1" in line


def test_toy_teacher_samples_missing_weights(monkeypatch, capfd):
    monkeypatch.setattr("distill_mixins.toy.train.load_toy_teacher", forbidden)
    line = error_line(capfd, "toy-teacher-samples", "--out", "s.xz", "--teacher-weights", "nope.safetensors")
    assert "--teacher-weights nope.safetensors is not a file" in line
    assert "--clips=0 must be >= 1" in error_line(capfd, "toy-teacher-samples", "--out", "s.xz", "--clips", "0")


# ------------------------------------------------------------------------------ argparse, --debug and real bugs


def test_bad_flags_stay_argparse_errors(capfd):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--eval-clips", "many"])
    assert exit_info.value.code == 2 and "invalid int value: 'many'" in capfd.readouterr().err


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    path = write_config(tmp_path / "run.json", "{not json")
    with pytest.raises(ConfigError, match="is not valid JSON") as error:
        main(["--debug", "train", "--config", path])
    assert isinstance(error.value.__cause__, json.JSONDecodeError)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="DemoConfig.eval_clips=0"):
        main(["demo", "--eval-clips", "0"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr("distill_mixins.demo_analytic.run_analytic_demo", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["demo-analytic", "--out", "analytic"])


def test_errors_helpers_join_lines_and_name_keys():
    assert one_line("first\n\n  second  \nthird") == "first second third"
    with pytest.raises(ConfigError, match=r"^stages.0: missing key 'x'$"), config_errors("stages.0"):
        {}["x"]  # noqa: B018
    with pytest.raises(ConfigError, match="^a\\.b: bad value on two lines$"), config_errors("a.b"):
        raise ValueError("bad value\non two lines")
    error = MissingFileError("x does not exist")
    assert isinstance(error, FileNotFoundError) and isinstance(error, UsageError)


def test_subprocess_stderr_is_one_line_and_debug_adds_the_traceback(tmp_path):
    config = write_config(tmp_path / "run.json", {"run_dir": "r", "stages": [{"name": "dmd2", "method": "dmd2"}]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(DEBUG_ENV, None)
    command = [sys.executable, "-m", "distill_mixins.cli", "train", "--config", config]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert 'stages.0 ("dmd2"): model, data are missing; add "model": "package.module:factory"' in lines[0]
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
