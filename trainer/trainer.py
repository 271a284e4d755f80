"""DistillationTrainer: drives ``model.training_step(batch, iteration)`` of a composed distillation model.

Per iteration ``it``: the phase is ``model.is_student_phase(it)`` for all ``grad_accum`` micro-batches;
each loss is divided by ``grad_accum`` and back-propagated (scaled under fp16); then only that phase's
networks are clipped (non-finite gradients zeroed and counted), stepped with their schedulers, and the
EMA updated (``model.optimizer_step(it)``). A non-finite loss skips the iteration; ``max_nonfinite_in_row``
of them stop training with :class:`NonFiniteLossError`, leaving the last good checkpoint as it was.
The trainer lives outside the model: the method code does no I/O.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from distill_mixins.checkpointer import DistillCheckpointer, LoadedCheckpoint
from distill_mixins.checkpointer.files import write_text_atomic
from distill_mixins.trainer.callbacks import (
    Callback,
    JsonlMetrics,
    LoguruLogger,
    MetricWindow,
    ProgressBar,
    StepResult,
    TensorBoardLogger,
    TrainResult,
)
from distill_mixins.trainer.config import TrainerConfig
from distill_mixins.trainer.data import as_data_source, move_to
from distill_mixins.trainer.distributed import (
    any_rank,
    local_share,
    mean_over_ranks,
    model_ranks,
    rank_device,
)
from distill_mixins.trainer.seeding import seed_everything
from distill_mixins.trainer.signals import StopOnSignal
from loguru import logger
from torch import Tensor, nn

from distill_mixins.precision import uncached_autocast

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOSS = "\0loss"  # the step's loss among the scalars averaged over ranks (a key no output uses)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the message names the last good checkpoint."""


def standard_callbacks(config: TrainerConfig) -> list[Callback]:
    """Logging, metrics JSON lines, the progress bar (``progress``) and TensorBoard (``tensorboard``)."""
    callbacks: list[Callback] = [LoguruLogger(), JsonlMetrics()]
    if config.progress:
        callbacks.append(ProgressBar())
    if config.tensorboard:
        callbacks.append(TensorBoardLogger())
    return callbacks


def _by_name(named: dict[str, Any], chosen: Sequence[Any]) -> dict[str, Any]:
    """The entries of ``named`` whose objects are in ``chosen`` (by identity)."""
    ids = {id(obj) for obj in chosen}
    return {name: obj for name, obj in named.items() if id(obj) in ids}


def _scalar_outputs(outputs: dict[str, Any]) -> dict[str, float]:
    values = {}
    for key, value in outputs.items():
        if isinstance(value, Tensor) and value.numel() and (value.is_floating_point() or value.dtype == torch.bool):
            values[key] = float(value.detach().float().mean())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return values


