"""The demo's outputs: the printed table, ``report.md``, ``samples.png`` and the GIFs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from distill_mixins.eval.images import write_png
from distill_mixins.eval.visual import clip_animation, sample_grid, write_gif

if TYPE_CHECKING:
    from distill_mixins.toy.demo import DemoResult

ROWS = {
    "teacher_36step_cfg": "teacher 36-step CFG",
    "teacher_1step": "teacher 1-step",
    "student_1step": "student 1-step",
    "ground_truth": "ground truth",
}
"""Sampler key -> row label of the picture, top to bottom."""
SHOWN = 6
"""Held-out conditions shown in the picture and the GIFs."""


def acceptance(result: DemoResult) -> list[tuple[str, bool, str]]:
    """The issue's goals: (goal, met, measured)."""
    t36, t1, s1 = (result.samplers[k] for k in ("teacher_36step_cfg", "teacher_1step", "student_1step"))
    return [
        ("gap_closed >= 0.85", result.gap_closed >= 0.85, f"{result.gap_closed:.3f}"),
        ("student fd <= 1.25 x teacher 36-step fd", s1.fd <= 1.25 * t36.fd, f"{s1.fd / t36.fd:.3f}x"),
        ("prompt adherence within 0.05 of the teacher", abs(s1.prompt_adherence - t36.prompt_adherence) <= 0.05,
         f"{s1.prompt_adherence:.3f} vs {t36.prompt_adherence:.3f}"),
        ("temporal consistency within 0.05 of the teacher",
         abs(s1.temporal_consistency - t36.temporal_consistency) <= 0.05,
         f"{s1.temporal_consistency:.3f} vs {t36.temporal_consistency:.3f}"),
        ("wall-clock speedup >= 50x", result.speedup_wall >= 50, f"{result.speedup_wall:.1f}x"),
        ("teacher 1-step is worse (the gap exists)", t1.fd > t36.fd, f"{t1.fd:.2f} vs {t36.fd:.2f}"),
        ("run time <= 10 minutes", result.elapsed_s <= 600, f"{result.elapsed_s:.0f} s"),
    ]


def format_table(result: DemoResult) -> str:
    """The figures as a fixed-width table (also printed by ``distill-mixins demo``)."""
    head = f"{'sampler':22s} {'FD':>8s} {'FD/floor':>9s} {'adherence':>10s} {'consistency':>12s} " \
           f"{'diversity':>10s} {'NFE':>5s} {'ms/clip':>9s}"
    lines = [head]
    for name, m in result.samplers.items():
        lines.append(
            f"{name:22s} {m.fd:8.2f} {m.fd / result.fd_floor:9.2f} {m.prompt_adherence:10.3f} "
            f"{m.temporal_consistency:12.3f} {m.diversity:10.4f} {m.nfe:5d} {1000 * m.latency_s_per_clip:9.2f}"
        )
    lines.append(f"{'real vs real (floor)':22s} {result.fd_floor:8.2f} {1.0:9.2f}")
    lines.append(
        f"gap_closed {result.gap_closed:.3f}   speedup_wall {result.speedup_wall:.1f}x   "
        f"elapsed {result.elapsed_s:.0f} s"
    )
    return "\n".join(lines)


def write_visuals(out: Path, clips: dict[str, Tensor], fps: float = 4.0) -> list[Path]:
    """``samples.png`` (rows: teacher 36-step CFG, teacher 1-step, student 1-step, ground truth; columns: first,
    middle, last frame; :data:`SHOWN` held-out conditions) and ``samples.gif`` of the same clips in full."""
    rows = {label: clips[key][:SHOWN] for key, label in ROWS.items()}
    png, gif = out / "samples.png", out / "samples.gif"
    write_png(png, sample_grid(rows, samples=SHOWN, title="held-out conditions"))
    write_gif(gif, clip_animation(rows, samples=SHOWN), fps)
    return [png, gif]


def precision_line(result: DemoResult) -> str:
    """What ran, e.g. ``fp32 (requested auto: CPU (AVX2) without AMX or AVX512-BF16 ...)``."""
    p = result.precision
    return f"{p['resolved']} (requested {p['requested']}; {p['reason']})"


def teacher_line(result: DemoResult) -> str:
    """Where the 36-step teacher's clips came from, with the spot check when they were shipped."""
    source = result.teacher_samples
    if source.get("source") != "shipped":
        return "sampled in this run"
    check = source["spot_check"]
    return (
        f"the shipped samples (`{source['made_by']}`), spot-checked in this run: {check['clips']} held-out conditions "
        f"re-sampled, mean per-clip |difference| {check['mean_abs']:.4f} (largest {check['max_abs']:.4f}; one 8-bit "
        f"level is 0.0078), {100 * check['share_within']:.0f}% within {check['tolerance']}; the teacher's latency is "
        "timed on them"
    )


def write_report(out: Path, result: DemoResult, clips: dict[str, Tensor], prompts: list[str]) -> Path:
    """``report.md``: what ran, the table, the goals, the pictures and the prompts shown."""
    write_visuals(out, clips)
    goals = "\n".join(f"| {goal} | {'yes' if ok else '**no**'} | {value} |" for goal, ok, value in acceptance(result))
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in result.stage_seconds.items())
    shown = "\n".join(f"- sample {i}: {p}" for i, p in enumerate(prompts[:SHOWN]))
    cfg = result.config
    refined = (
        f", then refined KD ({cfg['refine_iterations']} iterations: the student regresses the teacher's "
        f"{cfg['refine_teacher_steps']}-step solve of its own sample re-noised to tau {cfg['refine_tau']})"
        if cfg["refine_iterations"] > 0 else ""
    )
    dmd2_refine = f", plus the refine term, weight {cfg['dmd2_refine_weight']:g}" if cfg["dmd2_refine_weight"] else ""
    text = f"""# distill-mixins demo: a 36-step CFG toy teacher distilled into a 1-step student

Teacher: the shipped toy Video2World model (rectified flow, first frame + prompt), sampled with
{cfg['teacher_steps']} DDIM steps (the flow-matching Euler of a rectified-flow model) and classifier-free guidance
w = {cfg['guidance']} (2 network evaluations a step).
Student: a copy of the teacher trained by KD on {cfg['pairs']} teacher pairs
({cfg['kd_iterations']} iterations){refined}, then DMD2 ({cfg['dmd2_iterations']} iterations{dmd2_refine}).
Evaluated on {cfg['eval_clips']} held-out conditions against
{cfg['eval_clips']} held-out real clips.

```
{format_table(result)}
```

FD: Frechet distance on the features of a fixed, seeded 3D conv network; the floor is the same distance between two
independent sets of real clips. gap_closed = (FD teacher 1-step - FD student) / (FD teacher 1-step - FD teacher
36-step CFG). Every clip is evaluated as 8-bit video. Latency: sampling time per clip in batches of
{cfg['sample_batch']}, same run. Precision: {precision_line(result)}. Teacher 36-step clips: {teacher_line(result)}.
Stages: {stages}.

| goal | met | measured |
|---|---|---|
{goals}

![samples](samples.png)

Animated: [samples.gif](samples.gif). Prompts of the samples shown:

{shown}
"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
