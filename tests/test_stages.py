"""Run configs and stages: overrides, config parsing, `distill-mixins train --config` end to end, stage chaining."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from distill_mixins.trainer import Callback
from distill_mixins.trainer.stages import run_stages
from safetensors.torch import load_file

from distill_mixins import EMAConfig, KDConfig, OptimizerConfig
from distill_mixins.cli import main as cli_main
from distill_mixins.run_config import (
    METHODS,
    RunConfig,
    apply_overrides,
    build_dataclass,
    load_run_config,
    method_mixin,
)
from distill_mixins.testing import MLPDenoiser

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

TOY = "distill_mixins.trainer.examples"
ADAM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}


def stage(name: str, iterations: int, **fields) -> dict:
    values = {
        "name": name, "method": "kd", "model": f"{TOY}:toy_model", "data": f"{TOY}:toy_kd_data",
        "model_args": {"hidden": 16, "depth": 2}, "data_args": {"pairs": 64, "teacher_steps": 4},
        "method_config": {"student_optimizer": ADAM},
        "trainer": {"iterations": iterations, "batch_size": 16, "log_every": 1, "progress": False, "autocast": "none"},
    }
    for key, value in fields.items():
        values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
    return values


def small_net() -> MLPDenoiser:
    return MLPDenoiser((2, 2, 1, 1), "rf_velocity", 2, hidden=8, depth=2)


class SigtermAt(Callback):
    def on_step_end(self, trainer, step) -> None:
        if step.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def sigterm_at_1(model, data) -> Callback:
    """A stage callback factory: SIGTERM after iteration 1."""
    return SigtermAt()


def test_overrides_by_index_and_stage_name_with_json_values():
    data = {"run_dir": "r", "stages": [{"name": "kd", "trainer": {"iterations": 5}}, {"name": "dmd2"}]}
    out = apply_overrides(data, [
        "stages.0.trainer.iterations=10", "stages.dmd2.trainer.autocast=bf16", "stages.kd.method_config.ema={}",
        "seed=3", "stages.1.method_config.student_schedule=[1.5, 0.5]", "stages.-1.init_from_previous=ema",
    ])
    assert out["stages"][0]["trainer"] == {"iterations": 10} and out["seed"] == 3
    assert out["stages"][1]["trainer"] == {"autocast": "bf16"} and out["stages"][0]["method_config"] == {"ema": {}}
    assert out["stages"][1]["method_config"]["student_schedule"] == [1.5, 0.5]
    assert out["stages"][1]["init_from_previous"] == "ema"
    assert data["stages"][0]["trainer"] == {"iterations": 5}  # the input is left alone
    for bad, message in (("stages.7.trainer.iterations=1", "out of range"), ("stages.sft.name=x", "no list index"),
                         ("seed", "key.path=value"), ("run_dir.x=1", "has no fields")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(data, [bad])


def test_method_config_builds_nested_configs_and_resolves_network_factories():
    config = build_dataclass(KDConfig, {
        "type": "KDConfig", "student_optimizer": {"name": "adam", "lr": 0.01, "betas": [0.5, 0.9]},
        "ema": {"kind": "power"}, "student_schedule": [1.5, 0.7], "multistep_input": "interpolated",
        "student_net": "tests.test_stages:small_net",
    }, "stages.0.method_config")
    assert config.student_optimizer == OptimizerConfig(name="adam", lr=0.01, betas=(0.5, 0.9))
    assert config.ema == EMAConfig(kind="power") and config.student_schedule == (1.5, 0.7)
    assert config.student_net.__qualname__ == "small_net" and config.renoise == "initial"  # resolved, not a string
    assert config.student_net().head.in_features == 8
    with pytest.raises(ValueError, match=r"stages.0.method_config: KDConfig has no field lr; its fields: "):
        build_dataclass(KDConfig, {"lr": 1.0}, "stages.0.method_config")
    with pytest.raises(ValueError, match=r"stages.0.method_config.student_optimizer: OptimizerConfig has no field lrr"):
        build_dataclass(KDConfig, {"student_optimizer": {"lrr": 1.0}}, "stages.0.method_config")
    with pytest.raises(ValueError, match="is a DMD2Config, but this stage needs a KDConfig"):
        build_dataclass(KDConfig, {"type": "DMD2Config"}, "x")
    with pytest.raises(ValueError, match="OptimizerConfig.name='lion' is not known"):
        build_dataclass(KDConfig, {"student_optimizer": {"name": "lion"}}, "x")


def test_run_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="stage names .* must be unique"):
        RunConfig(run_dir="r", stages=[stage("a", 1), stage("a", 1)])
    with pytest.raises(ValueError, match="method='sft' is not known; choose one of kd"):
        RunConfig(run_dir="r", stages=[stage("a", 1, method="sft")])
    with pytest.raises(ValueError, match="model='toy_model' must look like 'package.module:factory'"):
        RunConfig(run_dir="r", stages=[stage("a", 1, model="toy_model")])
    with pytest.raises(ValueError, match="trainer.run_dir is set by the run config"):
        RunConfig(run_dir="r", stages=[stage("a", 1, trainer={"run_dir": "x"})])
    with pytest.raises(ValueError, match="stages is empty"):
        RunConfig(run_dir="r", stages=[])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        METHODS["broken"] = "no_such_module:Mixin"
        try:
            method_mixin("broken")
        finally:
            del METHODS["broken"]


def test_two_stages_run_end_to_end_through_the_cli_and_a_rerun_resumes(tmp_path):
    config = {"run_dir": str(tmp_path / "run"), "seed": 1, "stages": [
        stage("kd_1step", 4, callbacks=[f"{TOY}:toy_validation"], trainer={"validate_every": 2}),
        stage("kd_4step", 9, method_config={"student_schedule": "cosmos_4step", "multistep_input": "interpolated"}),
    ]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert cli_main(["train", "--config", str(path), "--set", "stages.kd_4step.trainer.iterations=3"]) == 0
    run = tmp_path / "run"
    resolved = json.loads((run / "run_config.json").read_text())
    assert resolved["stages"][1]["trainer"]["iterations"] == 3 and resolved["seed"] == 1
    for name, iterations in (("kd_1step", 4), ("kd_4step", 3)):
        assert (run / name / "checkpoints" / "latest").read_text() == f"iter_{iterations:06d}\n"
        assert (run / name / "student.safetensors").is_file()
        written = json.loads((run / name / "config.json").read_text())
        assert written["stage"] == name and written["trainer"]["seed"] == 1 and written["run"] == resolved
    second = json.loads((run / "kd_4step" / "config.json").read_text())
    assert second["initial_student"] == str(run / "kd_1step" / "student.safetensors")
    assert second["distill"]["student_schedule"] == "cosmos_4step"
    records = [json.loads(line) for line in (run / "kd_1step" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "val/sample_mse" in r] == [1, 3]
    manifest = (run / "kd_4step" / "checkpoints" / "iter_000003" / "manifest.json").read_bytes()
    assert cli_main(["train", "--config", str(path), "--set", "stages.kd_4step.trainer.iterations=3"]) == 0
    assert (run / "kd_4step" / "checkpoints" / "iter_000003" / "manifest.json").read_bytes() == manifest  # skipped


def test_each_stage_starts_from_the_previous_stage_student_or_ema(tmp_path):
    config = {"run_dir": str(tmp_path), "stages": [
        stage("kd", 3, method_config={"ema": {"halflife_steps": 1.0}}),
        stage("critic", 0, method="dmd2", init_from_previous="ema",
              method_config={"student_update_freq": 5, "critic_optimizer": ADAM, "guidance_scale": 2.0}),
        stage("kd_again", 0, init_from_previous="student"),
    ]}
    results = run_stages(RunConfig(**config))
    assert [r.name for r in results] == ["kd", "critic", "kd_again"] and all(r.completed for r in results)

    def student_at(name: str, iteration: int) -> dict:
        return load_file(str(tmp_path / name / "checkpoints" / f"iter_{iteration:06d}" / "student.safetensors"))

    kd_student, kd_ema = load_file(str(results[0].student)), load_file(str(results[0].student_ema))
    assert any(not torch.equal(kd_student[k], kd_ema[k]) for k in kd_student)  # the choice matters
    for name in ("critic", "kd_again"):
        start = student_at(name, 0)
        assert start.keys() == kd_ema.keys() and all(torch.equal(start[k], kd_ema[k]) for k in start)
    critic = load_file(str(tmp_path / "critic" / "checkpoints" / "iter_000000" / "critic.safetensors"))
    assert critic.keys() == kd_ema.keys()  # the critic stage built its own critic network


def test_a_signal_stops_the_run_between_stages_and_the_rerun_finishes_it(tmp_path):
    config = {"run_dir": str(tmp_path / "run"), "stages": [
        stage("first", 5, callbacks=["tests.test_stages:sigterm_at_1"]), stage("second", 2)]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert cli_main(["train", "--config", str(path)]) == 128 + signal.SIGTERM
    assert (tmp_path / "run" / "first" / "checkpoints" / "latest").read_text() == "iter_000002\n"
    assert not (tmp_path / "run" / "second").exists()
    assert cli_main(["train", "--config", str(path), "--set", "stages.first.callbacks=[]"]) == 0
    state = json.loads((tmp_path / "run" / "first" / "checkpoints" / "iter_000005" / "trainer_state.json").read_text())
    assert state["iteration"] == 5
    assert (tmp_path / "run" / "second" / "checkpoints" / "latest").read_text() == "iter_000002\n"
    assert load_run_config(path, ["stages.1.trainer.iterations=7"]).stages[1].trainer["iterations"] == 7


def test_consistency_stages_run_through_the_cli_after_kd(tmp_path):
    """``"method": "scm"`` and ``"rcm"`` stages (the rCM one from the KD student, its DMD term from iteration 0)
    train through ``distill-mixins train --config``; their losses reach metrics.jsonl and a rerun skips them."""
    consistency = {"student_optimizer": ADAM, "guidance_scale": 2.0, "tangent_warmup": 2,
                   "derivative": "finite_difference"}
    config = {"run_dir": str(tmp_path / "run"), "stages": [
        stage("kd", 2),
        stage("scm", 2, method="scm", init_from_previous="student", method_config=consistency),
        stage("rcm", 4, method="rcm", init_from_previous="student", method_config={
            **consistency, "critic_optimizer": ADAM, "student_update_freq": 2, "scm_only_iterations": 0}),
    ]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert cli_main(["train", "--config", str(path)]) == 0
    run = tmp_path / "run"
    for name, keys in (("scm", {"loss_scm"}), ("rcm", {"loss_scm", "loss_dmd", "loss_rcm", "loss_fake_score"})):
        records = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
        assert keys <= {key for r in records for key in r}, name
        assert (run / name / "student.safetensors").is_file()
    assert json.loads((run / "rcm" / "config.json").read_text())["distill"]["dmd_reduction"] == "sum"
    manifest = (run / "rcm" / "checkpoints" / "iter_000004" / "manifest.json").read_bytes()
    assert cli_main(["train", "--config", str(path)]) == 0
    assert (run / "rcm" / "checkpoints" / "iter_000004" / "manifest.json").read_bytes() == manifest  # skipped


def test_every_registered_method_resolves():
    """Each run-config method name names a method mixin with its config class (the causal pipeline's included)."""
    assert {"kd", "dmd2", "causal_kd", "self_forcing", "refined_kd", "scm", "rcm"} <= set(METHODS)
    for name in METHODS:
        mixin = method_mixin(name)
        assert hasattr(mixin, "config_class") and mixin.config_class().student_update_freq >= 1
