"""The causal demo (``distill-mixins demo-causal``): the shipped bidirectional toy transformer teacher -> ODE pairs ->
CausalKD -> bridge -> Self-Forcing, run as the library's pipeline (:mod:`distill_mixins.trainer.pipeline`, the same
stages a user runs with ``distill-mixins pipeline self-forcing``), then three samplers on held-out conditions:

* the teacher, ``teacher_steps`` DDIM steps with CFG over the training length (8 frames; the shipped samples when
  they match the weights, spot-checked);
* the CausalKD student and the Self-Forcing student, streaming chunk by chunk with their KV cache (K steps a chunk).

Figures (``metrics.json``, ``report.md``): FD against held-out real clips, prompt adherence, temporal consistency
and diversity at 8 frames; on rollouts ``rollouts`` times longer (the students only: the teacher is bidirectional
over its clip), the FD of every 8-frame window along the rollout against the same window of longer real clips
(drift), adherence and consistency over the whole rollout; time to the first chunk and frames per second of one
clip. ``long_rollouts.png`` shows long rollouts of both students under the real clip; ``samples.gif`` animates them.

Resumable: a re-run of the same command skips the finished stages (the evaluation always runs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from distill_mixins.causal import StreamedChunk, generate_causal
from distill_mixins.checkpointer.files import write_text_atomic
from distill_mixins.precision import PrecisionReport, autocast, check_precision
from distill_mixins.run_config import build_dataclass
from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.clips import ToyClips, make_clips, render_specs
from distill_mixins.toy.demo import TRAIN_SEED, TRAINER_AUTOCAST
from distill_mixins.toy.evalset import (
    NOISE_SEED,
    REFERENCE_SEED,
    HeldOutSet,
    Sampler,
    eval_noise,
    held_out,
    held_out_set,
    run_sampler,
    spot_checked,
    teacher_sampler,
    teacher_samples_file,
    teacher_settings,
    usable_samples,
)
from distill_mixins.toy.train import dit_teacher_file, load_toy_teacher
from distill_mixins.trainer import FunctionData
from distill_mixins.trainer.pipeline import ODE_PAIRS_DIR, SelfForcingPipeline, run_pipeline
from distill_mixins.trainer.stages import EMA_FILE, STUDENT_FILE

WINDOW = 8
"""Frames of the teacher's clip (the training length); long rollouts are scored window by window."""
SF_SEED = 5_000_005
"""Seed of the Self-Forcing stage's procedural conditions."""
SAMPLERS = ("teacher_cfg", "causal_kd", "self_forcing")


