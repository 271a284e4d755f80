"""The main job: distill the shipped toy Video2World teacher (36 DDIM steps x 2 for CFG) into a 1-step student.

Stages (each resumable: a re-run in the same directory skips what is done):

1. **KD data**: :func:`~distill_mixins.data.generate_kd_data` runs the teacher (36 steps, CFG ``w``) on the
   conditions (first frame + prompt) of procedurally generated training clips -> sharded safetensors.
2. **KD**: :class:`~distill_mixins.methods.kd.KDMixin` through the :class:`DistillationTrainer` on those shards
   (with ``kd_symmetries``, each pair moved by a random symmetry of the square world:
   :mod:`distill_mixins.toy.symmetry`).
3. **Refined KD** (when ``refine_iterations > 0``): :class:`~distill_mixins.methods.refined_kd.RefinedKDMixin` from
   the KD student, on fresh procedural conditions: the student learns to commit to one future.
4. **DMD2**: :class:`~distill_mixins.methods.dmd2.DMD2Mixin` from the previous stage's student, raw weights (critic = a
   copy of the teacher), on fresh procedural conditions, with the refine term when ``dmd2_refine_weight > 0``.
5. **Evaluation** on held-out clips (:mod:`distill_mixins.eval.video`): Frechet distance against a second
   held-out real set (and the floor between two real sets), prompt adherence, temporal consistency,
   diversity, latency and NFE per clip, for the teacher at 36 steps with CFG, the teacher at 1 step and the
   student at 1 step; then ``report.md``, ``metrics.json``, ``samples.png`` and GIFs in the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn
from tqdm import tqdm

from distill_mixins.checkpointer.files import write_text_atomic
from distill_mixins.config import EMAConfig, OptimizerConfig, TimeSamplerConfig
from distill_mixins.data import KDDataConfig, KDShardDataset, generate_kd_data
from distill_mixins.methods import DMD2Config, DMD2Mixin, KDConfig, KDMixin, RefinedKDConfig, RefinedKDMixin
from distill_mixins.precision import matmul_weights_in
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.host import ToyVideo2World
from distill_mixins.toy.symmetry import SymmetricPairs
from distill_mixins.toy.train import load_toy_teacher
from distill_mixins.trainer import DataSource, DistillationTrainer, FunctionData, MapStyleData, TrainerConfig
from distill_mixins.trigflow import native_to_trigflow_time

TRAIN_SEED, EVAL_SEED, REFERENCE_SEED, DMD2_SEED, REFINE_SEED = 1, 1_000_001, 2_000_002, 3_000_003, 4_000_004
"""Seeds of the clip sets: KD conditions, held-out evaluation conditions, held-out reference clips, DMD2, refined
KD."""


class ToyKD(KDMixin, ToyVideo2World):
    """KD on the toy host, composed as a user composes theirs."""


class ToyDMD2(DMD2Mixin, ToyVideo2World):
    """DMD2 on the toy host."""


class ToyRefinedKD(RefinedKDMixin, ToyVideo2World):
    """Refined KD on the toy host."""


@dataclass
class DemoConfig:
    """Sizes and settings of the demo (defaults: the full run, under 10 minutes on 2 CPU cores)."""

    out: str = "runs/demo"
    pairs: int = 512
    """KD teacher pairs (36-step CFG samples)."""
    eval_clips: int = 1024
    """Held-out conditions evaluated per sampler (and as many reference clips)."""
    diversity_clips: int = 32
    """Conditions sampled twice for the diversity figure."""
    teacher_steps: int = 36
    guidance: float = 3.0
    """CFG scale w of the teacher (standard form x0_u + w (x0_c - x0_u))."""
    kd_iterations: int = 250
    dmd2_iterations: int = 100
    dmd2_refine_weight: float = 20.0
    """Weight of DMD2's refine term (:class:`~distill_mixins.methods.DMD2Config` ``refine_weight``, re-noised to
    ``refine_tau``, ``refine_teacher_steps`` teacher steps); 0 runs plain DMD2."""
    refine_iterations: int = 160
    """Refined-KD iterations between KD and DMD2 (:mod:`distill_mixins.methods.refined_kd`); 0 skips the stage."""
    refine_tau: float = 0.35
    """Rectified-flow time the student's sample is re-noised to (0.35: 65% signal)."""
    refine_teacher_steps: int = 4
    """Teacher DDIM steps from the re-noised student sample to 0."""
    refine_lr: float = 1e-4
    kd_symmetries: bool = False
    """Move every KD pair by a random rotation or reflection of the square frame (8x the pairs): KD then keeps
    improving past the default iterations instead of memorising its pairs (docs/toy.md)."""
    batch_size: int = 32
    sample_batch: int = 64
    kd_lr: float = 2e-4
    dmd2_student_lr: float = 1e-5
    dmd2_critic_lr: float = 1e-4
    dmd2_student_update_freq: int = 2
    bf16: bool = True
    seed: int = 0
    teacher_weights: str | None = None
    """Path of toy teacher weights; None: the shipped ones."""

    def __post_init__(self) -> None:
        for name in (
            "pairs", "eval_clips", "diversity_clips", "teacher_steps", "batch_size", "sample_batch",
            "refine_teacher_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} must be >= 1.")
        for name in ("kd_iterations", "dmd2_iterations", "refine_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} must be >= 0.")
        if not self.dmd2_refine_weight >= 0:
            raise ValueError(f"DemoConfig.dmd2_refine_weight={self.dmd2_refine_weight} must be >= 0 (0: plain DMD2).")
        if not 0.0 < self.refine_tau < 1.0:
            raise ValueError(f"DemoConfig.refine_tau={self.refine_tau} must be a rectified-flow time in (0, 1).")
        if self.diversity_clips > self.eval_clips:
            raise ValueError(f"DemoConfig.diversity_clips={self.diversity_clips} exceeds eval_clips={self.eval_clips}.")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A CI-sized run (about a minute): few pairs, iterations and evaluation clips."""
        values: dict[str, Any] = {
            "out": "runs/demo-quick", "pairs": 128, "eval_clips": 128, "diversity_clips": 32, "kd_iterations": 40,
            "dmd2_iterations": 10, "refine_iterations": 10,
        }
        return cls(**{**values, **overrides})


def autocast(config: DemoConfig) -> AbstractContextManager[Any]:
    """bf16 autocast on the CPU when enabled (about 2x faster sampling here)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if config.bf16 else nullcontext()


