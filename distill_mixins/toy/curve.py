"""The demo's quality-vs-steps curve: the teacher (DDIM with CFG) at 1, 2, 4, 8 and ``teacher_steps`` steps, and
each student at the steps it supports, on the demo's diversity conditions (the first ``diversity_clips`` held-out
conditions, each sampled from two noises), so a user sees where a student stands on the teacher's own curve.

The teacher's 1-step and ``teacher_steps`` rows and the students' rows reuse the clips of the main evaluation; only
the intermediate teacher step counts are sampled here (``2 * (2 + 4 + 8) = 28`` network evaluations a clip, twice).
FD on K clips is biased upward against the main table's (1,024 clips): compare the curve's rows with each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.evalset import (
    AGAIN_SEED,
    NOISE_SEED,
    REFERENCE_SEED,
    eval_noise,
    held_out,
    run_sampler,
    teacher_sampler,
)

if TYPE_CHECKING:
    from distill_mixins.toy.demo import DemoConfig, Evaluation

TEACHER_STEPS = (1, 2, 4, 8)
"""Teacher step counts of the curve besides the demo's ``teacher_steps``."""


@dataclass
class CurvePoint:
    """One sampler at one step count on K conditions: FD against K held-out real clips, prompt adherence over the K
    first samples, diversity (mean RMS pixel difference of the two samples of a condition) and its standard error."""

    sampler: str
    steps: int
    nfe: int
    fd: float
    prompt_adherence: float
    diversity: float
    diversity_stderr: float


def _point(sampler: str, steps: int, nfe: int, first: Tensor, again: Tensor, reference: Tensor,
           prompts: list[str], net: Any) -> CurvePoint:
    from distill_mixins.eval.motion import diversity_stats
    from distill_mixins.eval.video import evaluate_clips

    figures = evaluate_clips(first, reference, prompts, net=net)
    spread = diversity_stats(first, again, prompts)
    return CurvePoint(sampler, steps, nfe, figures.fd, figures.prompt_adherence, spread.mean, spread.stderr)


def steps_curve(model: Any, config: DemoConfig, evaluation: Evaluation) -> list[CurvePoint]:
    """The curve's points, teacher first (ascending steps), then the students (see the module docstring)."""
    from distill_mixins.eval.video import VideoFeatureNet

    k = config.diversity_clips
    held = held_out(k)
    reference = make_clips(config.eval_clips, REFERENCE_SEED).head(k).video
    shape = tuple(held.video.shape[1:])
    noises = eval_noise(k, shape, NOISE_SEED), eval_noise(k, shape, AGAIN_SEED)
    reused: Mapping[int, str] = {1: "teacher_1step", config.teacher_steps: "teacher_36step_cfg"}
    net = VideoFeatureNet()
    points = []
    for steps in sorted({*TEACHER_STEPS, config.teacher_steps}):
        if steps in reused:
            first, again = evaluation.clips[reused[steps]][:k], evaluation.again[reused[steps]]
        else:
            sampler = teacher_sampler(model, steps, config.guidance)
            first, again = (run_sampler(model, sampler, held, noise, batch=config.sample_batch,
                                        precision=config.precision, desc=f"teacher {steps}-step ({i + 1}/2)").clips
                            for i, noise in enumerate(noises))
        points.append(_point("teacher", steps, 2 * steps, first, again, reference, held.prompts, net))
    students = sorted((m.nfe, key) for key, m in evaluation.figures.items() if key.startswith("student_"))
    for steps, key in students:  # a student's NFE is its step count (no CFG)
        points.append(_point("student", steps, steps, evaluation.clips[key][:k], evaluation.again[key], reference,
                             held.prompts, net))
    return points
