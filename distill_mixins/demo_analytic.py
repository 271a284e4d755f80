"""The analytic demo: distill an exact 36-step CFG teacher into a 1-step student on CPU.

The teacher is the exact denoiser of an 8-mode conditional Gaussian mixture, exposed as a
rectified-flow velocity host (the Cosmos-Predict2.5 parameterization). The demo draws a pool
of (noise, teacher 36-step Heun CFG output) pairs, then trains a small MLP student with
:class:`~distill_mixins.methods.kd.KDMixin` to map the noise to the teacher's output in one step.
It runs until the toy Video2World demo lands.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch import Tensor
from tqdm import tqdm

from distill_mixins.config import OptimizerConfig
from distill_mixins.eval.images import hstack_panels, scatter_panel, write_png
from distill_mixins.eval.metrics import sliced_wasserstein2
from distill_mixins.methods.kd import KDConfig, KDMixin
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, ring_mixture
from distill_mixins.testing.gmm import GaussianMixture

TEACHER_STEPS = 36


@dataclass
class AnalyticDemoConfig(KDConfig):
    """KD settings plus the demo's teacher steps and CFG scale (standard form, MATH.md section 2)."""

    teacher_steps: int = TEACHER_STEPS
    guidance: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_steps < 1:
            raise ValueError(f"AnalyticDemoConfig.teacher_steps={self.teacher_steps} must be >= 1.")


@torch.no_grad()
def teacher_pairs(
    model: AnalyticDistill, mixture: GaussianMixture, n: int, *, chunk: int = 2048, generator: torch.Generator
) -> dict[str, Tensor]:
    """``n`` pairs {label, noise, teacher_x0} from the 36-step Heun CFG teacher, with a progress bar."""
    config = model.distill_config
    parts: list[dict[str, Tensor]] = []
    for start in tqdm(range(0, n, chunk), desc="teacher pairs (36 Heun steps, CFG)", unit="chunk"):
        labels = torch.randint(0, mixture.num_labels, (min(chunk, n - start),), generator=generator)
        noise = torch.randn(labels.shape[0], *mixture.shape, generator=generator)
        x0 = model.generate_teacher(
            labels, noise, uncondition=torch.full_like(labels, -1), guidance=config.guidance,
            steps=config.teacher_steps,
        )
        parts.append({"label": labels, "noise": noise, "teacher_x0": x0})
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class AnalyticDistill(KDMixin, ToyHost):
    """The exact mixture teacher composed with KD, as a user would compose theirs."""

    config_class = AnalyticDemoConfig


@dataclass
class AnalyticDemoResult:
    """Figures of the demo; sliced-W2 distances to 36-step CFG teacher samples."""

    sw2_floor: float
    sw2_teacher_1step: float
    sw2_student_1step: float
    mode_mass_error_student: float
    mode_mass_error_teacher_1step: float
    nfe_teacher: int
    nfe_student: int
    pairs: int
    iterations: int
    pairs_seconds: float
    train_seconds: float
    elapsed_s: float


