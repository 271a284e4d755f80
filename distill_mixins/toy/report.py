"""The demo's outputs: the printed table, ``report.md``, ``samples.png`` and the GIFs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from distill_mixins.eval.images import write_png
from distill_mixins.eval.visual import clip_animation, sample_grid, write_gif

if TYPE_CHECKING:
    from distill_mixins.toy.demo import DemoResult

SHOWN = 6
"""Held-out conditions shown in the picture and the GIFs."""
SPEEDUP_GOAL = {"transfer1": 50.0, "predict2.5": 15.0}
"""Wall-clock speedup each recipe's student must reach (NFE ratios 72x and 18x; a teacher step costs a little more
than a student evaluation, so the wall ratio can pass them)."""


def row_label(key: str) -> str:
    """Picture row label of a sampler key: ``student_4step`` -> ``student 4-step``."""
    return {"teacher_36step_cfg": "teacher 36-step CFG", "ground_truth": "ground truth"}.get(
        key, key.replace("_", " ").replace("step", "-step"))


def acceptance(result: DemoResult) -> list[tuple[str, bool, str]]:
    """The goals of the recipe (issue 21): (goal, met, measured)."""
    recipe = result.config.get("recipe", "transfer1")
    from distill_mixins.toy.demo import STUDENT_STEPS, student_key

    name = student_key(STUDENT_STEPS[recipe][0])
    t36, t1, s = (result.samplers[k] for k in ("teacher_36step_cfg", "teacher_1step", name))
    speedup = SPEEDUP_GOAL[recipe]
    goals = [("gap_closed >= 0.95", result.gap_closed >= 0.95, f"{result.gap_closed:.3f}")] \
        if recipe == "transfer1" else []
    return goals + [
        (f"{name} fd <= 1.10 x teacher 36-step fd", s.fd <= 1.10 * t36.fd, f"{s.fd / t36.fd:.3f}x"),
        ("prompt adherence within 0.03 of the teacher", abs(s.prompt_adherence - t36.prompt_adherence) <= 0.03,
         f"{s.prompt_adherence:.3f} vs {t36.prompt_adherence:.3f}"),
        ("temporal consistency within 0.05 of the teacher",
         abs(s.temporal_consistency - t36.temporal_consistency) <= 0.05,
         f"{s.temporal_consistency:.3f} vs {t36.temporal_consistency:.3f}"),
        ("diversity >= 0.85 x the teacher's", s.diversity >= 0.85 * t36.diversity,
         f"{s.diversity / t36.diversity:.3f}x ({s.diversity:.4f} vs {t36.diversity:.4f})"),
        (f"wall-clock speedup >= {speedup:g}x", result.speedup_wall >= speedup, f"{result.speedup_wall:.1f}x"),
        ("teacher 1-step is worse (the gap exists)", t1.fd > t36.fd, f"{t1.fd:.2f} vs {t36.fd:.2f}"),
        ("run time <= 10 minutes", result.elapsed_s <= 600, f"{result.elapsed_s:.0f} s"),
    ]


def format_table(result: DemoResult) -> str:
    """The figures as a fixed-width table (also printed by ``distill-mixins demo``)."""
    head = f"{'sampler':22s} {'FD':>8s} {'FD/floor':>9s} {'adherence':>10s} {'consistency':>12s} " \
           f"{'diversity':>16s} {'speed split':>11s} {'between':>8s} {'NFE':>5s} {'ms/clip':>9s}"
    lines = [head]
    for name, m in result.samplers.items():
        lines.append(
            f"{name:22s} {m.fd:8.2f} {m.fd / result.fd_floor:9.2f} {m.prompt_adherence:10.3f} "
            f"{m.temporal_consistency:12.3f} {m.diversity:8.4f} +-{m.diversity_stderr:6.4f} {m.speed_split:11.3f} "
            f"{m.between_speeds:8.3f} {m.nfe:5d} {1000 * m.latency_s_per_clip:9.2f}"
        )
    lines.append(f"{'real vs real (floor)':22s} {result.fd_floor:8.2f} {1.0:9.2f}")
    lines.append(
        f"gap_closed {result.gap_closed:.3f}   speedup_wall {result.speedup_wall:.1f}x   "
        f"elapsed {result.elapsed_s:.0f} s"
    )
    return "\n".join(lines)


def curve_section(result: DemoResult) -> str:
    """The quality-vs-steps table of ``report.md`` with its picture (empty without the curve)."""
    if not result.curve:
        return ""
    rows = "\n".join(
        f"| {p.sampler} | {p.steps} | {p.nfe} | {p.fd:.3f} | {p.prompt_adherence:.3f} | "
        f"{p.diversity:.4f} +- {p.diversity_stderr:.4f} |" for p in result.curve
    )
    k = result.config["diversity_clips"]
    return f"""
## Quality vs steps

The teacher (DDIM, CFG w = {result.config['guidance']}) at each step count beside the student, on the first {k}
held-out conditions with two noises each (FD on {k} clips is biased upward against the table above: compare these
rows with each other).

| sampler | steps | NFE | FD | adherence | diversity |
|---|---|---|---|---|---|
{rows}

