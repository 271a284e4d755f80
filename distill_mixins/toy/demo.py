"""The main job: distill the shipped toy Video2World teacher (36 DDIM steps x 2 for CFG) into a 1-step student.

Stages (each resumable: a re-run in the same directory skips what is done):

1. **KD data**: :func:`~distill_mixins.data.generate_kd_data` runs the teacher (36 steps, CFG ``w``) on the
   conditions (first frame + prompt) of procedurally generated training clips -> sharded safetensors.
2. **KD**: :class:`~distill_mixins.methods.kd.KDMixin` through the :class:`DistillationTrainer` on those shards
   (with ``kd_symmetries``, each pair moved by a random symmetry of the square world:
   :mod:`distill_mixins.toy.symmetry`).
3. **Refined KD** (only when ``refine_iterations > 0``; off by default):
   :class:`~distill_mixins.methods.refined_kd.RefinedKDMixin` from the KD student, on fresh procedural conditions: the
   student learns to commit to one future, and to pick it from the condition (it loses its diversity).
4. **DMD2**: :class:`~distill_mixins.methods.dmd2.DMD2Mixin` from the previous stage's student, raw weights (critic = a
   copy of the teacher), on fresh procedural conditions, with the refine term when ``dmd2_refine_weight > 0`` and
   the energy-score term on the conditions' real clips when ``dmd2_energy_weight > 0`` (both by default).
5. **Evaluation** on held-out clips (:mod:`distill_mixins.eval.video`): Frechet distance against a second
   held-out real set (and the floor between two real sets), prompt adherence, temporal consistency,
   diversity, latency and NFE per clip, for the teacher at 36 steps with CFG, the teacher at 1 step and the
   student at 1 step; then ``report.md``, ``metrics.json``, ``samples.png`` and GIFs in the run directory.
"""

from __future__ import annotations

import json
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor, nn

from distill_mixins.checkpointer.files import write_text_atomic
from distill_mixins.config import EMAConfig, OptimizerConfig, TimeSamplerConfig
from distill_mixins.data import KDDataConfig, KDShardDataset, generate_kd_data
from distill_mixins.discriminator import DiscriminatorConfig
from distill_mixins.methods import DMD2Config, DMD2Mixin, KDConfig, KDMixin, RefinedKDConfig, RefinedKDMixin
from distill_mixins.methods.energy import check_beta
from distill_mixins.precision import PrecisionReport, autocast, check_precision, frozen_weights_for
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.curve import CurvePoint, steps_curve
from distill_mixins.toy.evalset import (
    HeldOutSet,
    Sampler,
    SpotCheck,
    TeacherSamples,
    held_out_set,
    run_sampler,
    spot_checked,
    teacher_sampler,
    teacher_settings,
    usable_samples,
)
from distill_mixins.toy.host import ToyVideo2World
from distill_mixins.toy.symmetry import SymmetricPairs
from distill_mixins.toy.train import WEIGHTS, load_toy_teacher
from distill_mixins.trainer import (
    DataSource,
    DistillationTrainer,
    FunctionData,
    MapStyleData,
    TrainerConfig,
    TrainResult,
)
from distill_mixins.trainer.signals import Signalled, raise_on_signal
from distill_mixins.trigflow import native_to_trigflow_time

TRAIN_SEED, DMD2_SEED, REFINE_SEED = 1, 3_000_003, 4_000_004
"""Seeds of the training clip sets: KD conditions, DMD2, refined KD (the held-out sets' seeds are in
:mod:`distill_mixins.toy.evalset`)."""


class ToyKD(KDMixin, ToyVideo2World):
    """KD on the toy host, composed as a user composes theirs."""


class ToyDMD2(DMD2Mixin, ToyVideo2World):
    """DMD2 on the toy host."""


class ToyRefinedKD(RefinedKDMixin, ToyVideo2World):
    """Refined KD on the toy host."""


