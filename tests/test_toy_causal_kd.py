"""The toy CausalKD pipeline end to end at CI size: a (random) transformer teacher -> ODE pairs -> CausalKD ->
streaming evaluation; the student starts from the teacher's weights; a re-run resumes to the same figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill_mixins.toy.causal_dit import ToyCausalDiT
from distill_mixins.toy.causal_kd import CausalKDRunConfig, causal_kd_model, run_causal_kd
from distill_mixins.toy.host import ToyVideo2World
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.train import save_teacher, teacher_arch


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    """A seeded, untrained transformer teacher file (its zero-initialised output layers perturbed so it acts)."""
    torch.manual_seed(0)
    host = ToyVideo2World(ToyCausalDiT(), ToyTextEncoder())
    with torch.no_grad():
        for p in host.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("dit") / "toy_dit_teacher.safetensors"
    save_teacher(path, host, {"config": json.dumps({"arch": "dit"})})
    return path


def test_the_student_starts_from_the_teachers_weights(dit_teacher, tmp_path):
    config = CausalKDRunConfig.quick(out=str(tmp_path), teacher_weights=str(dit_teacher), precision="fp32")
    assert teacher_arch(dit_teacher) == "dit"
    model = causal_kd_model(config)
    teacher, student = model.net_teacher.state_dict(), model.net.state_dict()
    assert teacher.keys() == student.keys() and all(torch.equal(teacher[k], student[k]) for k in teacher)
    assert model.chunk_size == 3 and len(model.student_times()) == 4


def test_pipeline_runs_and_resumes(dit_teacher, tmp_path):
    config = CausalKDRunConfig.quick(out=str(tmp_path), teacher_weights=str(dit_teacher), precision="fp32",
                                     pairs=8, teacher_steps=4, eval_clips=8, sample_batch=8)
    result = run_causal_kd(config)
    assert set(result.samplers) == {"teacher_cfg", "teacher_1step", "student_streaming"}
    for figures in result.samplers.values():
        assert all(math.isfinite(figures[k]) for k in ("fd", "prompt_adherence", "temporal_consistency"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["samplers"]["student_streaming"]["fd"] == result.samplers["student_streaming"]["fd"]
    assert (tmp_path / "ode_pairs" / "pairs" / "ode_pairs.json").is_file()
    again = run_causal_kd(config)  # every stage done: the pairs and the training are skipped, the figures equal
    for name, figures in result.samplers.items():
        assert {k: v for k, v in again.samplers[name].items() if k != "seconds_per_clip"} == {
            k: v for k, v in figures.items() if k != "seconds_per_clip"}


def test_a_unet_teacher_is_refused(tmp_path):
    host = ToyVideo2World()
    path = tmp_path / "unet.safetensors"
    save_teacher(path, host, {})
    with pytest.raises(ValueError, match="needs the transformer teacher"):
        causal_kd_model(CausalKDRunConfig.quick(out=str(tmp_path), teacher_weights=str(path)))
    with pytest.raises(ValueError, match="is not a file"):
        CausalKDRunConfig(teacher_weights=str(tmp_path / "missing.safetensors"))