![quality vs steps](steps.png)
"""


CURVE_COLORS = {"teacher": (40, 90, 200), "student": (220, 60, 40)}
"""Line colour of each sampler family in ``steps.png``."""
CURVE_PANELS = {"fd": "FD", "prompt_adherence": "adherence", "diversity": "diversity"}
"""CurvePoint field -> panel of ``steps.png``."""


def write_curve_chart(out: Path, result: DemoResult) -> Path:
    """``steps.png``: FD, adherence and diversity against steps (log axis), one line per sampler family."""
    from distill_mixins.eval.chart import Series, line_chart, line_charts

    families = {name: [p for p in result.curve if p.sampler == name] for name in CURVE_COLORS}
    steps = sorted({p.steps for p in result.curve})
    panels = [
        line_chart([Series(name, [p.steps for p in points], [getattr(p, field) for p in points], CURVE_COLORS[name])
                    for name, points in families.items() if points],
                   title=label, x_label="steps", y_label="", log_x=True, x_ticks=steps)
        for field, label in CURVE_PANELS.items()
    ]
    path = out / "steps.png"
    write_png(path, line_charts(panels))
    return path


def write_visuals(out: Path, clips: dict[str, Tensor], fps: float = 4.0) -> list[Path]:
    """``samples.png`` (rows: teacher 36-step CFG, teacher 1-step, student 1-step, ground truth; columns: first,
    middle, last frame; :data:`SHOWN` held-out conditions) and ``samples.gif`` of the same clips in full."""
    keys = [k for k in clips if k != "ground_truth"] + ["ground_truth"]
    rows = {row_label(key): clips[key][:SHOWN] for key in keys}
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


def student_steps(cfg: dict) -> int:
    """The step count the run's recipe trains its student for."""
    from distill_mixins.toy.demo import STUDENT_STEPS

    return STUDENT_STEPS[cfg.get("recipe", "transfer1")][0]


def student_line(cfg: dict) -> str:
    """How the run's student was trained, in one sentence."""
    dmd2_refine = f", plus the refine term, weight {cfg['dmd2_refine_weight']:g}" if cfg["dmd2_refine_weight"] else ""
    energy = cfg.get("dmd2_energy_weight", 0.0)
    dmd2_refine += f", and the energy-score term on real clips, weight {energy:g}" if energy else ""
    if cfg.get("recipe", "transfer1") == "predict2.5":
        return (f"Student: a copy of the teacher trained by 4-step DMD2 ({cfg['dmd2_iterations']} iterations, "
                f"DMD2Config.cosmos_predict2_5 with the toy's learning rates{dmd2_refine}), sampled at 4 steps and, "
                "the same student, at 2 and 1.")
    refined = (
        f", then refined KD ({cfg['refine_iterations']} iterations: the student regresses the teacher's "
        f"{cfg['refine_teacher_steps']}-step solve of its own sample re-noised to tau {cfg['refine_tau']})"
        if cfg["refine_iterations"] > 0 else ""
    )
    return (f"Student: a copy of the teacher trained by KD on {cfg['pairs']} teacher pairs "
            f"({cfg['kd_iterations']} iterations){refined}, then DMD2 ({cfg['dmd2_iterations']} iterations"
            f"{dmd2_refine}).")


def write_report(out: Path, result: DemoResult, clips: dict[str, Tensor], prompts: list[str]) -> Path:
    """``report.md``: what ran, the table, the goals, the pictures and the prompts shown."""
    write_visuals(out, clips)
    if result.curve:
        write_curve_chart(out, result)
    goals = "\n".join(f"| {goal} | {'yes' if ok else '**no**'} | {value} |" for goal, ok, value in acceptance(result))
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in result.stage_seconds.items())
    shown = "\n".join(f"- sample {i}: {p}" for i, p in enumerate(prompts[:SHOWN]))
    cfg = result.config
    recipe, steps = cfg.get("recipe", "transfer1"), student_steps(cfg)
    text = f"""# distill-mixins demo ({recipe}): a 36-step CFG toy teacher distilled into a {steps}-step student

Teacher: the shipped toy Video2World model (rectified flow, first frame + prompt), sampled with
{cfg['teacher_steps']} DDIM steps (the flow-matching Euler of a rectified-flow model) and classifier-free guidance
w = {cfg['guidance']} (2 network evaluations a step).
{student_line(cfg)}
Evaluated on {cfg['eval_clips']} held-out conditions against
{cfg['eval_clips']} held-out real clips.

```
{format_table(result)}
```

FD: Frechet distance on the features of a fixed, seeded 3D conv network; the floor is the same distance between two
independent sets of real clips. gap_closed = (FD teacher 1-step - FD student) / (FD teacher 1-step - FD teacher
36-step CFG). Diversity: the RMS pixel difference between two samples (two noises) of each of the first
{cfg['diversity_clips']} held-out conditions, +- its standard error; speed split: the share of those conditions (both
samples following the prompt) whose two samples move at different speeds (the prompt does not name the speed: the
data split about half of them, a collapsed generator none); between: the share of clips that miss the prompt by
moving at a constant speed between the data's two (a one-step generator's blend of the two; real clips 0).
Every clip is evaluated as 8-bit video. Latency:
sampling time per clip in batches of {cfg['sample_batch']}, same run. Precision: {precision_line(result)}.
Teacher 36-step clips: {teacher_line(result)}.
Stages: {stages}.

| goal | met | measured |
|---|---|---|
{goals}
{curve_section(result)}
![samples](samples.png)

Animated: [samples.gif](samples.gif). Prompts of the samples shown:

{shown}
"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