def frozen_bf16(config: DemoConfig, *nets: nn.Module) -> AbstractContextManager[Any]:
    """Frozen networks hold bf16 conv/linear weights while sampling under bf16 autocast (bit-identical results,
    no per-call weight casts: :func:`~distill_mixins.precision.matmul_weights_in`)."""
    stack = ExitStack()
    if config.bf16:
        for net in nets:
            stack.enter_context(matmul_weights_in(net))
    return stack


def clip_batches(n: int, seed: int, batch: int) -> Iterator[dict[str, Any]]:
    """Host batches ``{"clip", "prompt"}`` of ``n`` procedural clips drawn from ``seed``."""
    clips = make_clips(n, seed)
    for start in range(0, n, batch):
        yield {"clip": clips.video[start : start + batch], "prompt": clips.prompts[start : start + batch]}


def _optimizer(lr: float) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=lr, betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0)


def _trainer_config(config: DemoConfig, stage: str, iterations: int) -> TrainerConfig:
    return TrainerConfig(
        iterations=iterations, run_dir=str(Path(config.out) / stage), batch_size=config.batch_size,
        autocast="bf16" if config.bf16 else "none", seed=config.seed, log_every=50, save_every=200, keep_last=1,
    )


@dataclass
class KDStage:
    """The KD model and the seconds of stages 1 (teacher pairs) and 2 (KD)."""

    model: ToyKD
    data_s: float
    kd_s: float


