"""The toy causal pipeline's first stages: the bidirectional transformer teacher -> ODE pairs -> CausalKD, then an
evaluation of the causal student sampled chunk by chunk (streaming, K steps per chunk) against the teacher.

Stages (each resumable: a re-run in the same directory skips what is done):

1. **ODE pairs**: :func:`~distill_mixins.data.generate_ode_pairs` runs the teacher (``teacher_steps`` DDIM steps,
   CFG ``w``) on procedural training conditions and stores its states at the student's K times.
2. **CausalKD**: :class:`~distill_mixins.methods.causal_kd.CausalKDMixin` on those pairs through the trainer, the
   causal student initialised from the teacher's weights (:class:`~distill_mixins.toy.causal_dit.ToyCausalDiT`
   runs bidirectional and block-causal with the same weights).
3. **Evaluation** on held-out conditions (:mod:`distill_mixins.eval.video`): FD, prompt adherence, temporal
   consistency of the teacher at ``teacher_steps`` steps with CFG, the teacher at 1 step, and the causal student
   streaming (:func:`~distill_mixins.causal.generate_causal`); ``metrics.json`` in the run directory.

``distill-mixins toy-causal-kd --teacher-weights runs/toy-dit-teacher/toy_dit_teacher.safetensors`` runs it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from distill_mixins.causal import generate_causal
from distill_mixins.checkpointer.files import write_text_atomic
from distill_mixins.config import EMAConfig, OptimizerConfig
from distill_mixins.data import KDDataConfig, generate_ode_pairs
from distill_mixins.methods.causal_kd import CausalKDConfig, CausalKDMixin
from distill_mixins.precision import autocast, check_precision, frozen_weights_for
from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.demo import TRAIN_SEED, TRAINER_AUTOCAST, check_finished, clip_batches
from distill_mixins.toy.evalset import (
    NOISE_SEED,
    REFERENCE_SEED,
    Sampler,
    eval_noise,
    held_out,
    run_sampler,
    teacher_sampler,
    teacher_samples_file,
    teacher_settings,
    usable_samples,
)
from distill_mixins.toy.symmetry import symmetric_ode_pairs
from distill_mixins.toy.train import dit_teacher_file, load_toy_teacher
from distill_mixins.trainer import DistillationTrainer, TrainerConfig
from distill_mixins.trainer.pipeline import ode_pair_data


class ToyCausalKD(CausalKDMixin, ToyCausalVideo2World):
    """CausalKD on the toy causal transformer host."""


@dataclass
class CausalKDRunConfig:
    """Sizes and settings of the toy CausalKD run (defaults: the acceptance run; :meth:`quick` for CI)."""

    out: str = "runs/toy-causal-kd"
    teacher_weights: str | None = None
    """The bidirectional transformer teacher (``toy-teacher --arch dit``); None: the shipped one."""
    pairs: int = 512
    teacher_steps: int = 36
    guidance: float = 3.0
    iterations: int = 1000
    """CausalKD iterations (1,000: 522 s of training in float32 on a 2-core AVX512 CPU, inside the 10-minute goal)."""
    batch_size: int = 16
    lr: float = 1e-4
    context_noise: float = 0.0
    student_shift: float = 5.0
    """Rectified-flow shift of the student's ``cosmos_4step`` times (the ODE pairs' path times too)."""
    symmetries: bool = False
    """Move each pair by a random rotation or reflection of the square world (:mod:`distill_mixins.toy.symmetry`):
    every pair then stands for eight (docs/causal.md)."""
    eval_clips: int = 1024
    sample_batch: int = 64
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pairs", "teacher_steps", "batch_size", "eval_clips", "sample_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"CausalKDRunConfig.{name}={getattr(self, name)} must be >= 1.")
        if self.iterations < 0:
            raise ValueError(f"CausalKDRunConfig.iterations={self.iterations} must be >= 0.")
        for name in ("lr", "student_shift"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CausalKDRunConfig.{name}={getattr(self, name)} must be > 0.")
        check_precision(self.precision, "CausalKDRunConfig.precision")
        dit_teacher_file(self.teacher_weights, "CausalKDRunConfig.teacher_weights")

    @property
    def weights(self) -> Path:
        """The teacher's weights file."""
        return dit_teacher_file(self.teacher_weights, f"{type(self).__name__}.teacher_weights")

    @classmethod
    def quick(cls, **overrides: Any) -> CausalKDRunConfig:
        """A CI-sized run: few pairs, iterations and evaluation clips, 8 teacher steps."""
        values: dict[str, Any] = {"out": "runs/toy-causal-kd-quick", "pairs": 16, "teacher_steps": 8,
                                  "iterations": 4, "batch_size": 4, "eval_clips": 16, "sample_batch": 16}
        return cls(**{**values, **overrides})