@dataclass
class CausalDemoConfig:
    """Sizes and settings of the causal demo (defaults: the full demo; :meth:`quick` for CI)."""

    out: str = "runs/demo-causal"
    teacher_weights: str | None = None
    """The bidirectional transformer teacher (``toy-teacher --arch dit``); None: the shipped one."""
    pairs: int = 256
    teacher_steps: int = 36
    guidance: float = 3.0
    kd_iterations: int = 300
    kd_batch: int = 16
    kd_lr: float = 1e-4
    kd_symmetries: bool = False
    """Move each ODE pair by a random rotation or reflection of the square world in CausalKD
    (:func:`~distill_mixins.toy.symmetry.symmetric_ode_pairs`)."""
    sf_iterations: int = 60
    sf_batch: int = 8
    sf_student_lr: float = 5e-5
    sf_critic_lr: float = 5e-4
    """Self-Forcing's student and critic learning rates: 5x the first demo's 1e-5 / 1e-4, which moved FD at 8
    frames only 0.54 -> 0.51 in the demo's 60 iterations (5e-5 / 5e-4: 0.44; docs/methods/self_forcing.md)."""
    sf_update_freq: int = 2
    """One student update every ``sf_update_freq`` iterations (2: one critic update per student update; the
    published pace is 5)."""
    sf_guidance: float | None = None
    """The DMD teacher's CFG scale in Self-Forcing; None: ``guidance`` (the ODE pairs' scale). From the 1,000-iteration
    CausalKD student, 2 with ``sf_update_freq=5`` reached the 1.25x FD goal (docs/methods/self_forcing.md)."""
    context_noise: float = 0.0
    """TrigFlow time of the clean context frames in both stages and at inference (0: none)."""
    student_shift: float = 5.0
    """Rectified-flow shift of the students' ``cosmos_4step`` times (ODE pairs, both stages, inference); 5: the
    published Self-Forcing grid (RF times 1, 0.9375, 0.833, 0.625). Shift 1 (1, 0.75, 0.5, 0.25, the toy teacher's
    own grid) gives this default run a better 8-frame FD (0.40 vs 0.44) and worse long-rollout windows, and the
    larger run a worse one (0.32-0.33 vs 0.30): docs/methods/self_forcing.md."""
    eval_clips: int = 1024
    diversity_clips: int = 256
    long_clips: int = 256
    rollouts: tuple[int, ...] = (2, 4)
    """Long rollouts, as multiples of the 8-frame training length."""
    timing_repeats: int = 3
    spot_check: int = 16
    """Held-out conditions the teacher re-samples to check its shipped samples (and to be timed)."""
    sample_batch: int = 64
    precision: str = "auto"
    seed: int = 0
    time_goal_s: float = 900.0
    """The whole run's time goal in the report (issue 19: 15 minutes on 2 cores in float32; :meth:`quick`: 2)."""

    def __post_init__(self) -> None:
        for name in ("pairs", "teacher_steps", "kd_batch", "sf_batch", "sf_update_freq", "eval_clips",
                     "diversity_clips", "long_clips", "timing_repeats", "spot_check", "sample_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"CausalDemoConfig.{name}={getattr(self, name)} must be >= 1.")
        for name in ("kd_iterations", "sf_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"CausalDemoConfig.{name}={getattr(self, name)} must be >= 1 (each stage trains).")
        for name in ("kd_lr", "sf_student_lr", "sf_critic_lr", "guidance", "student_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CausalDemoConfig.{name}={getattr(self, name)} must be > 0.")
        if self.sf_guidance is not None and not self.sf_guidance > 0:
            raise ValueError(f"CausalDemoConfig.sf_guidance={self.sf_guidance} must be > 0 (None: guidance).")
        if self.diversity_clips > self.eval_clips:
            raise ValueError(f"CausalDemoConfig.diversity_clips={self.diversity_clips} must be <= eval_clips="
                             f"{self.eval_clips}.")
        self.rollouts = tuple(self.rollouts)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 2 for r in self.rollouts):
            raise ValueError(f"CausalDemoConfig.rollouts={self.rollouts}: give whole multiples >= 2 of the "
                             f"{WINDOW}-frame training length, e.g. (2, 4).")
        check_precision(self.precision, "CausalDemoConfig.precision")
        dit_teacher_file(self.teacher_weights, "CausalDemoConfig.teacher_weights")

    @property
    def weights(self) -> Path:
        """The teacher's weights file."""
        return dit_teacher_file(self.teacher_weights, f"{type(self).__name__}.teacher_weights")

    @classmethod
    def quick(cls, **overrides: Any) -> CausalDemoConfig:
        """A CI-sized run (under 2 minutes on 2 cores): few pairs, iterations and clips, 8 teacher steps."""
        values: dict[str, Any] = {
            "out": "runs/demo-causal-quick", "pairs": 16, "teacher_steps": 8, "kd_iterations": 4, "kd_batch": 4,
            "sf_iterations": 4, "sf_batch": 2, "eval_clips": 16, "diversity_clips": 8, "long_clips": 8,
            "timing_repeats": 1, "spot_check": 2, "sample_batch": 16, "time_goal_s": 120.0,
        }
        return cls(**{**values, **overrides})


# ------------------------------------------------------------------------------ the pipeline's factories


def build_model(mixin: type, distill: Any, teacher_weights: str) -> Any:
    """``mixin`` composed onto the toy causal host with the transformer teacher of ``teacher_weights`` (the student
    and the critic start from its weights)."""
    host = load_toy_teacher(teacher_weights)
    if not isinstance(host.net, ToyCausalDiT):
        raise ValueError(f"{teacher_weights} holds a {type(host.net).__name__} teacher: the causal demo needs the "
                         "transformer teacher (`toy-teacher --arch dit`).")
    composed = type(f"Toy{mixin.__name__}", (mixin, ToyCausalVideo2World), {})
    return composed(host.net, host.text_encoder, distill=distill)


def teacher_batches(num_clips: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The training conditions the teacher's ODE pairs are solved for (the main demo's training clips)."""
    clips = make_clips(num_clips, TRAIN_SEED)
    for start in range(0, num_clips, batch_size):
        yield {"clip": clips.video[start : start + batch_size], "prompt": clips.prompts[start : start + batch_size]}


def conditions(model: Any, *, seed: int, batch_size: int) -> FunctionData:
    """Self-Forcing's data: micro-batch ``step`` is a batch of fresh procedural clips (their first frames and
    prompts are the conditions), a pure function of ``step``."""

    def batch(step: int) -> dict[str, Any]:
        clips = make_clips(batch_size, SF_SEED + seed * 1_000_003 + step)
        return {"clip": clips.video, "prompt": clips.prompts}

    return FunctionData(batch)


KD_BETAS, SF_BETAS = [0.9, 0.99], [0.0, 0.999]
"""AdamW betas of CausalKD (regression) and of Self-Forcing's student and critic (the published DMD values)."""