def run_kd(config: DemoConfig, teacher: ToyVideo2World) -> KDStage:
    """Stages 1 and 2: the teacher's KD pairs, then KD."""
    model = ToyKD(teacher.net, teacher.text_encoder, distill=KDConfig(
        student_optimizer=_optimizer(config.kd_lr), ema=EMAConfig(halflife_steps=50.0),
    ))
    data_dir = Path(config.out) / "kd_data"
    tic = time.perf_counter()
    data_config = KDDataConfig(
        num_samples=config.pairs, steps=config.teacher_steps, sampler="ddim", guidance=config.guidance,
        seed=config.seed, shard_size=256, batch_size=config.sample_batch,
    )
    with autocast(config), frozen_bf16(config, model.net_teacher):
        generate_kd_data(model, clip_batches(config.pairs, TRAIN_SEED, config.sample_batch), data_dir, data_config)
    data_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    pairs: DataSource = MapStyleData(KDShardDataset(data_dir), config.batch_size, seed=config.seed)
    if config.kd_symmetries:
        pairs = SymmetricPairs(pairs, seed=config.seed)
    DistillationTrainer(model, pairs, _trainer_config(config, "kd", config.kd_iterations)).fit()
    return KDStage(model, data_seconds, time.perf_counter() - tic)


def dmd2_config(config: DemoConfig) -> DMD2Config:
    """One-step DMD2 with the demo's CFG scale, a shifted critic time (Cosmos shift 5), no GAN, and the refine term."""
    return DMD2Config(
        student_update_freq=config.dmd2_student_update_freq, guidance_scale=config.guidance,
        student_optimizer=_optimizer(config.dmd2_student_lr), critic_optimizer=_optimizer(config.dmd2_critic_lr),
        critic_time=TimeSamplerConfig(kind="shifted_uniform", shift=5.0), ema=EMAConfig(halflife_steps=20.0),
        refine_weight=config.dmd2_refine_weight, refine_time=refine_time(config),
        refine_teacher_steps=config.refine_teacher_steps,
    )


def conditions(seed: int, batch: int) -> FunctionData:
    """Trainer data of fresh procedural conditions: step ``i`` is the batch of clips drawn from ``seed + i``."""

    def make(step: int) -> dict[str, Any]:
        clips = make_clips(batch, seed + step)
        return {"clip": clips.video, "prompt": clips.prompts}

    return FunctionData(make)


def train_on_conditions(
    config: DemoConfig, model: ToyDMD2 | ToyRefinedKD, student: nn.Module, seed: int, stage: str, iterations: int
) -> float:
    """Load ``student`` into ``model`` (its raw weights: measured better than its EMA here) and train it on fresh
    procedural conditions drawn from ``seed`` under ``runs/<out>/<stage>``; returns the seconds it took."""
    model.load_student_state_dict(student.state_dict())
    tic = time.perf_counter()
    with frozen_bf16(config, model.net_teacher):  # the teacher only runs without gradients in these stages (no GAN)
        DistillationTrainer(
            model, conditions(seed, config.batch_size), _trainer_config(config, stage, iterations)
        ).fit()
    return time.perf_counter() - tic


def run_dmd2(config: DemoConfig, teacher: ToyVideo2World, student: nn.Module) -> tuple[ToyDMD2, float]:
    """Stage 4: DMD2 from the previous stage's student."""
    model = ToyDMD2(teacher.net, teacher.text_encoder, distill=dmd2_config(config))
    return model, train_on_conditions(config, model, student, DMD2_SEED, "dmd2", config.dmd2_iterations)


def refine_time(config: DemoConfig) -> float:
    """TrigFlow time of the demo's ``refine_tau`` (rectified flow, the toy's sigma_d)."""
    tau = torch.tensor(config.refine_tau, dtype=torch.float64)
    return float(native_to_trigflow_time(tau, "rectified_flow", ToyVideo2World.sigma_data))


