"""Trainer callbacks: loguru logging, tqdm progress, JSON-lines metrics, TensorBoard, visuals, validation.

A callback overrides any of the hooks of :class:`Callback`. Metrics reach every callback through
``on_metrics`` (the trainer's ``emit_metrics``), so a validation callback's figures land in the same
JSON lines, log and TensorBoard as the training loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from distill_mixins.trainer.seeding import isolated_rng
from loguru import logger
from torch import Tensor, nn
from tqdm import tqdm

from distill_mixins.methods.kd import KD_NOISE, KD_TEACHER_X0, kd_field

if TYPE_CHECKING:
    from distill_mixins.trainer.trainer import DistillationTrainer


@dataclass
class StepResult:
    """One iteration: its phase, mean loss over the micro-batches, the method's outputs, per-network gradient
    norms (before clipping) and learning rates; ``skipped`` when the loss was non-finite."""

    iteration: int
    phase: str
    loss: float
    outputs: dict[str, float]
    grad_norms: dict[str, float]
    lrs: dict[str, float]
    skipped: bool
    seconds: float

    def scalars(self) -> dict[str, float]:
        """Numeric metrics: ``loss/<phase>``, the method's outputs, ``grad_norm/<net>``, ``lr/<net>``."""
        out = {f"loss/{self.phase}": self.loss, **self.outputs}
        out.update({f"grad_norm/{k}": v for k, v in self.grad_norms.items()})
        out.update({f"lr/{k}": v for k, v in self.lrs.items()})
        return out


class MetricWindow:
    """Means of the step metrics since the last log line (each key over the steps that had it), the number
    of skipped steps and the iteration speed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = self.skipped = 0
        self.seconds = 0.0

    def add(self, step: StepResult) -> None:
        """Accumulate one iteration (skipped ones count only as skipped)."""
        self.steps += 1
        self.seconds += step.seconds
        if step.skipped:
            self.skipped += 1
            return
        for key, value in step.scalars().items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, Any]:
        """The window's metrics; resets the window."""
        out: dict[str, Any] = {key: self.sums[key] / self.counts[key] for key in sorted(self.sums)}
        out["skipped"] = self.skipped
        out["it_per_s"] = self.steps / self.seconds if self.seconds > 0 else float("nan")
        self.__init__()
        return out


@dataclass
class TrainResult:
    """How a ``fit`` ended: iterations done (the next iteration to run), where it started, why it stopped
    (``completed`` or ``signal SIGTERM``/``signal SIGINT``, with ``signal_number``), the last checkpoint and the
    skipped iterations."""

    iteration: int
    start_iteration: int
    stop_reason: str
    checkpoint: Path | None
    skipped_iterations: int
    seconds: float
    signal_number: int | None = None

    @property
    def completed(self) -> bool:
        """True when every configured iteration ran."""
        return self.stop_reason == "completed"


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_start(self, trainer: DistillationTrainer) -> None:
        """After resume/seeding, before the first iteration."""

    def on_step_end(self, trainer: DistillationTrainer, step: StepResult) -> None:
        """After every iteration (``trainer.iteration`` is then ``step.iteration + 1``)."""

    def on_metrics(self, trainer: DistillationTrainer, iteration: int, metrics: dict[str, Any]) -> None:
        """Metrics of ``iteration`` (training ones every ``log_every``, validation ones when computed)."""

    def on_save(self, trainer: DistillationTrainer, path: Path) -> None:
        """After a checkpoint was committed."""

    def on_train_end(self, trainer: DistillationTrainer, result: TrainResult | None) -> None:
        """At the end of ``fit``; ``result`` is None when training raised."""


def _due(every: int, completed: int) -> bool:
    return every > 0 and completed % every == 0


