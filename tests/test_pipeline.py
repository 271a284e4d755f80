"""``distill-mixins pipeline self-forcing``: the four stages end to end at tiny sizes (a small untrained toy causal
transformer as the teacher), a rerun skips them all, a stage run alone, and config errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distill_mixins.trainer import FunctionData
from distill_mixins.trainer.pipeline import load_pipeline, run_pipeline

from distill_mixins.cli import main as cli_main
from distill_mixins.errors import ConfigError
from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.text import ToyTextEncoder

HERE = "tests.test_pipeline"
FRAMES, SIZE = 5, 16  # chunks of 2 and 3 frames


def toy_model(mixin, distill):
    """A small causal toy host (16x16 clips, seeded weights perturbed so every layer acts)."""
    torch.manual_seed(0)
    net = ToyCausalDiT(dim=32, depth=2, heads=4, max_frames=8, image_size=SIZE)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cls = type(f"Toy{mixin.__name__}", (mixin, ToyCausalVideo2World), {})
    return cls(net, ToyTextEncoder(), distill=distill)


def clip_batches(n: int = 4, batch: int = 2):
    clips = make_clips(n, seed=1, frames=FRAMES, size=SIZE)
    return [{"clip": clips.video[i : i + batch], "prompt": clips.prompts[i : i + batch]} for i in range(0, n, batch)]


def conditions(model, *, seed: int, batch: int = 2):
    def make(step: int):
        clips = make_clips(batch, seed=seed + step, frames=FRAMES, size=SIZE)
        return {"clip": clips.video, "prompt": clips.prompts}

    return FunctionData(make)


def config(tmp_path: Path, **changes) -> Path:
    data = {
        "run_dir": str(tmp_path / "run"),
        "ode_pairs": {"data": f"{HERE}:clip_batches", "kd_data": {"num_samples": 4, "steps": 4, "batch_size": 2,
                                                                  "sampler": "ddim", "guidance": 2.0}},
        "causal_kd": {"model": f"{HERE}:toy_model", "data_args": {"batch_size": 2},
                      "method_config": {"student_optimizer": {"name": "adamw", "lr": 1e-3}},
                      "trainer": {"iterations": 2, "batch_size": 2, "save_every": 2, "progress": False}},
        "self_forcing": {"model": f"{HERE}:toy_model", "data": f"{HERE}:conditions",
                         "method_config": {"guidance_scale": 2.0, "student_update_freq": 2},
                         "trainer": {"iterations": 2, "batch_size": 2, "save_every": 2, "progress": False}},
        **changes,
    }
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(data))
    return path


def test_all_stages_end_to_end_and_a_rerun_skips_them(tmp_path, capsys):
    path = config(tmp_path)
    assert cli_main(["pipeline", "self-forcing", "--config", str(path)]) == 0
    assert "ode-pairs, causal-kd, bridge, self-forcing done" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "ode_pairs" / "pairs" / "ode_pairs.json").is_file()
    assert (run / "causal_kd" / "student.safetensors").is_file()
    assert (run / "self_forcing" / "student.safetensors").is_file()
    assert json.loads((run / "pipeline_config.json").read_text())["run_dir"] == str(run)
    sf_config = json.loads((run / "self_forcing" / "config.json").read_text())
    assert sf_config["initial_student"].endswith("causal_kd/student.safetensors")  # the bridge
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    assert run_pipeline(load_pipeline(path)) == ["ode-pairs", "causal-kd", "bridge", "self-forcing"]
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and "student" not in p.name]
    assert changed == []  # no shard, pair or checkpoint rewritten: every stage was done


def test_bridge_before_causal_kd_names_the_missing_stage(tmp_path):
    with pytest.raises(ConfigError, match="run --stage causal-kd first"):
        run_pipeline(load_pipeline(config(tmp_path)), "bridge")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="fixes; remove them"):
        load_pipeline(config(tmp_path, causal_kd={"model": f"{HERE}:toy_model", "method": "kd"}))
    with pytest.raises(ConfigError, match="ode_pairs"):
        load_pipeline(config(tmp_path, ode_pairs={"kd_data": {}}))
    with pytest.raises(ConfigError, match="context_noise"):
        path = config(tmp_path)
        data = json.loads(path.read_text())
        data["self_forcing"]["method_config"]["context_noise"] = 3.0
        path.write_text(json.dumps(data))
        from distill_mixins.trainer.stages import check_run_config

        check_run_config(load_pipeline(path).run_config())


def test_the_examples_pipeline_runs_with_its_factories(tmp_path, monkeypatch):
    """examples/self_forcing: its pipeline.json and factories run every stage (sizes shrunk to seconds)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "self_forcing"
    monkeypatch.syspath_prepend(str(example))
    data = json.loads((example / "pipeline.json").read_text())
    data["run_dir"] = str(tmp_path / "run")
    data["ode_pairs"]["data_args"] = {"num_clips": 2, "batch_size": 2}
    data["ode_pairs"]["kd_data"].update(num_samples=2, steps=4, batch_size=2)
    for stage in ("causal_kd", "self_forcing"):
        data[stage]["data_args"]["batch_size"] = 2
        data[stage]["trainer"].update(iterations=2, batch_size=2, save_every=2, progress=False)
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(data))
    assert run_pipeline(load_pipeline(path)) == ["ode-pairs", "causal-kd", "bridge", "self-forcing"]
    assert (tmp_path / "run" / "self_forcing" / "student.safetensors").is_file()
