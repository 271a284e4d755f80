"""The causal demo's outputs: the printed tables, ``report.md``, ``long_rollouts.png``, ``samples.png`` and the GIFs
(:mod:`distill_mixins.toy.demo_causal`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from distill_mixins.eval.images import write_png
from distill_mixins.eval.visual import clip_animation, sample_grid, write_gif

if TYPE_CHECKING:
    from distill_mixins.toy.demo_causal import CausalDemoResult

SHOWN = 4
"""Held-out conditions shown in the pictures and the GIFs."""
LABELS = {"teacher_cfg": "teacher CFG", "causal_kd": "CausalKD", "self_forcing": "Self-Forcing",
          "ground_truth": "real clip"}


def acceptance(result: CausalDemoResult) -> list[tuple[str, bool, str]]:
    """Issue 19's demo goals: (goal, met, measured)."""
    teacher, kd, sf = (result.samplers[k] for k in ("teacher_cfg", "causal_kd", "self_forcing"))
    longest = max(sf.long) if sf.long else None
    goals = [("Self-Forcing FD at 8 frames <= 1.25 x the teacher's", sf.fd <= 1.25 * teacher.fd,
              f"{sf.fd / teacher.fd:.3f}x ({sf.fd:.2f} vs {teacher.fd:.2f})")]
    if longest is not None:
        sf_last, kd_last = sf.long[longest].fd_windows[-1], kd.long[longest].fd_windows[-1]
        goals.append((f"last 8-frame window of {longest}-frame rollouts: Self-Forcing FD < CausalKD FD",
                      sf_last < kd_last, f"{sf_last:.2f} vs {kd_last:.2f}"))
    limit = float(result.config["time_goal_s"])
    goals.append((f"run time <= {limit / 60:g} minutes", result.elapsed_s <= limit, f"{result.elapsed_s:.0f} s"))
    return goals


def format_table(result: CausalDemoResult) -> str:
    """The 8-frame figures of every sampler."""
    lines = [f"{'sampler':14s} {'FD':>8s} {'FD/floor':>9s} {'adherence':>10s} {'consistency':>12s} "
             f"{'diversity':>16s} {'first chunk s':>14s} {'frames/s':>9s}"]
    for name, m in result.samplers.items():
        lines.append(f"{name:14s} {m.fd:8.2f} {m.fd / result.fd_floor:9.2f} {m.prompt_adherence:10.3f} "
                     f"{m.temporal_consistency:12.3f} {m.diversity:8.4f}+-{m.diversity_stderr:.4f} "
                     f"{m.first_chunk_s:14.3f} {m.frames_per_s:9.1f}")
    lines.append(f"{'real clips':14s} {result.fd_floor:8.2f} {1.0:9.2f} (FD floor: two real sets)")
    return "\n".join(lines)


def format_long_table(result: CausalDemoResult) -> str:
    """FD of every 8-frame window along the students' long rollouts (and the real-vs-real floor of each window),
    adherence and consistency over the whole rollout."""
    lines = []
    students = {name: m for name, m in result.samplers.items() if m.long}
    for frames in sorted({f for m in students.values() for f in m.long}):
        some = next(iter(students.values())).long[frames]
        windows = " ".join(f"{f'{8 * w}-{8 * w + 7}':>8s}" for w in range(len(some.fd_windows)))
        lines.append(f"{frames} frames ({some.clips} conditions)   FD of window {windows}  adherence  consistency")
        for name, m in students.items():
            roll = m.long[frames]
            fds = " ".join(f"{v:8.2f}" for v in roll.fd_windows)
            lines.append(f"  {name:28s} {fds}  {roll.prompt_adherence:9.3f}  {roll.temporal_consistency:11.3f}")
        lines.append(f"  {'real clips (floor)':28s} {' '.join(f'{v:8.2f}' for v in some.fd_floor_windows)}")
    return "\n".join(lines)


def write_visuals(out: Path, clips: dict[str, Tensor], long_clips: dict[str, Tensor], fps: float = 4.0) -> list[Path]:
    """``samples.png`` (8 frames: teacher, students, real; first, middle, last frame), ``long_rollouts.png`` (the
    longest rollouts of both students under the real clip, every 8th frame and the last) and ``long_rollouts.gif``."""
    paths = [out / "samples.png", out / "long_rollouts.png", out / "long_rollouts.gif"]
    rows = {LABELS[k]: v[:SHOWN] for k, v in clips.items()}
    write_png(paths[0], sample_grid(rows, samples=SHOWN, title="held-out conditions, 8 frames"))
    if not long_clips:
        return paths[:1]
    order = ("ground_truth", "causal_kd", "self_forcing")
    long_rows = {LABELS[k]: long_clips[k][:SHOWN] for k in order if k in long_clips}
    frames = long_clips["ground_truth"].shape[2]
    shown = sorted({*range(0, frames, 8), frames - 1})
    write_png(paths[1], sample_grid(long_rows, samples=SHOWN, frames=shown,
                                    title=f"{frames}-frame rollouts (trained on 8 frames)"))
    write_gif(paths[2], clip_animation(long_rows, samples=SHOWN), fps)
    return paths


def write_causal_report(out: Path, result: CausalDemoResult, clips: dict[str, Tensor],
                        long_clips: dict[str, Tensor], prompts: list[str]) -> Path:
    """``report.md``: what ran, the two tables, the goals, the pictures and the prompts shown."""
    write_visuals(out, clips, long_clips)
    cfg = result.config
    goals = "\n".join(f"| {goal} | {'yes' if ok else '**no**'} | {value} |"
                      for goal, ok, value in acceptance(result))
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in result.stage_seconds.items())
    shown = "\n".join(f"- sample {i}: {p}" for i, p in enumerate(prompts[:SHOWN]))
    p = result.precision
    text = f"""# distill-mixins causal demo: ODE pairs -> CausalKD -> Self-Forcing on the toy transformer teacher

Teacher: the bidirectional toy transformer ({cfg['teacher_weights'] or 'shipped'}), {cfg['teacher_steps']} DDIM steps
with CFG w = {cfg['guidance']}. Its ODE pairs ({cfg['pairs']} conditions) trained a causal student (chunks of 3
frames, 4 steps a chunk) by CausalKD for {cfg['kd_iterations']} iterations; Self-Forcing then trained it for
{cfg['sf_iterations']} iterations on its own rollouts against the teacher with DMD. The students stream chunk by chunk
through their KV cache. Evaluated on {cfg['eval_clips']} held-out conditions (8 frames; diversity on the first
{cfg['diversity_clips']}, sampled twice), long rollouts on the first {cfg['long_clips']}.

```
{format_table(result)}
```

Long rollouts (the students were trained on 8 frames; the real clips keep bouncing):

```
{format_long_table(result)}
```

FD: Frechet distance on the features of a fixed, seeded 3D conv network, against held-out real clips (each window
against the same frames of real clips; floor: two real sets, biased upward on fewer than 1,000 clips). First chunk
and frames/s: one clip, median of {cfg['timing_repeats']} runs (the teacher's first chunk is its whole clip).
Precision: {p['resolved']} (requested {p['requested']}; {p['reason']}). Teacher clips:
{result.teacher_samples.get('source', '')}. Stages: {stages}; in all {result.elapsed_s:.0f} s.

| goal | met | measured |
|---|---|---|
{goals}

![long rollouts](long_rollouts.png)

Animated: [long_rollouts.gif](long_rollouts.gif). At 8 frames: ![samples](samples.png)

Prompts of the samples shown:

{shown}
"""
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