@dataclass
class DemoConfig:
    """Sizes and settings of the demo (defaults: the full run, under 10 minutes on 2 CPU cores in float32)."""

    out: str = "runs/demo"
    recipe: str = "transfer1"
    """:data:`RECIPES`: ``transfer1`` (Cosmos-Transfer1: a 1-step student by KD, then DMD2 with the energy-score
    term) or ``predict2.5`` (Cosmos-Predict2.5: a 4-step DMD2 student from the teacher's weights, no KD stage; build it
    with :meth:`for_recipe`, which sets its defaults)."""
    pairs: int = 256
    """KD teacher pairs (36-step CFG samples)."""
    eval_clips: int = 1024
    """Held-out conditions evaluated per sampler (and as many reference clips)."""
    diversity_clips: int = 256
    """Held-out conditions sampled a second time (other noise) for the diversity figures
    (:func:`~distill_mixins.eval.motion.diversity_stats`)."""
    spot_check: int = 32
    """Held-out conditions the teacher re-samples in every run to check the shipped teacher samples and time the
    teacher (:mod:`distill_mixins.toy.evalset`)."""
    steps_curve: bool = False
    """Add the quality-vs-steps curve (:mod:`distill_mixins.toy.curve`) to the report: the teacher at 1, 2, 4, 8 and
    ``teacher_steps`` steps beside the student, on the ``diversity_clips`` conditions."""
    fresh_teacher: bool = False
    """Sample the 36-step teacher on every held-out condition instead of reading the shipped samples (slow)."""
    teacher_steps: int = 36
    """DDIM steps of the teacher (its KD pairs and its evaluation)."""
    guidance: float = 3.0
    """CFG scale w of the teacher (standard form x0_u + w (x0_c - x0_u))."""
    kd_iterations: int = 300
    dmd2_iterations: int = 600
    dmd2_refine_weight: float = 20.0
    """Weight of DMD2's refine term (:class:`~distill_mixins.methods.DMD2Config` ``refine_weight``, re-noised to
    ``refine_tau``, ``refine_teacher_steps`` teacher steps); 0 runs plain DMD2."""
    dmd2_energy_weight: float = 1.0
    """Weight of DMD2's energy-score term on the training clips (:class:`~distill_mixins.methods.DMD2Config`
    ``energy_weight``, two samples a condition): it keeps the per-condition diversity that the refined-KD stage and
    the refine term take away (docs/toy.md has the measured trade with adherence)."""
    dmd2_energy_beta: float = 0.5
    """The energy score's exponent on distances (``DMD2Config.energy_beta``, in (0, 2)); below 1 a clip between
    two modes (a speed between the data's two) costs more than one at a mode. 0.5 measured better than 1 on every
    figure of the transfer1 student (docs/methods/dmd2.md)."""
    dmd2_gan_weight: float = 0.0
    """Weight of DMD2's GAN term (``DMD2Config.gan_loss_weight``; 0: off): query-attention heads on the critic's
    bottleneck and first 8x8 up block (:func:`toy_discriminator`) at their own uniform rectified-flow times (at the
    critic's shift-5 times they could not tell real clips from the student's; docs/methods/dmd2.md)."""
    dmd2_discriminator_lr: float = 1e-3
    refine_iterations: int = 0
    """Refined-KD iterations between KD and DMD2 (:mod:`distill_mixins.methods.refined_kd`); 0 skips the stage (the
    default since it costs the student its diversity: 320 gave adherence 0.89-0.91 and diversity 0.28-0.30x)."""
    refine_tau: float = 0.35
    """Rectified-flow time the student's sample is re-noised to (0.35: 65% signal)."""
    refine_teacher_steps: int = 2
    """Teacher DDIM steps from the re-noised student sample to 0."""
    refine_lr: float = 1e-4
    kd_symmetries: bool = False
    """Move every KD pair by a random rotation or reflection of the square frame (8x the pairs): KD then keeps
    improving past the default iterations instead of memorising its pairs (docs/toy.md)."""
    batch_size: int = 16
    sample_batch: int = 64
    kd_lr: float = 2e-4
    dmd2_student_lr: float = 3e-5
    dmd2_critic_lr: float = 1e-4
    dmd2_student_update_freq: int = 3
    precision: str = "auto"
    """``auto`` (bf16 where the CPU computes it natively, float32 otherwise), ``bf16`` or ``fp32``
    (:mod:`distill_mixins.precision`)."""
    seed: int = 0
    teacher_weights: str | None = None
    """Path of toy teacher weights; None: the shipped ones."""

    def __post_init__(self) -> None:
        for name in (
            "pairs", "eval_clips", "diversity_clips", "spot_check", "teacher_steps", "batch_size", "sample_batch",
            "refine_teacher_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} must be >= 1.")
        for name in ("kd_iterations", "dmd2_iterations", "refine_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"DemoConfig.{name}={getattr(self, name)} must be >= 0.")
        if not self.dmd2_energy_weight >= 0:
            raise ValueError(f"DemoConfig.dmd2_energy_weight={self.dmd2_energy_weight} must be >= 0 (0: no energy "
                             "term).")
        check_beta(self.dmd2_energy_beta, "DemoConfig.dmd2_energy_beta")
        if not self.dmd2_gan_weight >= 0:
            raise ValueError(f"DemoConfig.dmd2_gan_weight={self.dmd2_gan_weight} must be >= 0 (0: no GAN term).")
        if not self.dmd2_discriminator_lr > 0:
            raise ValueError(f"DemoConfig.dmd2_discriminator_lr={self.dmd2_discriminator_lr} must be > 0.")
        if not self.dmd2_refine_weight >= 0:
            raise ValueError(f"DemoConfig.dmd2_refine_weight={self.dmd2_refine_weight} must be >= 0 (0: plain DMD2).")
        if not 0.0 < self.refine_tau < 1.0:
            raise ValueError(f"DemoConfig.refine_tau={self.refine_tau} must be a rectified-flow time in (0, 1).")
        if self.diversity_clips > self.eval_clips:
            raise ValueError(f"DemoConfig.diversity_clips={self.diversity_clips} exceeds eval_clips={self.eval_clips}.")
        if self.recipe not in RECIPES:
            raise ValueError(f"DemoConfig.recipe={self.recipe!r} is not known: choose one of {', '.join(RECIPES)}.")
        if self.recipe == "predict2.5" and (self.kd_iterations or self.refine_iterations or not self.dmd2_iterations):
            raise ValueError("DemoConfig.recipe='predict2.5' is DMD2 from the teacher's weights (no KD or refined-KD "
                             "stage, dmd2_iterations >= 1): build it with DemoConfig.for_recipe('predict2.5'), which "
                             "sets kd_iterations and refine_iterations to 0.")
        check_precision(self.precision, "DemoConfig.precision")
        if self.teacher_weights is not None and not Path(self.teacher_weights).is_file():
            raise ValueError(f"DemoConfig.teacher_weights={self.teacher_weights!r} is not a file: give the path of a "
                             "toy teacher safetensors file (`distill-mixins toy-teacher` writes one), or leave it "
                             "unset.")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A CI-sized run (about a minute): few pairs, iterations and evaluation clips."""
        values: dict[str, Any] = {
            "out": "runs/demo-quick", "pairs": 64, "eval_clips": 128, "diversity_clips": 32, "kd_iterations": 40,
            "dmd2_iterations": 12, "refine_iterations": 0, "spot_check": 16,
        }
        return cls(**{**values, **overrides})

    @classmethod
    def for_recipe(cls, recipe: str = "transfer1", *, quick: bool = False, **overrides: Any) -> DemoConfig:
        """The defaults of ``recipe`` (:data:`RECIPES`), CI-sized with ``quick``, then ``overrides``."""
        if recipe not in RECIPES:
            raise ValueError(f"demo recipe {recipe!r} is not known: choose one of {', '.join(RECIPES)}.")
        values = {**RECIPES[recipe][1 if quick else 0], "recipe": recipe, **overrides}
        return cls.quick(**values) if quick else cls(**values)


RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "transfer1": ({}, {}),
    "predict2.5": (
        {"out": "runs/demo-predict2.5", "kd_iterations": 0, "refine_iterations": 0, "dmd2_iterations": 720,
         "dmd2_student_lr": 1e-5, "dmd2_energy_weight": 0.0},
        {"out": "runs/demo-predict2.5-quick", "kd_iterations": 0, "refine_iterations": 0, "dmd2_iterations": 12,
         "dmd2_student_lr": 1e-5, "dmd2_energy_weight": 0.0},
    ),
}
"""Recipe -> (its full-run values, its ``--quick`` values) over :class:`DemoConfig`'s defaults."""
STUDENT_STEPS = {"transfer1": (1,), "predict2.5": (4, 2, 1)}
"""The step counts each recipe's student is evaluated at; the first is the one it is trained for."""


class DemoStopped(Exception):
    """A signal stopped the demo in ``stage`` (its checkpoint, if it trains, is saved); run it again to resume."""

    def __init__(self, stage: str, signal_number: int, detail: str = "") -> None:
        self.stage, self.signal_number = stage, signal_number
        name = signal.Signals(signal_number).name
        super().__init__(f"the demo stopped on {name} in stage '{stage}'{detail}; run the same command again to "
                         "resume (finished stages are skipped, the interrupted one continues)")


def check_finished(stage: str, result: TrainResult) -> None:
    """Raise :class:`DemoStopped` when a training stage did not complete: no later stage may start from it."""
    if not result.completed:
        raise DemoStopped(stage, result.signal_number or int(signal.SIGTERM),
                          f" after iteration {result.iteration} (checkpoint {result.checkpoint})")


def clip_batches(n: int, seed: int, batch: int) -> Iterator[dict[str, Any]]:
    """Host batches ``{"clip", "prompt"}`` of ``n`` procedural clips drawn from ``seed``."""
    clips = make_clips(n, seed)
    for start in range(0, n, batch):
        yield {"clip": clips.video[start : start + batch], "prompt": clips.prompts[start : start + batch]}


TRAINER_AUTOCAST = {"auto": "auto", "bf16": "bf16", "fp32": "none"}
"""The demo's precision as the trainer's autocast (``auto`` is resolved by the same policy there, and its run's
``config.json`` records both)."""


def _optimizer(lr: float) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=lr, betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0)