def _mode_mass(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    k, _ = mixture.nearest_mode(x)
    return torch.bincount(k, minlength=mixture.means.shape[0]).double() / x.shape[0]


def _plane(mixture: GaussianMixture, x: torch.Tensor) -> np.ndarray:
    """Project samples (N, ...) onto the plane of the mixture's means."""
    _, _, vh = torch.linalg.svd(mixture.means, full_matrices=False)
    return (x.reshape(x.shape[0], -1).double() @ vh[:2].T).numpy()


def run_analytic_demo(
    out_dir: str | Path = "runs/demo-analytic", *, pairs: int = 16384, iterations: int = 1500,
    batch_size: int = 256, eval_samples: int = 4096, seed: int = 0,
) -> AnalyticDemoResult:
    """Distill, evaluate, and write metrics.json, config.json and samples.png into ``out_dir``."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    mixture = ring_mixture(num_modes=8, num_labels=2, shape=(2, 2, 1, 1))
    form = "rf_velocity"
    config = AnalyticDemoConfig(
        student_net=MLPDenoiser(mixture.shape, form, mixture.num_labels, hidden=256, depth=4),
        student_optimizer=OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0, grad_clip=1.0),
    )
    model = AnalyticDistill(**analytic_host_args(mixture, form), distill=config)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    data_gen = torch.Generator().manual_seed(seed + 1)
    pairs_start = time.perf_counter()
    pool = teacher_pairs(model, mixture, pairs, generator=data_gen)
    pool["x0"] = pool["teacher_x0"]
    train_start = time.perf_counter()
    bar = tqdm(range(iterations), desc="distilling (1-step student <- 36-step CFG teacher)", unit="it")
    for iteration in bar:
        index = torch.randint(0, pairs, (batch_size,), generator=data_gen)
        _, loss = model.training_step({key: value[index] for key, value in pool.items()}, iteration)
        loss.backward()
        model.optimizer_step(iteration)
        if iteration % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - train_start

    figures = _evaluate(model, mixture, config, eval_samples, seed, out)
    result = AnalyticDemoResult(
        **figures, nfe_teacher=2 * (2 * config.teacher_steps - 1), nfe_student=1, pairs=pairs,
        iterations=iterations, pairs_seconds=train_start - pairs_start, train_seconds=train_seconds,
        elapsed_s=time.perf_counter() - start,
    )
    (out / "metrics.json").write_text(json.dumps(asdict(result), indent=2))
    return result


@torch.no_grad()
def _evaluate(
    model: AnalyticDistill, mixture: GaussianMixture, config: AnalyticDemoConfig, n: int, seed: int, out: Path
) -> dict[str, float]:
    """Sliced-W2 and mode-mass figures against 36-step CFG teacher samples; writes samples.png."""
    g = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, mixture.num_labels, (n,), generator=g)
    uncond = torch.full_like(labels, -1)

    def teacher(steps: int, noise: torch.Tensor) -> torch.Tensor:
        return model.generate_teacher(
            labels, noise, uncondition=uncond, guidance=config.guidance, steps=steps, sampler="heun"
        )

    noises = [torch.randn(n, *mixture.shape, generator=g) for _ in range(3)]
    ref_a, ref_b = teacher(config.teacher_steps, noises[0]), teacher(config.teacher_steps, noises[1])
    teacher_1 = teacher(1, noises[2])
    student_1 = model.generate(labels, noises[2])
    sw = {
        name: sliced_wasserstein2(x, ref_a, generator=torch.Generator().manual_seed(seed))
        for name, x in (("floor", ref_b), ("teacher_1", teacher_1), ("student_1", student_1))
    }
    mass_ref = _mode_mass(mixture, ref_a)
    colors = np.array([[31, 119, 180], [255, 127, 14]], dtype=np.uint8)[labels.numpy()]
    panels = [scatter_panel(_plane(mixture, x), colors) for x in (ref_a, teacher_1, student_1)]
    write_png(out / "samples.png", hstack_panels(panels))
    logger.info("wrote {} (teacher 36-step CFG | teacher 1-step | student 1-step)", out / "samples.png")
    return {
        "sw2_floor": sw["floor"],
        "sw2_teacher_1step": sw["teacher_1"],
        "sw2_student_1step": sw["student_1"],
        "mode_mass_error_student": float((_mode_mass(mixture, student_1) - mass_ref).abs().max()),
        "mode_mass_error_teacher_1step": float((_mode_mass(mixture, teacher_1) - mass_ref).abs().max()),
    }


def format_result(result: AnalyticDemoResult) -> str:
    """A small table of the demo's figures."""
    rows: list[tuple[str, Any, Any, Any]] = [
        ("teacher 36-step CFG (2nd set)", f"{result.sw2_floor:.4f}", "-", result.nfe_teacher),
        ("teacher 1-step", f"{result.sw2_teacher_1step:.4f}", f"{result.mode_mass_error_teacher_1step:.3f}", 2),
        ("student 1-step", f"{result.sw2_student_1step:.4f}", f"{result.mode_mass_error_student:.3f}", 1),
    ]
    lines = [f"{'sampler':32s} {'sliced-W2':>10s} {'mode-mass err':>14s} {'NFE':>5s}"]
    lines += [f"{a:32s} {b:>10s} {c:>14s} {d!s:>5s}" for a, b, c, d in rows]
    lines.append(
        f"student / floor = {result.sw2_student_1step / result.sw2_floor:.2f}x, teacher 1-step / floor = "
        f"{result.sw2_teacher_1step / result.sw2_floor:.2f}x; {result.pairs} teacher pairs in "
        f"{result.pairs_seconds:.0f} s, {result.iterations} iterations in {result.train_seconds:.0f} s "
        f"(total {result.elapsed_s:.0f} s)"
    )
    return "\n".join(lines)