class DistillationTrainer:
    """Train a composed distillation model on a data source with checkpoints, auto-resume and callbacks.

    ``data``: a :class:`~distill_mixins.trainer.data.DataSource`, a map-style dataset (with
    ``config.batch_size``) or a ``factory(start_step) -> iterable``; under several processes (the model
    parallelized first) it gives the *global* batch and each rank trains on its equal share. ``callbacks`` come
    after the default ones (``default_callbacks=False`` drops those; in several processes rank 0 alone has
    them). ``extra_config`` is merged into the resolved config written to ``run_dir/config.json`` and into every
    checkpoint.
    """

    def __init__(
        self, model: nn.Module, data: Any, config: TrainerConfig, callbacks: Sequence[Callback] = (), *,
        default_callbacks: bool = True, extra_config: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"DistillationTrainer needs a TrainerConfig, got {type(config).__name__}.")
        for member in ("training_step", "is_student_phase", "optimizers", "optimizer_step", "distill_config"):
            if not hasattr(model, member):
                raise TypeError(
                    f"{type(model).__name__} has no '{member}': compose a method mixin before your model class, "
                    "e.g. class MyKD(KDMixin, MyModel)."
                )
        self.model = model
        self.config = config
        self.device = rank_device(config.device)
        self.ranks = model_ranks(model, self.device)
        """This process's ranks: under torchrun each rank trains on its share of every global batch."""
        self.data = as_data_source(data, batch_size=config.batch_size, seed=config.seed, shuffle=config.shuffle)
        standard = standard_callbacks(config) if default_callbacks and self.ranks.is_main else []
        self.callbacks = standard + list(callbacks)
        self.extra_config = extra_config or {}
        self.run_dir = Path(config.run_dir)
        self.checkpointer = DistillCheckpointer(self.run_dir / "checkpoints", keep_last=config.keep_last)
        self.autocast = config.resolved_autocast()
        """The autocast that runs (``config.autocast`` with ``auto`` resolved): ``none``, ``bf16`` or ``fp16``."""
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast == "fp16" else None
        self.iteration = 0
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.elapsed = 0.0
        self.last_checkpoint: Path | None = None
        self._saved_iteration = -1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes the run's files (rank 0; always true in one process)."""
        return self.ranks.is_main

    # ------------------------------------------------------------------ config

    def resolved_config(self) -> dict[str, Any]:
        """The trainer and method configs (plus ``extra_config``) as written to the run directory; ``trainer``
        also records the autocast that ran (``autocast_resolved``: ``auto`` resolved on this machine)."""
        return {
            "trainer": {**self.config.to_dict(), "autocast_resolved": self.autocast},
            "distill": self.model.distill_config.to_dict(),
            "model_class": type(self.model).__qualname__,
            **self.extra_config,
        }

    def trainer_state(self) -> dict[str, Any]:
        """JSON-ready state saved in every checkpoint (``iteration`` = completed iterations)."""
        return {
            "iteration": self.iteration,
            "seed": self.config.seed,
            "grad_accum": self.config.grad_accum,
            "autocast": self.autocast,
            "micro_batches_consumed": self.iteration * self.config.grad_accum,
            "data": type(self.data).__name__,
            "nonfinite_loss_in_row": self.nonfinite_in_row,
            "nonfinite_loss_total": self.nonfinite_total,
            "nonfinite_grad_counts": dict(self.model.nonfinite_grad_counts),
            "elapsed_seconds": self.elapsed,
        }

    def _apply_trainer_state(self, loaded: LoadedCheckpoint) -> None:
        state = loaded.trainer_state
        for key in ("seed", "grad_accum"):
            if key in state and state[key] != getattr(self.config, key):
                logger.warning(
                    "resuming {} with {}={} but it was saved with {}: the data order differs from an uninterrupted "
                    "run (no bit-exact resume).", loaded.path, key, getattr(self.config, key), state[key],
                )
        if "autocast" in state and state["autocast"] != self.autocast:
            logger.warning(
                "resuming {} with autocast {} (TrainerConfig.autocast={!r}) but it ran with {}: the numerics differ "
                "from an uninterrupted run (no bit-exact resume); set TrainerConfig.autocast explicitly to keep it.",
                loaded.path, self.autocast, self.config.autocast, state["autocast"],
            )
        self.nonfinite_in_row = int(state.get("nonfinite_loss_in_row", 0))
        self.nonfinite_total = int(state.get("nonfinite_loss_total", 0))
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.model.nonfinite_grad_counts.update(state.get("nonfinite_grad_counts", {}))

    def _restore_or_seed(self) -> int:
        mode = self.config.resume
        if mode == "never":
            if self.checkpointer.list_checkpoints():
                raise ValueError(
                    f"TrainerConfig.resume='never' but {self.checkpointer.directory} holds checkpoints: use a new "
                    "run_dir, or resume='auto' to continue that run."
                )
            loaded = None
        elif mode == "auto":
            loaded = self.checkpointer.resume(self.model, grad_scaler=self.scaler)
        else:
            loaded = self.checkpointer.load(self.model, Path(mode), grad_scaler=self.scaler)
        if loaded is None:
            seed_everything(self.config.seed)
            return 0
        self._apply_trainer_state(loaded)
        self.last_checkpoint = loaded.path
        self._saved_iteration = loaded.iteration if loaded.path.parent == self.checkpointer.directory else -1
        return loaded.iteration

    # --------------------------------------------------------------------- fit

    def fit(self) -> TrainResult:
        """Train from the resumed (or first) iteration to ``config.iterations``; see the module docstring."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.to(self.device)
        self.model.train()
        start = self.iteration = self._restore_or_seed()
        if self.is_main:
            write_text_atomic(self.run_dir / "config.json", json.dumps(self.resolved_config(), indent=2))
        result = None
        try:
            for callback in self.callbacks:
                callback.on_train_start(self)
            result = self._loop(start)
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self, result)
        return result

    def _loop(self, start: int) -> TrainResult:
        reason = "completed"
        begin = time.perf_counter()
        skipped = 0
        window = MetricWindow()
        with StopOnSignal() as stop:
            while self.iteration < self.config.iterations:
                tic = time.perf_counter()
                step = self.train_iteration(self.iteration)
                skipped += step.skipped
                self.iteration += 1
                self.elapsed += time.perf_counter() - tic
                for callback in self.callbacks:
                    callback.on_step_end(self, step)
                window.add(step)
                if self.config.log_every and self.iteration % self.config.log_every == 0:
                    self.emit_metrics(step.iteration, window.flush())
                if any_rank(stop.received is not None, self.ranks):  # every rank stops after the same iteration
                    stop.received = stop.received or signal.SIGTERM  # a signal that reached another rank
                    reason = f"signal {stop.received.name}"
                    logger.warning("received {}: saving a checkpoint after iteration {}, then stopping.",
                                   stop.received.name, self.iteration)
                    break
                if self.config.save_every and self.iteration % self.config.save_every == 0:
                    self._periodic_save()
            if self._saved_iteration != self.iteration:
                self.save()
        if reason != "completed":
            logger.warning("stopped by {} after iteration {}; run again to resume from {}", reason, self.iteration,
                           self.last_checkpoint)
        return TrainResult(
            iteration=self.iteration, start_iteration=start, stop_reason=reason, checkpoint=self.last_checkpoint,
            skipped_iterations=skipped, seconds=time.perf_counter() - begin,
            signal_number=int(stop.received) if stop.received is not None else None,
        )

    def _periodic_save(self) -> None:
        """Save, unless inside a run of non-finite losses: then the last good checkpoint stays the newest."""
        if self.nonfinite_in_row:
            logger.warning("iteration {}: checkpoint postponed during {} non-finite losses in a row",
                           self.iteration, self.nonfinite_in_row)
            return
        self.save()

    def emit_metrics(self, iteration: int, metrics: dict[str, Any]) -> None:
        """Send a metrics record of ``iteration`` to every callback's ``on_metrics``."""
        for callback in self.callbacks:
            callback.on_metrics(self, iteration, metrics)

    def save(self) -> Path:
        """Checkpoint the current state (after ``self.iteration`` completed iterations)."""
        path = self.checkpointer.save(
            self.model, self.iteration, trainer_state=self.trainer_state(), config=self.resolved_config(),
            grad_scaler=self.scaler,
        )
        self.last_checkpoint, self._saved_iteration = path, self.iteration
        for callback in self.callbacks:
            callback.on_save(self, path)
        return path

    # --------------------------------------------------------------- iteration

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast == "none":
            return contextlib.nullcontext()
        return uncached_autocast(self.device.type, AUTOCAST_DTYPES[self.autocast])  # FSDP2-safe (no cast cache)

    def train_iteration(self, iteration: int) -> StepResult:
        """Run the ``grad_accum`` micro-batches of ``iteration`` in its phase, then step that phase."""
        tic = time.perf_counter()
        model, accum = self.model, self.config.grad_accum
        phase = "student" if model.is_student_phase(iteration) else "critic"
        total, sums = 0.0, {}
        for micro in range(accum):
            batch = move_to(local_share(self.data.batch(iteration * accum + micro), self.ranks), self.device)
            with self._autocast():
                outputs, loss = model.training_step(batch, iteration)
            scalars = mean_over_ranks({**_scalar_outputs(outputs), LOSS: float(loss.detach().float().sum())},
                                      self.ranks)  # a non-finite loss on one rank is seen by all
            value = scalars.pop(LOSS)
            if not math.isfinite(value):
                return self._skip(iteration, phase, value, tic)
            total += value / accum
            for key, v in scalars.items():
                sums[key] = sums.get(key, 0.0) + v / accum
            if accum > 1:
                loss = loss / accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.nonfinite_in_row = 0
        before = dict(model.nonfinite_grad_counts)
        norms = self._optimizer_step(iteration)
        for name, count in model.nonfinite_grad_counts.items():
            if count > before.get(name, 0):
                logger.warning("iteration {}: non-finite gradients of {} zeroed (not stepped; {} so far)",
                               iteration, name, count)
        lrs = {name: float(s.get_last_lr()[0]) for name, s in
               _by_name(model.lr_schedulers(), model.get_lr_schedulers(iteration)).items()}
        return StepResult(iteration, phase, total, sums, norms, lrs, False, time.perf_counter() - tic)

    def _skip(self, iteration: int, phase: str, value: float, tic: float) -> StepResult:
        for optimizer in self.model.get_optimizers(iteration):
            optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        limit = self.config.max_nonfinite_in_row
        logger.warning("iteration {} ({} phase): non-finite loss {}; step skipped ({} in a row, limit {})",
                       iteration, phase, value, self.nonfinite_in_row, limit)
        if self.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_row} non-finite losses in a row (iterations {iteration - limit + 1}-{iteration}): "
                f"training stopped. The last good checkpoint is {self.last_checkpoint or 'none (nothing saved yet)'}. "
                "Lower the learning rate, enable gradient clipping, check the data, or raise "
                "TrainerConfig.max_nonfinite_in_row."
            )
        return StepResult(iteration, phase, value, {}, {}, {}, True, time.perf_counter() - tic)

    def _optimizer_step(self, iteration: int) -> dict[str, float]:
        if self.scaler is None:
            return self.model.optimizer_step(iteration)
        return self._scaled_optimizer_step(iteration)

    def _scaled_optimizer_step(self, iteration: int) -> dict[str, float]:
        """fp16: unscale, clip (non-finite zeroed), ``scaler.step`` the finite networks, update the scaler and EMA."""
        model, scaler = self.model, self.scaler
        assert scaler is not None
        optimizers = _by_name(model.optimizers(), model.get_optimizers(iteration))
        schedulers = model.lr_schedulers()
        with_grads = {name: opt for name, opt in optimizers.items()
                      if any(p.grad is not None for g in opt.param_groups for p in g["params"])}
        for opt in with_grads.values():
            scaler.unscale_(opt)
        norms = model.clip_gradients(iteration)
        stepped = [name for name, norm in norms.items() if math.isfinite(norm) and name in with_grads]
        for name, opt in optimizers.items():
            if name in stepped:
                scaler.step(opt)
                schedulers[name].step()
            opt.zero_grad(set_to_none=True)
        if with_grads:
            scaler.update()
        if "net" in stepped:
            model.update_ema(iteration)
        return norms
