"""DMD2 acceptance on the exact 8-mode conditional mixture teacher (36 Heun steps, CFG w = 2).

Training takes 3-4 CPU minutes per student on one thread; the time is printed, not asserted (noisy machines).

Design (docs/development.md): one pair of 4,096-sample sets gives sliced-W2 ratios of 0.8-1.8 even
for an exact sampler, so the floor and the student's distance are means over replicate sets, each
compared with the same teacher set A. One training run is not a robust figure either: the student's distance
oscillates during training (1-step, seed 3: 1.65x the floor at 10,000 iterations, 2.64x at 14,000, 1.53x at
20,000), so each goal holds for the median over three training seeds (``DistillConfig.seed``), trained in parallel
processes, and the 1-step student's learning rate decays (cosine, to 0.1x) so that the run ends settled: with a
constant rate five seeds gave 1.66-2.55x (median 1.98x), with the decay 1.63-1.94x (median 1.79x; docs/methods/dmd2.md).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
import torch

from distill_mixins import DMD2Config, DMD2Mixin, EMAConfig, OptimizerConfig, TimeSamplerConfig
from distill_mixins.eval import sliced_wasserstein2
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, mixture_batch, ring_mixture

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

SHAPE = (2, 2, 1, 1)
GUIDANCE = 2.0
SAMPLES = 4096
REPLICATES = 4
SEEDS = (0, 1, 2)


class AnalyticDMD2(DMD2Mixin, ToyHost):
    """The exact mixture teacher with DMD2, a neural student and a neural critic."""


@dataclass
class Figures:
    """Sliced-W2 (means over replicates); mode figures of all replicates pooled (:class:`ModeFigures`)."""

    floor: float
    student: float
    teacher_1step: float
    mode_mass_error: float
    near_student: float
    near_teacher: float
    seconds: float
    spread: float = 1.0
    """Mean distance to the nearest mode (in its std) of the samples within 4 std, over the teacher's (1 = the
    teacher's mode width; mode-seeking students shrink the modes below 1)."""


@dataclass
class ModeFigures:
    """A sample set's largest mode-mass error against the teacher's pool, share within 4 std of a mode, and spread."""

    mass_error: float
    near: float
    spread: float


def adam(lr: float, decay_steps: int = 0) -> OptimizerConfig:
    """Adam with betas (0, 0.99); with ``decay_steps`` a cosine decay to 0.1x over that many optimizer steps."""
    decay = {"decay": "cosine", "decay_iters": decay_steps, "min_lr_ratio": 0.1} if decay_steps else {}
    return OptimizerConfig(name="adam", lr=lr, betas=(0.0, 0.99), weight_decay=0.0, grad_clip=10.0, **decay)


def train_dmd2(
    schedule: str, iterations: int, student_update_freq: int, backward_simulation: bool = True, seed: int = 0,
    decay: bool = False,
) -> tuple[AnalyticDMD2, float]:
    """DMD2 on the mixture; ``decay``: the student's learning rate decays over its updates (cosine, to 0.1x)."""
    torch.manual_seed(0)  # the networks' initialisation; the training draws follow ``seed``
    mixture = ring_mixture(num_modes=8, num_labels=2, shape=SHAPE)
    student_steps = iterations // student_update_freq if decay else 0
    config = DMD2Config(
        student_net=MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=256, depth=4),
        critic_net=MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=256, depth=4),
        student_schedule=schedule, renoise="fresh", guidance_scale=GUIDANCE, backward_simulation=backward_simulation,
        student_update_freq=student_update_freq, student_optimizer=adam(3e-4, student_steps),
        critic_optimizer=adam(1e-3),
        critic_time=TimeSamplerConfig(kind="shifted_uniform", shift=1.0), ema=EMAConfig(halflife_steps=300),
        seed=seed,
    )
    model = AnalyticDMD2(**analytic_host_args(mixture, "rf_velocity"), distill=config)
    return model, fit(model, iterations)