def refined_kd_config(config: DemoConfig) -> RefinedKDConfig:
    """Refined KD with the demo's CFG scale: re-noise to ``refine_tau``, ``refine_teacher_steps`` DDIM steps."""
    return RefinedKDConfig(
        student_optimizer=_optimizer(config.refine_lr), teacher_steps=config.refine_teacher_steps,
        refine_time=refine_time(config),
        guidance_scale=config.guidance, ema=EMAConfig(halflife_steps=20.0),
    )


def run_refine(config: DemoConfig, teacher: ToyVideo2World, student: nn.Module) -> tuple[ToyRefinedKD, float]:
    """Stage 3: refined KD from the KD student (:mod:`distill_mixins.methods.refined_kd`)."""
    model = ToyRefinedKD(teacher.net, teacher.text_encoder, distill=refined_kd_config(config))
    return model, train_on_conditions(config, model, student, REFINE_SEED, "refined_kd", config.refine_iterations)


# ------------------------------------------------------------------------------------------ evaluation

Student = ToyKD | ToyDMD2 | ToyRefinedKD
"""The model of the last stage run (its ``net`` is the student)."""
Sampler = Callable[[Any, Any, Tensor], Tensor]
"""``(condition, uncondition, noise) -> latent x0`` (B, C, T, H, W)."""


@dataclass
class SamplerRun:
    """Decoded clips (N, 3, T, H, W) of one sampler, its network evaluations and latency per clip."""

    clips: Tensor
    nfe: int
    latency_s_per_clip: float


@torch.no_grad()
def run_sampler(
    model: Student, sampler: Sampler, nfe: int, clips: Tensor, prompts: list[str], config: DemoConfig,
    *, noise_seed: int, desc: str,
) -> SamplerRun:
    """Sample every condition (first frame + prompt) of ``clips`` in batches of ``config.sample_batch``; the time
    counts the sampler only (conditions are prepared before the clock starts)."""
    outs, seconds = [], 0.0
    generator = torch.Generator().manual_seed(noise_seed)
    for start in tqdm(range(0, len(prompts), config.sample_batch), desc=desc, unit="batch", leave=False):
        stop = start + config.sample_batch
        batch = {"clip": clips[start:stop], "prompt": prompts[start:stop]}
        x0, condition, uncondition = model.get_data_and_condition(batch)
        noise = torch.randn(x0.shape, generator=generator)
        tic = time.perf_counter()
        with autocast(config):
            latent = sampler(condition, uncondition, noise)
        seconds += time.perf_counter() - tic
        outs.append(model.decode(latent.float()))
    return SamplerRun(torch.cat(outs), nfe, seconds / len(prompts))


def samplers(model: Student, config: DemoConfig) -> dict[str, tuple[Sampler, int]]:
    """The evaluated samplers and their network evaluations per clip."""
    w, steps = config.guidance, config.teacher_steps

    def teacher(n: int) -> Sampler:
        return lambda c, u, noise: model.generate_teacher(c, noise, uncondition=u, guidance=w, steps=n, sampler="ddim")

    return {
        "teacher_36step_cfg": (teacher(steps), 2 * steps),
        "teacher_1step": (teacher(1), 2),
        "student_1step": (lambda c, u, noise: model.generate(c, noise), 1),
    }


@dataclass
class SamplerMetrics:
    """Figures of one sampler on the held-out conditions."""

    fd: float
    prompt_adherence: float
    temporal_consistency: float
    diversity: float
    nfe: int
    latency_s_per_clip: float