def _trainer_config(config: DemoConfig, stage: str, iterations: int) -> TrainerConfig:
    return TrainerConfig(
        iterations=iterations, run_dir=str(Path(config.out) / stage), batch_size=config.batch_size,
        autocast=TRAINER_AUTOCAST[config.precision], seed=config.seed, log_every=50, save_every=200, keep_last=1,
    )


def kd_model(config: DemoConfig, teacher: ToyVideo2World) -> ToyKD:
    """The KD model on the teacher (AdamW, EMA half-life 50)."""
    return ToyKD(teacher.net, teacher.text_encoder, distill=KDConfig(
        student_optimizer=_optimizer(config.kd_lr), ema=EMAConfig(halflife_steps=50.0), seed=config.seed,
    ))


def make_kd_data(config: DemoConfig, model: ToyKD) -> Path:
    """Stage 1: the teacher's KD pairs (36 DDIM steps, CFG) on ``pairs`` training conditions; resumable."""
    data_dir = Path(config.out) / "kd_data"
    data_config = KDDataConfig(
        num_samples=config.pairs, steps=config.teacher_steps, sampler="ddim", guidance=config.guidance,
        seed=config.seed, shard_size=256, batch_size=config.sample_batch,
    )
    with autocast(config.precision), frozen_weights_for(config.precision, model.net_teacher):
        generate_kd_data(model, clip_batches(config.pairs, TRAIN_SEED, config.sample_batch), data_dir, data_config)
    return data_dir