def _format(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif not isinstance(value, bool):
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class LoguruLogger(Callback):
    """Logs metrics with loguru, every ``log_every`` iterations (and every skipped iteration)."""

    def on_train_start(self, trainer: DistillationTrainer) -> None:
        """Log where training starts."""
        logger.info(
            "training {} from iteration {} to {} in {}, autocast {} (asked: {})", type(trainer.model).__name__,
            trainer.iteration, trainer.config.iterations, trainer.run_dir, trainer.autocast, trainer.config.autocast,
        )

    def on_metrics(self, trainer: DistillationTrainer, iteration: int, metrics: dict[str, Any]) -> None:
        """One log line per metrics record: ``[done/total]`` iterations, then the metrics."""
        logger.info("[{}/{}] {}", iteration + 1, trainer.config.iterations, _format(metrics))


class ProgressBar(Callback):
    """A tqdm bar over the iterations with it/s and ETA; the loss in its postfix every ``log_every``."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: DistillationTrainer) -> None:
        """Open the bar at the resumed iteration."""
        self.bar = tqdm(
            total=trainer.config.iterations, initial=trainer.iteration, unit="it", desc="distilling", dynamic_ncols=True
        )

    def on_step_end(self, trainer: DistillationTrainer, step: StepResult) -> None:
        """Advance by one iteration."""
        if self.bar is not None:
            self.bar.update(1)
            if _due(trainer.config.log_every, step.iteration + 1):
                self.bar.set_postfix(loss=f"{step.loss:.4g}", phase=step.phase)

    def on_train_end(self, trainer: DistillationTrainer, result: TrainResult | None) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class JsonlMetrics(Callback):
    """Appends ``{"iteration": i, ...metrics}`` lines to ``run_dir/metrics.jsonl``.

    On resume, lines of iterations at or after the resumed one (from the interrupted run) are dropped first.
    """

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename

    def path(self, trainer: DistillationTrainer) -> Path:
        """The metrics file of ``trainer``'s run."""
        return trainer.run_dir / self.filename

    def on_train_start(self, trainer: DistillationTrainer) -> None:
        """Drop records the resumed run will write again."""
        path = self.path(trainer)
        if path.is_file():
            kept = [
                line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", -1) < trainer.iteration
            ]
            path.write_text("".join(line + "\n" for line in kept))

    def on_metrics(self, trainer: DistillationTrainer, iteration: int, metrics: dict[str, Any]) -> None:
        """Append one record."""
        record = {"iteration": iteration, **{k: _json_value(v) for k, v in metrics.items()}}
        with open(self.path(trainer), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class TensorBoardLogger(Callback):
    """Scalars to ``run_dir/tensorboard`` (needs the optional ``tensorboard`` package)."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_train_start(self, trainer: DistillationTrainer) -> None:
        """Open the event writer."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoard logging needs the optional 'tensorboard' package: pip install tensorboard, "
                "or set TrainerConfig.tensorboard=False."
            ) from error
        self.writer = SummaryWriter(str(self.log_dir or trainer.run_dir / "tensorboard"), purge_step=trainer.iteration)

    def on_metrics(self, trainer: DistillationTrainer, iteration: int, metrics: dict[str, Any]) -> None:
        """One scalar per numeric metric."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, iteration)

    def on_train_end(self, trainer: DistillationTrainer, result: TrainResult | None) -> None:
        """Flush and close."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and isolated RNGs (training stays bit-identical); train mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), isolated_rng():
            yield
    finally:
        model.train(was_training)


RowsFn = Callable[[nn.Module, int], Any]
VisualWriter = Callable[[Path, int, Any], Any]


def _default_visual_writer(out_dir: Path, step: int, rows: Any) -> Any:
    from distill_mixins.eval.visual import write_training_visual  # the KD issue's grid writer

    return write_training_visual(out_dir, step, rows)


class VisualCallback(Callback):
    """Every ``every`` iterations (default ``TrainerConfig.visual_every``): ``rows = rows_fn(model, iteration)``
    in sampling mode, then ``writer(out_dir, iteration, rows)`` (default: ``eval.visual.write_training_visual``).
    Under several processes every rank computes the rows and rank 0 writes them."""

    def __init__(
        self, rows_fn: RowsFn, *, every: int | None = None, writer: VisualWriter | None = None,
        out_dir: str | Path | None = None,
    ) -> None:
        self.rows_fn, self.every, self.out_dir = rows_fn, every, out_dir
        self.writer = writer or _default_visual_writer

    def on_step_end(self, trainer: DistillationTrainer, step: StepResult) -> None:
        """Write the grid when due."""
        completed = step.iteration + 1
        if not _due(self.every if self.every is not None else trainer.config.visual_every, completed):
            return
        with sampling_mode(trainer.model):  # every rank samples (sharded networks gather together); rank 0 writes
            rows = self.rows_fn(trainer.model, completed)
        if trainer.is_main:
            out_dir = Path(self.out_dir) if self.out_dir is not None else trainer.run_dir / "visuals"
            out_dir.mkdir(parents=True, exist_ok=True)
            self.writer(out_dir, completed, rows)


def distillation_rows(
    batch: dict[str, Any], *, guidance: float = 1.0, condition_key: str | None = None, use_ema: bool = False,
    seed: int = 0,
) -> RowsFn:
    """A ``rows_fn`` for the training visual (KD issue): rows ``student 1-step``, ``teacher 1-step`` (the gap),
    ``condition`` (``batch[condition_key]``, a (B, C, T, H, W) control video, or the ground-truth frames of a
    Video2World condition) and ``ground truth`` (``batch["x0"]``), all from the batch's KD noise ``kd/noise``
    (B, C, T, H, W) (drawn from ``seed`` when absent; a host's own ``noise`` key is not read). The teacher's CFG
    scale ``guidance`` is in the standard form."""

    def rows(model: nn.Module, iteration: int) -> dict[str, Tensor | None]:
        data = model.prepare_data(batch)
        noise = kd_field(batch, KD_NOISE)
        if noise is None:
            noise = torch.randn(data.x0.shape, generator=torch.Generator().manual_seed(seed)).to(data.x0)
        student = model.generate(data.condition, noise, schedule="one_step", use_ema=use_ema)
        teacher = model.generate_teacher(data.condition, noise, uncondition=data.uncondition, guidance=guidance,
                                         steps=1, sampler="euler")
        condition = batch.get(condition_key) if condition_key else getattr(data.condition, "gt_frames", None)
        return {"student 1-step": student, "teacher 1-step": teacher, "condition": condition,
                "ground truth": data.x0}

    return rows


ValidateFn = Callable[[nn.Module, int], dict[str, float]]


class ValidationCallback(Callback):
    """Every ``every`` iterations (default ``TrainerConfig.validate_every``): ``validate_fn(model, iteration)``
    in sampling mode; its figures are emitted as ``val/<name>`` metrics."""

    def __init__(self, validate_fn: ValidateFn, *, every: int | None = None) -> None:
        self.validate_fn, self.every = validate_fn, every

    def on_step_end(self, trainer: DistillationTrainer, step: StepResult) -> None:
        """Validate when due."""
        completed = step.iteration + 1
        if not _due(self.every if self.every is not None else trainer.config.validate_every, completed):
            return
        with sampling_mode(trainer.model):
            figures = self.validate_fn(trainer.model, completed)
        trainer.emit_metrics(step.iteration, {f"val/{k}": float(v) for k, v in figures.items()})


def student_sample_validation(batch: dict[str, Tensor], *, use_ema: bool = False, seed: int = 0) -> ValidateFn:
    """A ``validate_fn``: sample the student from the batch's ``kd/noise`` (B, C, T, H, W) for its condition and
    report ``sample_mse`` against ``kd/teacher_x0`` (KD batches) and the samples' mean and std."""

    def validate(model: nn.Module, iteration: int) -> dict[str, float]:
        noise, teacher = kd_field(batch, KD_NOISE), kd_field(batch, KD_TEACHER_X0)
        if noise is None:
            raise KeyError(f"student_sample_validation needs a KD batch with '{KD_NOISE}' (it has {sorted(batch)}).")
        _, condition, _ = model.get_data_and_condition(batch)  # type: ignore[operator]
        generator = torch.Generator(device=noise.device).manual_seed(seed)
        x0 = model.generate(condition, noise, use_ema=use_ema, generator=generator)  # type: ignore[operator]
        figures = {"sample_mean": float(x0.float().mean()), "sample_std": float(x0.float().std())}
        if teacher is not None:
            figures["sample_mse"] = float((x0.float() - teacher.float()).pow(2).mean())
        return figures

    return validate