@dataclass
class DemoResult:
    """Everything ``metrics.json`` holds."""

    samplers: dict[str, SamplerMetrics]
    fd_floor: float
    gap_closed: float
    speedup_wall: float
    elapsed_s: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``: one entry per sampler, then the top-level figures."""
        out: dict[str, Any] = {name: asdict(m) for name, m in self.samplers.items()}
        out |= {"fd_floor": self.fd_floor, "gap_closed": self.gap_closed, "speedup_wall": self.speedup_wall,
                "elapsed_s": self.elapsed_s, "stage_seconds": self.stage_seconds, "config": self.config}
        return out


def gap_closed(fd_teacher_1step: float, fd_student: float, fd_teacher: float) -> float:
    """``(fd_teacher_1step - fd_student) / (fd_teacher_1step - fd_teacher)``: 1 means the student matches the
    multi-step teacher, 0 that it is no better than the teacher at one step."""
    return (fd_teacher_1step - fd_student) / (fd_teacher_1step - fd_teacher)


@dataclass
class Evaluation:
    """Figures of every sampler, the real-vs-real FD floor, the decoded clips (N, 3, T, H, W) of every sampler (and
    ``ground_truth``), and the held-out prompts."""

    figures: dict[str, SamplerMetrics]
    fd_floor: float
    clips: dict[str, Tensor]
    prompts: list[str]


def evaluate(model: Student, config: DemoConfig) -> Evaluation:
    """Metrics of every sampler on held-out conditions (see :class:`Evaluation`)."""
    from distill_mixins.eval.motion import diversity
    from distill_mixins.eval.video import VideoFeatureNet, evaluate_clips, frechet_video_distance

    held_out = make_clips(config.eval_clips, EVAL_SEED)
    reference = make_clips(config.eval_clips, REFERENCE_SEED)
    feature_net = VideoFeatureNet()
    floor = frechet_video_distance(held_out.video, reference.video, net=feature_net)
    k = config.diversity_clips
    results, clips = {}, {}
    for name, (sampler, nfe) in samplers(model, config).items():
        run = run_sampler(model, sampler, nfe, held_out.video, held_out.prompts, config, noise_seed=7, desc=name)
        again = run_sampler(
            model, sampler, nfe, held_out.video[:k], held_out.prompts[:k], config, noise_seed=8, desc=f"{name} (2nd)"
        )
        figures = evaluate_clips(run.clips, reference.video, held_out.prompts, net=feature_net)
        results[name] = SamplerMetrics(
            fd=figures.fd, prompt_adherence=figures.prompt_adherence,
            temporal_consistency=figures.temporal_consistency, diversity=diversity(run.clips[:k], again.clips),
            nfe=run.nfe, latency_s_per_clip=run.latency_s_per_clip,
        )
        clips[name] = run.clips
        logger.info("{}: {}", name, results[name])
    clips["ground_truth"] = held_out.video
    return Evaluation(results, floor, clips, held_out.prompts)


def run_demo(config: DemoConfig) -> DemoResult:
    """All four stages; writes the run directory's report, metrics, picture and GIFs (see the module docstring)."""
    from distill_mixins.toy.report import write_report

    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(config), indent=2))
    torch.manual_seed(config.seed)
    teacher = load_toy_teacher(config.teacher_weights)
    kd = run_kd(config, teacher)
    final: Student = kd.model
    stage = {"kd_data_s": kd.data_s, "kd_s": kd.kd_s}
    if config.refine_iterations > 0:
        final, stage["refine_s"] = run_refine(config, teacher, final.net)
    if config.dmd2_iterations > 0:
        final, stage["dmd2_s"] = run_dmd2(config, teacher, final.net)
    final.eval()
    tic = time.perf_counter()
    with frozen_bf16(config, final.net_teacher, final.net):
        evaluation = evaluate(final, config)
    stage["eval_s"] = time.perf_counter() - tic
    t36, t1, s1 = (evaluation.figures[k] for k in ("teacher_36step_cfg", "teacher_1step", "student_1step"))
    result = DemoResult(
        samplers=evaluation.figures, fd_floor=evaluation.fd_floor, gap_closed=gap_closed(t1.fd, s1.fd, t36.fd),
        speedup_wall=t36.latency_s_per_clip / s1.latency_s_per_clip, elapsed_s=time.perf_counter() - start,
        stage_seconds=stage, config=asdict(config),
    )
    write_text_atomic(out / "metrics.json", json.dumps(result.to_json(), indent=2))
    write_report(out, result, evaluation.clips, evaluation.prompts)
    return result