def run_kd(config: DemoConfig, model: ToyKD, data_dir: Path) -> None:
    """Stage 2: KD on the pairs (each moved by a random symmetry with ``kd_symmetries``)."""
    pairs: DataSource = MapStyleData(KDShardDataset(data_dir), config.batch_size, seed=config.seed)
    if config.kd_symmetries:
        pairs = SymmetricPairs(pairs, seed=config.seed)
    check_finished("kd", DistillationTrainer(model, pairs, _trainer_config(config, "kd", config.kd_iterations)).fit())


def dmd2_config(config: DemoConfig) -> DMD2Config:
    """DMD2 with the demo's CFG scale, learning rates and update frequency, a shifted critic time (Cosmos shift 5), no
    GAN, the refine term (``dmd2_refine_weight``, the toy's addition to both recipes) and the energy-score term
    (``dmd2_energy_weight``, the transfer1 default's): ``transfer1`` one step;
    ``predict2.5`` :meth:`DMD2Config.cosmos_predict2_5` (4 steps, shift 5) with the toy's learning rates (the
    published 1e-6 / 2e-7 are for a 2B model fine-tuned for days)."""
    values: dict[str, Any] = {
        "student_update_freq": config.dmd2_student_update_freq, "guidance_scale": config.guidance,
        "student_optimizer": _optimizer(config.dmd2_student_lr), "critic_optimizer": _optimizer(config.dmd2_critic_lr),
        "critic_time": TimeSamplerConfig(kind="shifted_uniform", shift=5.0), "ema": EMAConfig(halflife_steps=20.0),
        "refine_weight": config.dmd2_refine_weight, "refine_time": refine_time(config),
        "refine_teacher_steps": config.refine_teacher_steps, "energy_weight": config.dmd2_energy_weight,
        "energy_beta": config.dmd2_energy_beta,
    }
    if config.dmd2_gan_weight > 0:
        values.update(gan_loss_weight=config.dmd2_gan_weight, discriminator=toy_discriminator(),
                      discriminator_optimizer=_optimizer(config.dmd2_discriminator_lr))
    if config.recipe == "predict2.5":
        return DMD2Config.cosmos_predict2_5(**values)
    return DMD2Config(**values)