@dataclass
class CausalKDResult:
    """``metrics.json``: per sampler FD / prompt adherence / temporal consistency / seconds a clip, the real-vs-real
    FD floor, and the run's stage seconds and config."""

    samplers: dict[str, dict[str, float]]
    fd_floor: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def causal_kd_model(config: CausalKDRunConfig) -> ToyCausalKD:
    """The CausalKD model: the teacher's transformer (its weights also the student's start) and text encoder."""
    teacher = load_toy_teacher(config.weights)
    if not isinstance(teacher.net, ToyCausalDiT):
        raise ValueError(f"{config.weights} holds a {type(teacher.net).__name__} teacher: the causal pipeline needs "
                         "the transformer teacher (`toy-teacher --arch dit`).")
    optimizer = OptimizerConfig(name="adamw", lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0)
    distill = CausalKDConfig(student_optimizer=optimizer, ema=EMAConfig(halflife_steps=50.0), seed=config.seed,
                             context_noise=config.context_noise, student_shift=config.student_shift)
    return ToyCausalKD(teacher.net, teacher.text_encoder, distill=distill)


def make_pairs(config: CausalKDRunConfig, model: ToyCausalKD) -> Path:
    """Stage 1: the teacher's ODE pairs at the student's times on ``pairs`` training conditions (resumable)."""
    data_dir = Path(config.out) / "ode_pairs"
    data_config = KDDataConfig(num_samples=config.pairs, steps=config.teacher_steps, sampler="ddim",
                               guidance=config.guidance, seed=config.seed, shard_size=256,
                               batch_size=config.sample_batch)
    with autocast(config.precision), frozen_weights_for(config.precision, model.net_teacher):
        generate_ode_pairs(model, clip_batches(config.pairs, TRAIN_SEED, config.sample_batch), data_dir, data_config)
    return data_dir


def train(config: CausalKDRunConfig, model: ToyCausalKD, data_dir: Path) -> None:
    """Stage 2: CausalKD on the pairs (each moved by a random symmetry with ``symmetries``; resumable)."""
    trainer_config = TrainerConfig(
        iterations=config.iterations, run_dir=str(Path(config.out) / "causal_kd"), batch_size=config.batch_size,
        autocast=TRAINER_AUTOCAST[config.precision], seed=config.seed, log_every=50, save_every=100, keep_last=1,
    )
    pairs = symmetric_ode_pairs if config.symmetries else ode_pair_data
    data = pairs(model, seed=config.seed, root=str(data_dir), batch_size=config.batch_size)
    check_finished("causal_kd", DistillationTrainer(model, data, trainer_config).fit())


def samplers(model: ToyCausalKD, config: CausalKDRunConfig) -> dict[str, Sampler]:
    """The teacher at ``teacher_steps`` and 1 step (CFG), and the causal student streaming its K steps a chunk."""
    return {
        "teacher_cfg": teacher_sampler(model, config.teacher_steps, config.guidance),
        "teacher_1step": teacher_sampler(model, 1, config.guidance),
        "student_streaming": lambda c, u, noise: generate_causal(model, c, noise),
    }


def evaluate(model: ToyCausalKD, config: CausalKDRunConfig) -> CausalKDResult:
    """Figures of every sampler on ``eval_clips`` held-out conditions (8 frames; the teacher's clips from the
    shipped samples when they match its weights and settings)."""
    from distill_mixins.eval.video import VideoFeatureNet, evaluate_clips, frechet_video_distance

    held = held_out(config.eval_clips)
    reference = make_clips(config.eval_clips, REFERENCE_SEED)
    net = VideoFeatureNet()
    floor = frechet_video_distance(held.video, reference.video, net=net)
    noise = eval_noise(config.eval_clips, tuple(held.video.shape[1:]), NOISE_SEED)
    shipped = usable_samples(teacher_settings(config.weights, config.teacher_steps, config.guidance),
                             config.eval_clips, 0, path=teacher_samples_file(config.weights))
    figures = {}
    for name, sampler in samplers(model, config).items():
        if name == "teacher_cfg" and shipped is not None:
            clips, seconds = shipped.clips[: config.eval_clips], float("nan")
        else:
            run = run_sampler(model, sampler, held, noise, batch=config.sample_batch, precision=config.precision,
                              desc=name)
            clips, seconds = run.clips, run.latency_s_per_clip
        metrics = evaluate_clips(clips, reference.video, held.prompts, net=net)
        figures[name] = {"fd": metrics.fd, "prompt_adherence": metrics.prompt_adherence,
                         "temporal_consistency": metrics.temporal_consistency, "seconds_per_clip": seconds}
        logger.info("{}: {}", name, figures[name])
    return CausalKDResult(figures, floor)


def run_causal_kd(config: CausalKDRunConfig) -> CausalKDResult:
    """Every stage; writes ``metrics.json`` (and ``config.json``) in ``config.out``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", json.dumps(asdict(config), indent=2))
    seconds: dict[str, float] = {}
    torch.manual_seed(config.seed)
    model = causal_kd_model(config)
    tic = time.perf_counter()
    data_dir = make_pairs(config, model)
    seconds["ode_pairs"] = time.perf_counter() - tic
    tic = time.perf_counter()
    train(config, model, data_dir)
    seconds["causal_kd"] = time.perf_counter() - tic
    tic = time.perf_counter()
    result = evaluate(model.eval(), config)
    seconds["evaluation"] = time.perf_counter() - tic
    result.stage_seconds, result.config = seconds, asdict(config)
    write_text_atomic(out / "metrics.json", json.dumps(asdict(result), indent=2))
    return result


__all__ = ["CausalKDResult", "CausalKDRunConfig", "ToyCausalKD", "causal_kd_model", "evaluate", "make_pairs",
           "run_causal_kd", "samplers", "train"]