def _adamw(lr: float, betas: list[float]) -> dict[str, Any]:
    return {"name": "adamw", "lr": lr, "betas": betas, "weight_decay": 0.0, "grad_clip": 1.0}


def demo_pipeline(config: CausalDemoConfig) -> SelfForcingPipeline:
    """The demo's stages as a pipeline config (what ``pipeline_config.json`` in the run directory holds)."""
    model = f"{__name__}:build_model"
    model_args = {"teacher_weights": str(config.weights)}
    autocast_mode = TRAINER_AUTOCAST[config.precision]

    def trainer(iterations: int, batch: int) -> dict[str, Any]:
        return {"iterations": iterations, "batch_size": batch, "autocast": autocast_mode, "log_every": 25,
                "save_every": max(1, min(100, iterations)), "keep_last": 1}

    kd_data: dict[str, Any] = {"data_args": {"batch_size": config.kd_batch}}
    if config.kd_symmetries:
        kd_data = {"data": "distill_mixins.toy.symmetry:symmetric_ode_pairs",
                   "data_args": {"batch_size": config.kd_batch, "root": str(Path(config.out) / ODE_PAIRS_DIR)}}
    data = {
        "run_dir": config.out, "seed": config.seed,
        "ode_pairs": {
            "data": f"{__name__}:teacher_batches",
            "data_args": {"num_clips": config.pairs, "batch_size": config.sample_batch},
            "kd_data": {"num_samples": config.pairs, "steps": config.teacher_steps, "guidance": config.guidance,
                        "sampler": "ddim", "batch_size": config.sample_batch, "shard_size": 256},
        },
        "causal_kd": {
            "model": model, "model_args": model_args, **kd_data,
            "method_config": {"student_optimizer": _adamw(config.kd_lr, KD_BETAS), "ema": {"halflife_steps": 50.0},
                              "context_noise": config.context_noise, "student_shift": config.student_shift},
            "trainer": trainer(config.kd_iterations, config.kd_batch),
        },
        "self_forcing": {
            "model": model, "model_args": model_args, "data": f"{__name__}:conditions",
            "data_args": {"batch_size": config.sf_batch},
            "method_config": {
                "guidance_scale": config.guidance if config.sf_guidance is None else config.sf_guidance,
                "student_update_freq": config.sf_update_freq,
                "student_optimizer": _adamw(config.sf_student_lr, SF_BETAS),
                "critic_optimizer": _adamw(config.sf_critic_lr, SF_BETAS),
                "ema": {"halflife_steps": 20.0}, "context_noise": config.context_noise,
                "student_shift": config.student_shift,
            },
            "trainer": trainer(config.sf_iterations, config.sf_batch),
        },
    }
    return build_dataclass(SelfForcingPipeline, data, "")


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class LongRollout:
    """A student's rollout of ``frames`` frames on ``clips`` held-out conditions: the FD of each 8-frame window
    (frames ``8 w .. 8 w + 7``) against the same window of real clips, that window's real-vs-real floor, and
    adherence / temporal consistency over the whole rollout (real clips: 1.0 / ~0.98)."""

    frames: int
    clips: int
    fd_windows: list[float]
    fd_floor_windows: list[float]
    prompt_adherence: float
    temporal_consistency: float


@dataclass
class CausalSamplerMetrics:
    """One sampler at the training length (8 frames) on ``eval_clips`` conditions, its diversity on
    ``diversity_clips`` conditions sampled twice, its timing on one clip (``first_chunk_s``: the teacher's whole
    clip), and the students' long rollouts (keyed by frames)."""

    fd: float
    prompt_adherence: float
    temporal_consistency: float
    diversity: float
    diversity_stderr: float
    seconds_per_clip: float
    first_chunk_s: float
    frames_per_s: float
    long: dict[int, LongRollout] = field(default_factory=dict)