def toy_discriminator() -> DiscriminatorConfig:
    """GAN heads for the toy UNet (which stacks frames as channels, so its blocks give image features (B, C, H, W)):
    query-attention heads on the critic's blocks 9 (the bottleneck's last, 128 x 4 x 4) and 13 (the first 8 x 8 up
    block, 96 wide) of ``ToyVideo2World.feature_blocks``, at their own times, rectified-flow tau uniform in (0, 1)."""
    return DiscriminatorConfig(kind="attention", feature_dim=(128, 96), taps=(9, 13), source="critic",
                               time=TimeSamplerConfig(kind="shifted_uniform", shift=1.0))


def conditions(seed: int, batch: int) -> FunctionData:
    """Trainer data of fresh procedural conditions: step ``i`` is the batch of clips drawn from ``seed + i``."""

    def make(step: int) -> dict[str, Any]:
        clips = make_clips(batch, seed + step)
        return {"clip": clips.video, "prompt": clips.prompts}

    return FunctionData(make)


def train_on_conditions(
    config: DemoConfig, model: ToyDMD2 | ToyRefinedKD, student: nn.Module, seed: int, stage: str, iterations: int
) -> None:
    """Load ``student`` into ``model`` (its raw weights: measured better than its EMA here) and train it on fresh
    procedural conditions drawn from ``seed`` under ``runs/<out>/<stage>``."""
    model.load_student_state_dict(student.state_dict())
    # the teacher only runs without gradients in these stages (the demo's GAN heads tap the critic)
    with frozen_weights_for(config.precision, model.net_teacher):
        result = DistillationTrainer(
            model, conditions(seed, config.batch_size), _trainer_config(config, stage, iterations)
        ).fit()
    check_finished(stage, result)


def run_dmd2(config: DemoConfig, teacher: ToyVideo2World, student: nn.Module) -> ToyDMD2:
    """Stage 4: DMD2 from the previous stage's student."""
    model = ToyDMD2(teacher.net, teacher.text_encoder, distill=dmd2_config(config))
    train_on_conditions(config, model, student, DMD2_SEED, "dmd2", config.dmd2_iterations)
    return model


def refine_time(config: DemoConfig) -> float:
    """TrigFlow time of the demo's ``refine_tau`` (rectified flow, the toy's sigma_d)."""
    tau = torch.tensor(config.refine_tau, dtype=torch.float64)
    return float(native_to_trigflow_time(tau, "rectified_flow", ToyVideo2World.sigma_data))


def refined_kd_config(config: DemoConfig) -> RefinedKDConfig:
    """Refined KD with the demo's CFG scale: re-noise to ``refine_tau``, ``refine_teacher_steps`` DDIM steps."""
    return RefinedKDConfig(
        student_optimizer=_optimizer(config.refine_lr), teacher_steps=config.refine_teacher_steps,
        refine_time=refine_time(config),
        guidance_scale=config.guidance, ema=EMAConfig(halflife_steps=20.0), seed=config.seed,
    )


def run_refine(config: DemoConfig, teacher: ToyVideo2World, student: nn.Module) -> ToyRefinedKD:
    """Stage 3: refined KD from the KD student (:mod:`distill_mixins.methods.refined_kd`)."""
    model = ToyRefinedKD(teacher.net, teacher.text_encoder, distill=refined_kd_config(config))
    train_on_conditions(config, model, student, REFINE_SEED, "refined_kd", config.refine_iterations)
    return model


