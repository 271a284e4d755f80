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
    shifted = causal_kd_model(CausalKDRunConfig.quick(out=str(tmp_path), teacher_weights=str(dit_teacher),
                                                      student_shift=1.0))  # RF times 1, 3/4, 1/2, 1/4
    ts = shifted.student_times()
    torch.testing.assert_close(torch.sin(ts) / (torch.sin(ts) + torch.cos(ts)),
                               torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="CausalKDRunConfig.student_shift=0.0 must be > 0"):
        CausalKDRunConfig(teacher_weights=str(dit_teacher), student_shift=0.0)


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


def test_teacher_samples_of_a_transformer_teacher_run_on_its_causal_host(dit_teacher, tmp_path, monkeypatch):
    """The transformer trained with the given frame at the conditional time (per-frame times): its samples come
    from the causal host, equal to that host's own teacher sampler, not the UNet's host."""
    from distill_mixins.cli import main
    from distill_mixins.methods.causal_kd import CausalKDConfig
    from distill_mixins.toy.causal_dit import ToyCausalVideo2World
    from distill_mixins.toy.causal_kd import ToyCausalKD
    from distill_mixins.toy.cli import sampling_model
    from distill_mixins.toy.evalset import (
        NOISE_SEED,
        as_8bit,
        eval_noise,
        held_out,
        load_teacher_samples,
        teacher_sampler,
    )
    from distill_mixins.toy.train import WEIGHTS, load_toy_teacher

    assert isinstance(sampling_model(load_toy_teacher(dit_teacher)), ToyCausalVideo2World)
    teacher = load_toy_teacher(dit_teacher)
    model = ToyCausalKD(teacher.net, teacher.text_encoder, distill=CausalKDConfig())  # the reference sampler
    assert not isinstance(sampling_model(load_toy_teacher(WEIGHTS)), ToyCausalVideo2World)
    out = tmp_path / "samples.xz"
    monkeypatch.setattr("sys.argv", ["distill-mixins", "toy-teacher-samples"])
    assert main(["toy-teacher-samples", "--teacher-weights", str(dit_teacher), "--out", str(out), "--clips", "2",
                 "--again", "1", "--steps", "2"]) == 0
    shipped = load_teacher_samples(out)
    held = held_out(2)
    x0, condition, uncondition = model.get_data_and_condition({"clip": held.video, "prompt": held.prompts})
    noise = eval_noise(2, tuple(held.video.shape[1:]), NOISE_SEED)
    with torch.no_grad():
        clips = model.decode(teacher_sampler(model, 2, 3.0)(condition, uncondition, noise).float())
    assert torch.equal(as_8bit(clips), as_8bit(shipped.clips)) and shipped.again.shape[0] == 1


def test_symmetric_ode_pairs_move_the_clip_the_path_and_the_prompt(dit_teacher, tmp_path, monkeypatch):
    """``--symmetries`` (toy-causal-kd) and ``kd_symmetries`` (demo-causal): CausalKD's batches are the ODE pairs'
    batches with each sample moved by one symmetry of the square (clip, noise, clean latent, every path state and
    the prompt's direction), the path's times kept; the run trains on them."""
    from distill_mixins.trainer.pipeline import ode_pair_data

    from distill_mixins.methods.kd import KD_NOISE, KD_PATH, KD_PATH_T, KD_TEACHER_X0
    from distill_mixins.toy import causal_kd
    from distill_mixins.toy.symmetry import SYMMETRIES, symmetric_ode_pairs

    calls = []  # the run's CausalKD stage must draw its batches from the symmetric pairs

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return symmetric_ode_pairs(*args, **kwargs)

    monkeypatch.setattr(causal_kd, "symmetric_ode_pairs", spy)

    config = CausalKDRunConfig.quick(out=str(tmp_path), teacher_weights=str(dit_teacher), precision="fp32",
                                     pairs=8, teacher_steps=4, eval_clips=8, sample_batch=8, symmetries=True)
    result = run_causal_kd(config)
    assert math.isfinite(result.samplers["student_streaming"]["fd"])
    root = str(tmp_path / "ode_pairs")
    assert calls == [{"seed": config.seed, "root": root, "batch_size": config.batch_size}]
    plain, moved = (f(None, seed=3, root=root, batch_size=8).batch(0) for f in (ode_pair_data, symmetric_ode_pairs))
    identity = 0
    for i, prompt in enumerate(moved["prompt"]):
        g = next(g for g in SYMMETRIES if g.prompt(plain["prompt"][i]) == prompt
                 and torch.equal(moved["clip"][i], g.apply(plain["clip"][i])))
        identity += g == SYMMETRIES[0]
        for key in (KD_NOISE, KD_TEACHER_X0, KD_PATH):
            assert torch.equal(moved[key][i], g.apply(plain[key][i])), key
    assert torch.equal(moved[KD_PATH_T], plain[KD_PATH_T])
    assert identity < 8  # the samples did move