@dataclass
class CausalDemoResult:
    """``metrics.json``: every sampler's figures, the 8-frame FD floor, the run's stage seconds, config, precision,
    and where the teacher's clips came from."""

    samplers: dict[str, CausalSamplerMetrics]
    fd_floor: float
    elapsed_s: float
    stage_seconds: dict[str, float]
    config: dict[str, Any]
    precision: dict[str, Any]
    teacher_samples: dict[str, Any]


class Students:
    """The evaluation model (the teacher on its causal host) and the two students' networks (their EMA weights, or
    the raw student where a stage kept no EMA), each sampled as it was trained: CausalKD re-noises along the ODE
    (the path it regressed), Self-Forcing with fresh noise (its rollouts)."""

    def __init__(self, config: CausalDemoConfig) -> None:
        from distill_mixins.methods.causal_kd import CausalKDConfig, CausalKDMixin

        self.model = build_model(CausalKDMixin, CausalKDConfig(student_shift=config.student_shift),
                                 str(config.weights)).eval()
        self.nets = {name: self._load(Path(config.out) / name) for name in SAMPLERS[1:]}
        self.renoise = {"causal_kd": "ode", "self_forcing": "fresh"}
        self.context_time = config.context_noise

    def _load(self, stage_dir: Path) -> nn.Module:
        from distill_mixins.checkpointer import load_student_weights

        path = stage_dir / EMA_FILE if (stage_dir / EMA_FILE).is_file() else stage_dir / STUDENT_FILE
        net = copy.deepcopy(self.model.net)  # the student network (the teacher refuses loads)
        load_student_weights(net, path)
        logger.info("evaluating {} ({})", path, "EMA" if path.name == EMA_FILE else "raw student")
        return net.eval().requires_grad_(False)

    def stream(self, name: str, condition: Any, noise: Tensor) -> Iterator[StreamedChunk]:
        """The student ``name``'s chunks of one batch, each as it finishes; the fresh re-noising draws are seeded by
        the initial ``noise`` (:func:`noise_seed`), so another noise of a condition gets other draws."""
        return generate_causal(self.model, condition, noise, net=self.nets[name], renoise=self.renoise[name],
                               context_time=self.context_time, stream=True,
                               generator=torch.Generator().manual_seed(noise_seed(noise)))

    def sampler(self, name: str) -> Sampler:
        """The student ``name`` as an evaluation-set sampler (whole clips)."""
        return lambda c, u, noise: torch.cat([chunk.x0 for chunk in self.stream(name, c, noise)], dim=2)