def fit(model: AnalyticDMD2, iterations: int) -> float:
    """Train on batches of 256 of the teacher's own mixture (generator seed 1); the seconds it took."""
    g = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for it in range(iterations):
        _, loss = model.training_step(mixture_batch(model.net_teacher.mixture, 256, g), it)
        loss.backward()
        model.optimizer_step(it)
    return time.perf_counter() - start


class Reference:
    """The evaluation draws (generator seed 2): labels, teacher set A (36 Heun steps with CFG), the floor (mean
    sliced-W2 of replicate teacher sets to A); further teacher sets and noises come from the same generator ``g``."""

    def __init__(self, model: AnalyticDMD2) -> None:
        self.model, self.mixture = model, model.net_teacher.mixture
        self.g = torch.Generator().manual_seed(2)
        self.labels = torch.randint(0, 2, (SAMPLES,), generator=self.g)
        self.A = self.teacher(36)
        replicates = [self.teacher(36) for _ in range(REPLICATES)]
        self.floor = sum(self.sw2(x, r) for r, x in enumerate(replicates)) / REPLICATES
        # the mode figures' reference: set A and the floor's replicates (20,480 samples); a student's 4 replicates
        # pooled against it have a mass-error sampling floor of ~0.7 pp (one 4,096 set against A: ~1.1 pp)
        self.pool = torch.cat([self.A, *replicates])
        self.pool_mass, self.near_teacher = self.masses(self.pool)
        _, dist = self.mixture.nearest_mode(self.pool)
        self.teacher_width = float(dist[dist <= 4].mean())

    def teacher(self, steps: int) -> torch.Tensor:
        noise = torch.randn(SAMPLES, *SHAPE, generator=self.g)
        return self.model.generate_teacher(self.labels, noise, uncondition=torch.full_like(self.labels, -1),
                                           guidance=GUIDANCE, steps=steps)

    def sw2(self, x: torch.Tensor, r: int) -> float:
        return sliced_wasserstein2(x, self.A, generator=torch.Generator().manual_seed(r))

    def masses(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Each mode's share of x, and the share within 4 std of a mode."""
        k, dist = self.mixture.nearest_mode(x)
        return torch.bincount(k, minlength=8).double() / x.shape[0], float((dist <= 4).double().mean())

    def modes(self, samples: list[torch.Tensor]) -> ModeFigures:
        """:class:`ModeFigures` of the replicates pooled, against the teacher's pool."""
        x = torch.cat(samples)
        mass, near = self.masses(x)
        _, dist = self.mixture.nearest_mode(x)
        return ModeFigures(float((mass - self.pool_mass).abs().max()), near,
                           float(dist[dist <= 4].mean()) / self.teacher_width)


@torch.no_grad()
def evaluate(model: AnalyticDMD2, seconds: float) -> Figures:
    ref = Reference(model)
    samples = [model.generate(ref.labels, torch.randn(SAMPLES, *SHAPE, generator=ref.g), use_ema=True,
                              generator=ref.g) for _ in range(REPLICATES)]
    modes = ref.modes(samples)
    return Figures(
        floor=ref.floor, student=sum(ref.sw2(x, r) for r, x in enumerate(samples)) / REPLICATES,
        teacher_1step=ref.sw2(ref.teacher(1), 0), mode_mass_error=modes.mass_error, near_student=modes.near,
        near_teacher=ref.near_teacher, seconds=seconds, spread=modes.spread,
    )


def train_and_evaluate(schedule: str, iterations: int, backward_simulation: bool, decay: bool, seed: int) -> Figures:
    """One training seed, in a worker process of its own (one thread)."""
    torch.set_num_threads(1)
    model, seconds = train_dmd2(schedule, iterations, 2, backward_simulation, seed, decay)
    return evaluate(model, seconds)


RUNS = {  # test name: (student schedule, iterations, backward simulation, student lr decay)
    "test_one_step_dmd2_from_scratch_matches_the_teacher_distribution": ("one_step", 14000, True, True),
    "test_four_step_dmd2_from_scratch_matches_the_teacher_distribution": ("cosmos_4step", 10000, False, False),
}


def submit(pool, name: str) -> list[Future]:
    """The seeds of one test's training in the session's pool (tests/conftest.py; shared with the rCM acceptance)."""
    return [pool.submit(("dmd2", *RUNS[name], seed), train_and_evaluate, *RUNS[name], seed) for seed in SEEDS]


def submit_selected(pool, items) -> dict[str, list[Future]]:
    """Every seed of every selected test's training (``items``: the session's), queued at once on the session's
    processes (the two tests' six trainings take three rounds on two CPUs instead of four). Other acceptance modules
    call it first, so their trainings and these share rounds."""
    return {name: submit(pool, name) for name in RUNS if any(item.name == name for item in items)}


@pytest.fixture(scope="module")
def trainings(request, training_pool) -> dict[str, list[Future]]:
    return submit_selected(training_pool, request.session.items)


def report(name: str, runs: list[Figures]) -> None:
    for seed, f in zip(SEEDS, runs, strict=True):
        print(
            f"\n{name}, seed {seed}: sliced-W2 {f.student:.4f} = {f.student / f.floor:.2f}x floor {f.floor:.4f}; "
            f"undistilled teacher at 1 step {f.teacher_1step / f.floor:.1f}x; largest mode-mass error "
            f"{100 * f.mode_mass_error:.1f} pp; within 4 std of a mode: student {100 * f.near_student:.1f}%, "
            f"teacher {100 * f.near_teacher:.1f}%; mode width {f.spread:.2f}x the teacher's; "
            f"trained in {f.seconds:.0f} s"
        )
    m = medians(runs)
    print(f"{name}, median of seeds {SEEDS}: {m.student / m.floor:.2f}x the floor (goal <= 2.0x), mode-mass error "
          f"{100 * m.mode_mass_error:.1f} pp (goal <= 3), within 4 std {100 * m.near_student:.1f}% (goal >= 85%), "
          f"mode width {m.spread:.2f}x")


def medians(runs: list[Figures]) -> Figures:
    """Each figure's median over the seeds (the ratio's median via the student's own, with the floor shared)."""
    ratio = statistics.median(f.student / f.floor for f in runs)
    floor = statistics.median(f.floor for f in runs)
    return Figures(
        floor=floor, student=ratio * floor, teacher_1step=statistics.median(f.teacher_1step for f in runs),
        mode_mass_error=statistics.median(f.mode_mass_error for f in runs),
        near_student=statistics.median(f.near_student for f in runs),
        near_teacher=statistics.median(f.near_teacher for f in runs), seconds=max(f.seconds for f in runs),
        spread=statistics.median(f.spread for f in runs),
    )


def check(runs: list[Figures]) -> None:
    f = medians(runs)
    assert f.student <= 2.0 * f.floor
    assert f.mode_mass_error <= 0.03
    assert f.near_student >= 0.85
    assert all(r.teacher_1step > 5 * r.floor for r in runs)


@pytest.mark.acceptance
def test_one_step_dmd2_from_scratch_matches_the_teacher_distribution(trainings):
    """1 student : 1 critic update (the tiny critic keeps up; the recipes' 1 : 4 needs ~2x the iterations here)."""
    runs = [run.result() for run in trainings["test_one_step_dmd2_from_scratch_matches_the_teacher_distribution"]]
    report("1-step DMD2 student", runs)
    check(runs)


@pytest.mark.acceptance
def test_four_step_dmd2_from_scratch_matches_the_teacher_distribution(trainings):
    """Cosmos 4-step schedule, all four steps simulated with the gradient on the last (``backward_simulation=False``)
    and 1 student : 1 critic update; docs/methods/dmd2.md compares it with random-n backward simulation."""
    runs = [run.result() for run in trainings["test_four_step_dmd2_from_scratch_matches_the_teacher_distribution"]]
    report("4-step DMD2 student", runs)
    check(runs)