# ------------------------------------------------------------------------------------------ evaluation

Student = ToyKD | ToyDMD2 | ToyRefinedKD
"""The model of the last stage run (its ``net`` is the student)."""


def samplers(model: Student, config: DemoConfig) -> dict[str, tuple[Sampler, int]]:
    """The evaluated samplers and their network evaluations per clip."""
    w, steps = config.guidance, config.teacher_steps
    out: dict[str, tuple[Sampler, int]] = {
        "teacher_36step_cfg": (teacher_sampler(model, steps, w), 2 * steps),
        "teacher_1step": (teacher_sampler(model, 1, w), 2),
    }
    for n in STUDENT_STEPS[config.recipe]:
        out[student_key(n)] = (student_sampler(model, n), n)
    return out


def student_key(steps: int) -> str:
    """The sampler name of the student at ``steps`` steps, e.g. ``student_4step``."""
    return f"student_{steps}step"


def main_student(config: DemoConfig) -> str:
    """The sampler name of the student at the step count its recipe trains it for."""
    return student_key(STUDENT_STEPS[config.recipe][0])


def student_sampler(model: Student, steps: int) -> Sampler:
    """The student with ``steps`` of its trained times: all of them, or an evenly spaced subset starting at the
    first (the 4-step schedule sampled at 2 steps uses its 1st and 3rd times)."""
    times = model.student_times()
    if steps == len(times):
        return lambda c, u, noise: model.generate(c, noise)
    if len(times) % steps:
        raise ValueError(f"the student trained for {len(times)} steps cannot be sampled at {steps}: choose a divisor.")
    subset = tuple(float(t) for t in times[:: len(times) // steps])
    return lambda c, u, noise: model.generate(c, noise, schedule=subset)


@dataclass
class SamplerMetrics:
    """Figures of one sampler on the held-out conditions; ``diversity`` with its standard error over the
    ``diversity_clips`` conditions sampled twice, and ``speed_split``: the share of them (both samples following the
    prompt) whose two samples move at different speeds (:class:`~distill_mixins.eval.motion.DiversityStats`);
    ``between_speeds``: the share of clips that miss the prompt by moving at a speed between the data's two
    (:func:`~distill_mixins.eval.motion.between_speeds`: a one-step student's blend)."""

    fd: float
    prompt_adherence: float
    temporal_consistency: float
    diversity: float
    diversity_stderr: float
    speed_split: float
    nfe: int
    latency_s_per_clip: float
    between_speeds: float


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
    precision: dict[str, Any] = field(default_factory=dict)
    """What ran: requested and resolved precision, the CPU's bf16 support (:class:`PrecisionReport`)."""
    teacher_samples: dict[str, Any] = field(default_factory=dict)
    """Where the 36-step teacher's clips came from (``shipped`` with its spot check, or ``sampled``)."""
    curve: list[CurvePoint] = field(default_factory=list)
    """The quality-vs-steps curve (empty unless ``steps_curve``)."""

    def to_json(self) -> dict[str, Any]:
        """``metrics.json``: one entry per sampler, then the top-level figures."""
        out: dict[str, Any] = {name: asdict(m) for name, m in self.samplers.items()}
        out |= {"fd_floor": self.fd_floor, "gap_closed": self.gap_closed, "speedup_wall": self.speedup_wall,
                "elapsed_s": self.elapsed_s, "stage_seconds": self.stage_seconds, "precision": self.precision,
                "teacher_samples": self.teacher_samples, "config": self.config,
                "curve": [asdict(point) for point in self.curve]}
        return out


def gap_closed(fd_teacher_1step: float, fd_student: float, fd_teacher: float) -> float:
    """``(fd_teacher_1step - fd_student) / (fd_teacher_1step - fd_teacher)``: 1 means the student matches the
    multi-step teacher, 0 that it is no better than the teacher at one step."""
    return (fd_teacher_1step - fd_student) / (fd_teacher_1step - fd_teacher)


@dataclass
class Evaluation:
    """Figures of every sampler, the real-vs-real FD floor, the 8-bit clips (N, 3, T, H, W) of every sampler (and
    ``ground_truth``) as floats, the held-out prompts, and where the teacher's clips came from."""

    figures: dict[str, SamplerMetrics]
    fd_floor: float
    clips: dict[str, Tensor]
    prompts: list[str]
    teacher_samples: dict[str, Any]
    again: dict[str, Tensor] = field(default_factory=dict)
    """Every sampler's clips (K, ...) of the first ``diversity_clips`` conditions from the second noise."""


@dataclass
class Generated:
    """One sampler's clips on the held-out conditions (N, ...) and on the first K with the second noise (K, ...),
    and its sampling seconds per clip."""

    clips: Tensor
    again: Tensor
    latency_s_per_clip: float


def shipped_teacher(config: DemoConfig) -> TeacherSamples | None:
    """The shipped 36-step teacher samples, when this run may use them (see :mod:`distill_mixins.toy.evalset`)."""
    if config.fresh_teacher:
        return None
    settings = teacher_settings(config.teacher_weights or WEIGHTS, config.teacher_steps, config.guidance)
    return usable_samples(settings, config.eval_clips, config.diversity_clips)


TIMING_REPEATS = 3
"""Timed runs of each non-teacher sampler on the spot-check conditions (their median is its latency)."""


def spot_latency(model: Student, sampler: Sampler, held: HeldOutSet, config: DemoConfig) -> float:
    """Seconds a clip of ``sampler`` on the first ``spot_check`` held-out conditions, batched as the teacher's timed
    spot check (the median of :data:`TIMING_REPEATS` runs). Every sampler's latency is timed on these clips at this
    batch size, so the wall-clock speedup compares like with like: per clip, a batch of 64 runs ~1.35x slower than one
    of 32 on a 2-core CPU (the 4-step student: 13.9 vs 10.3 ms), and timing the student over the 1,024 clips in batches
    of 64 against the teacher's one batch of 32 read 14.1x where the same batch gives ~19x."""
    s = min(config.spot_check, len(held.clips))
    runs = [run_sampler(model, sampler, held.clips.head(s), held.noise[:s], batch=config.sample_batch,
                        precision=config.precision, desc="timing").latency_s_per_clip for _ in range(TIMING_REPEATS)]
    return statistics.median(runs)


def generate(model: Student, sampler: Sampler, name: str, config: DemoConfig, held: HeldOutSet) -> Generated:
    """Sample the held-out conditions (and the first K again with the second noise) with one sampler; its latency
    from :func:`spot_latency`."""
    k = config.diversity_clips
    first = run_sampler(model, sampler, held.clips, held.noise, batch=config.sample_batch, precision=config.precision,
                        desc=name)
    again = run_sampler(model, sampler, held.clips.head(k), held.again_noise, batch=config.sample_batch,
                        precision=config.precision, desc=f"{name} (2nd)")
    return Generated(first.clips, again.clips, spot_latency(model, sampler, held, config))


def checked_teacher(
    model: Student, sampler: Sampler, shipped: TeacherSamples, config: DemoConfig, held: HeldOutSet
) -> tuple[Generated, SpotCheck]:
    """The shipped teacher clips, after re-sampling the first ``spot_check`` conditions (which also times the
    teacher); raises when the fresh clips disagree with the shipped ones."""
    fresh, check = spot_checked(
        model, sampler, shipped, held, spot=config.spot_check, batch=config.sample_batch, precision=config.precision,
        remedy="regenerate them with `distill-mixins toy-teacher-samples --out "
        "distill_mixins/toy/weights/toy_teacher_eval.safetensors.xz`, or run the demo with --fresh-teacher",
    )
    n, k = config.eval_clips, config.diversity_clips
    return Generated(shipped.clips[:n], shipped.again[:k], fresh.latency_s_per_clip), check


def evaluate(model: Student, config: DemoConfig) -> Evaluation:
    """Metrics of every sampler on held-out conditions (see :class:`Evaluation`); latencies from
    :func:`spot_latency` (the shipped teacher's from its spot check, the same clips and batch)."""
    from distill_mixins.eval.motion import diversity_stats
    from distill_mixins.eval.video import evaluate_clips

    held_set = held_out_set(config.eval_clips, config.diversity_clips)
    held = held_set.clips
    shipped = shipped_teacher(config)
    source: dict[str, Any] = {"source": "sampled in this run"}
    results, clips, again = {}, {}, {}
    for name, (sampler, nfe) in samplers(model, config).items():
        if name == "teacher_36step_cfg" and shipped is not None:
            run, check = checked_teacher(model, sampler, shipped, config, held_set)
            source = {"source": "shipped", "spot_check": asdict(check), "made_by": shipped.metadata.get("command", "")}
        else:
            run = generate(model, sampler, name, config, held_set)
        figures = evaluate_clips(run.clips, held_set.reference, held.prompts, net=held_set.feature_net)
        k = config.diversity_clips
        spread = diversity_stats(run.clips[:k], run.again, held.prompts[:k])
        results[name] = SamplerMetrics(
            fd=figures.fd, prompt_adherence=figures.prompt_adherence,
            temporal_consistency=figures.temporal_consistency, diversity=spread.mean,
            diversity_stderr=spread.stderr, speed_split=spread.speed_split, nfe=nfe,
            latency_s_per_clip=run.latency_s_per_clip, between_speeds=figures.between_speeds,
        )
        clips[name], again[name] = run.clips, run.again
        logger.info("{}: {}", name, results[name])
    clips["ground_truth"] = held.video
    return Evaluation(results, held_set.fd_floor, clips, held.prompts, source, again)


def run_demo(config: DemoConfig) -> DemoResult:
    """All stages; writes the run directory's report, metrics, picture and GIFs (see the module docstring).

    A SIGTERM or SIGINT stops the run with :class:`DemoStopped`: a training stage first saves its checkpoint, and
    no later stage starts; running the same config again resumes."""
    progress = {"stage": "setup"}
    with raise_on_signal():
        try:
            return _run_stages(config, progress)
        except Signalled as stop:
            raise DemoStopped(progress["stage"], stop.signal_number) from None


def _timed(progress: dict[str, str], seconds: dict[str, float], stage: str, run: Callable[[], Any]) -> Any:
    """Run one stage under its name (for :class:`DemoStopped`) and record its seconds as ``<stage>_s``."""
    progress["stage"] = stage
    tic = time.perf_counter()
    out = run()
    seconds[f"{stage}_s"] = time.perf_counter() - tic
    return out


def _run_stages(config: DemoConfig, progress: dict[str, str]) -> DemoResult:
    from distill_mixins.toy.report import write_report

    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "demo_config.json", json.dumps(asdict(config), indent=2))
    precision = PrecisionReport.of(config.precision)
    torch.manual_seed(config.seed)
    teacher = load_toy_teacher(config.teacher_weights)
    seconds: dict[str, float] = {}
    final: Student = kd_model(config, teacher)
    if config.kd_iterations > 0:
        data_dir = _timed(progress, seconds, "kd_data", lambda: make_kd_data(config, final))
        _timed(progress, seconds, "kd", lambda: run_kd(config, final, data_dir))
    if config.refine_iterations > 0:
        final = _timed(progress, seconds, "refine", lambda: run_refine(config, teacher, final.net))
    if config.dmd2_iterations > 0:
        final = _timed(progress, seconds, "dmd2", lambda: run_dmd2(config, teacher, final.net))
    final.eval()
    with frozen_weights_for(config.precision, final.net_teacher, final.net):
        evaluation = _timed(progress, seconds, "eval", lambda: evaluate(final, config))
        curve = _timed(progress, seconds, "curve", lambda: steps_curve(final, config, evaluation)) \
            if config.steps_curve else []
    progress["stage"] = "report"
    t36, t1, s1 = (evaluation.figures[k] for k in ("teacher_36step_cfg", "teacher_1step", main_student(config)))
    result = DemoResult(
        samplers=evaluation.figures, fd_floor=evaluation.fd_floor, gap_closed=gap_closed(t1.fd, s1.fd, t36.fd),
        speedup_wall=t36.latency_s_per_clip / s1.latency_s_per_clip, elapsed_s=time.perf_counter() - start,
        stage_seconds=seconds, config=asdict(config), precision=asdict(precision),
        teacher_samples=evaluation.teacher_samples, curve=curve,
    )
    write_text_atomic(out / "metrics.json", json.dumps(result.to_json(), indent=2))
    write_report(out, result, evaluation.clips, evaluation.prompts)
    return result