def noise_seed(noise: Tensor) -> int:
    """A seed (< 2**63) that is a function of the bytes of ``noise``: a stochastic sampler seeded by its initial
    noise is reproducible, and two noises of one condition (the diversity figure) get independent draws (one fixed
    seed gave both the same re-noising, which cut the Self-Forcing student's measured diversity ~10x)."""
    digest = hashlib.sha256(noise.detach().cpu().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def timed_stream(chunks: Iterator[StreamedChunk]) -> tuple[float, float, int]:
    """(seconds to the first chunk, total seconds, frames) of a streaming sampler."""
    start = time.perf_counter()
    first, frames = None, 0
    for chunk in chunks:
        first = first if first is not None else time.perf_counter() - start
        frames = chunk.end
    return first or 0.0, time.perf_counter() - start, frames


def _timing(run: Callable[[], tuple[float, float, int]], repeats: int) -> tuple[float, float]:
    """Median (seconds to the first chunk, frames per second) of ``repeats`` runs."""
    runs = [run() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[2] / r[1] for r in runs)


def _one_condition(model: Any, clips: ToyClips) -> tuple[Any, Any]:
    _, condition, uncondition = model.get_data_and_condition({"clip": clips.video[:1], "prompt": clips.prompts[:1]})
    return condition, uncondition


def timings(students: Students, config: CausalDemoConfig, held: ToyClips, noise: Tensor) -> dict[str, tuple]:
    """Per sampler (seconds to the first chunk, frames per second) of one 8-frame clip; the teacher's first
    chunk is its whole clip."""
    condition, uncondition = _one_condition(students.model, held)
    teacher = teacher_sampler(students.model, config.teacher_steps, config.guidance)

    def run_teacher() -> tuple[float, float, int]:
        tic = time.perf_counter()
        teacher(condition, uncondition, noise[:1])
        total = time.perf_counter() - tic
        return total, total, WINDOW

    out = {}
    with torch.no_grad(), autocast(config.precision):
        out["teacher_cfg"] = _timing(run_teacher, 1)
        for name in SAMPLERS[1:]:
            out[name] = _timing(lambda n=name: timed_stream(students.stream(n, condition, noise[:1])),
                                config.timing_repeats)
    return out


def long_rollouts(
    students: Students, config: CausalDemoConfig, net: Any
) -> tuple[dict[str, dict[int, LongRollout]], dict[str, Tensor]]:
    """Each student's rollouts ``r x 8`` frames long on the first ``long_clips`` held-out conditions (the given
    first frame and the prompt as at 8 frames), scored window by window against longer real clips; with the
    longest rollouts' clips (and the real ones, ``ground_truth``). One rollout of the longest length per student:
    a causal rollout's first ``r x 8`` frames are its ``r x 8``-frame rollout, so each shorter length is scored on
    that prefix."""
    from distill_mixins.eval.motion import prompt_adherence, temporal_consistency, track
    from distill_mixins.eval.video import frechet_video_distance

    held = held_out(config.long_clips)
    longest_frames = max(config.rollouts) * WINDOW
    real = render_specs(held.specs, longest_frames)
    reference = make_clips(config.long_clips, REFERENCE_SEED, frames=longest_frames).video
    noise = eval_noise(config.long_clips, (3, longest_frames, *real.shape[-2:]), NOISE_SEED)
    rollouts = {name: run_sampler(students.model, students.sampler(name), ToyClips(real, held.prompts, held.specs),
                                  noise, batch=config.sample_batch, precision=config.precision,
                                  desc=f"{name} ({longest_frames} frames)").clips
                for name in SAMPLERS[1:]}
    out: dict[str, dict[int, LongRollout]] = {name: {} for name in SAMPLERS[1:]}
    for factor in config.rollouts:
        frames = factor * WINDOW
        windows = [slice(w * WINDOW, (w + 1) * WINDOW) for w in range(factor)]
        floors = [frechet_video_distance(real[:, :, w], reference[:, :, w], net=net) for w in windows]
        for name, rollout in rollouts.items():
            clips = rollout[:, :, :frames]
            tracks = track(clips, held.prompts)
            out[name][frames] = LongRollout(
                frames=frames, clips=config.long_clips,
                fd_windows=[frechet_video_distance(clips[:, :, w], reference[:, :, w], net=net) for w in windows],
                fd_floor_windows=floors,
                prompt_adherence=prompt_adherence(clips, held.prompts, tracks=tracks),
                temporal_consistency=temporal_consistency(clips, held.prompts, tracks=tracks),
            )
            logger.info("{} at {} frames: {}", name, frames, out[name][frames])
    return out, {**rollouts, "ground_truth": real}


@dataclass
class CausalEvaluation:
    """Figures of every sampler, the 8-frame FD floor, clips to show, and the teacher's clip source."""

    figures: dict[str, CausalSamplerMetrics]
    fd_floor: float
    clips: dict[str, Tensor]
    long_clips: dict[str, Tensor]
    teacher_samples: dict[str, Any]


def _teacher_clips(
    students: Students, config: CausalDemoConfig, held: HeldOutSet
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The teacher's clips (N, ...) and its second-noise clips (K, ...): the shipped ones when they match its
    weights and settings (the first ``spot_check`` re-sampled and compared), else sampled here."""
    shipped = usable_samples(teacher_settings(config.weights, config.teacher_steps, config.guidance),
                             config.eval_clips, config.diversity_clips, path=teacher_samples_file(config.weights))
    sampler = teacher_sampler(students.model, config.teacher_steps, config.guidance)
    if shipped is not None:
        _, check = spot_checked(
            students.model, sampler, shipped, held, spot=config.spot_check, batch=config.sample_batch,
            precision=config.precision, remedy=f"regenerate them with `distill-mixins toy-teacher-samples "
            f"--teacher-weights {config.weights} --out {teacher_samples_file(config.weights)}`",
        )
        return (shipped.clips[: config.eval_clips], shipped.again[: config.diversity_clips],
                {"source": "shipped", "spot_check": asdict(check), "made_by": shipped.metadata.get("command", "")})
    first = run_sampler(students.model, sampler, held.clips, held.noise, batch=config.sample_batch,
                        precision=config.precision, desc="teacher_cfg")
    again = run_sampler(students.model, sampler, held.clips.head(config.diversity_clips), held.again_noise,
                        batch=config.sample_batch, precision=config.precision, desc="teacher_cfg (2nd)")
    return first.clips, again.clips, {"source": "sampled in this run"}


def evaluate(students: Students, config: CausalDemoConfig) -> CausalEvaluation:
    """Every sampler's figures (see :class:`CausalSamplerMetrics`)."""
    from distill_mixins.eval.motion import diversity_stats
    from distill_mixins.eval.video import evaluate_clips

    held = held_out_set(config.eval_clips, config.diversity_clips)
    timing = timings(students, config, held.clips, held.noise)
    k = config.diversity_clips
    figures, clips, source = {}, {}, {}
    for name in SAMPLERS:
        if name == "teacher_cfg":
            first, again, source = _teacher_clips(students, config, held)
        else:
            sampler = students.sampler(name)
            first = run_sampler(students.model, sampler, held.clips, held.noise, batch=config.sample_batch,
                                precision=config.precision, desc=name).clips
            again = run_sampler(students.model, sampler, held.clips.head(k), held.again_noise,
                                batch=config.sample_batch, precision=config.precision, desc=f"{name} (2nd)").clips
        metrics = evaluate_clips(first, held.reference, held.clips.prompts, net=held.feature_net)
        spread = diversity_stats(first[:k], again, held.clips.prompts[:k])
        first_chunk, fps = timing[name]
        figures[name] = CausalSamplerMetrics(
            fd=metrics.fd, prompt_adherence=metrics.prompt_adherence,
            temporal_consistency=metrics.temporal_consistency, diversity=spread.mean,
            diversity_stderr=spread.stderr, seconds_per_clip=WINDOW / fps, first_chunk_s=first_chunk,
            frames_per_s=fps,
        )
        clips[name] = first
        logger.info("{}: {}", name, figures[name])
    rollouts, longest = long_rollouts(students, config, held.feature_net)
    for name, figures_long in rollouts.items():
        figures[name].long = figures_long
    clips["ground_truth"] = held.clips.video
    return CausalEvaluation(figures, held.fd_floor, clips, longest, source)


def run_demo_causal(config: CausalDemoConfig) -> CausalDemoResult:
    """Every stage, then the evaluation; writes ``metrics.json``, ``report.md``, ``long_rollouts.png`` and
    ``samples.gif`` in ``config.out`` (its ``demo_config.json`` and ``pipeline_config.json`` too)."""
    from distill_mixins.toy.report_causal import write_causal_report

    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(config), indent=2))
    pipeline = demo_pipeline(config)
    seconds: dict[str, float] = {}
    for stage in ("ode-pairs", "causal-kd", "self-forcing"):
        tic = time.perf_counter()
        with autocast(config.precision) if stage == "ode-pairs" else nullcontext():
            done = run_pipeline(pipeline, stage)
        if stage not in done:
            raise RuntimeError(f"the causal demo's stage {stage} did not finish; run the same command again to "
                               "resume it")
        seconds[f"{stage}_s"] = time.perf_counter() - tic
    tic = time.perf_counter()
    students = Students(config)
    evaluation = evaluate(students, config)
    seconds["eval_s"] = time.perf_counter() - tic
    result = CausalDemoResult(
        samplers=evaluation.figures, fd_floor=evaluation.fd_floor, elapsed_s=time.perf_counter() - start,
        stage_seconds=seconds, config=asdict(config), precision=asdict(PrecisionReport.of(config.precision)),
        teacher_samples=evaluation.teacher_samples,
    )
    write_text_atomic(out / "metrics.json", json.dumps(asdict(result), indent=2))
    write_causal_report(out, result, evaluation.clips, evaluation.long_clips, held_out(config.long_clips).prompts)
    return result


def config_from_args(values: dict[str, Any], quick: bool) -> CausalDemoConfig:
    """The config of the given CLI values (None: the default)."""
    given = {f.name: values[f.name] for f in fields(CausalDemoConfig) if values.get(f.name) is not None}
    return CausalDemoConfig.quick(**given) if quick else CausalDemoConfig(**given)


__all__ = ["CausalDemoConfig", "CausalDemoResult", "CausalSamplerMetrics", "LongRollout", "Students",
           "build_model", "conditions", "demo_pipeline", "evaluate", "run_demo_causal", "teacher_batches",
           "timed_stream"]
