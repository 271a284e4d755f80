"""Run the stages of a run config in order; each stage after the first starts from the previous stage's student.

Stage ``name`` trains in ``<run_dir>/<name>`` (its checkpoints, metrics, config) and ends by extracting
``student.safetensors`` (and ``student_ema.safetensors`` with EMA). Running the same config again resumes:
completed stages are skipped, an interrupted one continues from its newest usable checkpoint.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_mixins.checkpointer import DistillCheckpointer, extract_student_weights, load_student_weights
from distill_mixins.checkpointer.checkpointer import read_manifest
from distill_mixins.checkpointer.files import write_text_atomic
from distill_mixins.trainer.callbacks import TrainResult
from distill_mixins.trainer.config import TrainerConfig
from distill_mixins.trainer.distributed import Ranks, barrier, init_distributed
from distill_mixins.trainer.seeding import seed_everything
from distill_mixins.trainer.signals import raise_on_signal
from distill_mixins.trainer.trainer import DistillationTrainer
from loguru import logger

from distill_mixins.errors import ConfigError
from distill_mixins.parallel import ParallelConfig, parallelize
from distill_mixins.run_config import (
    RunConfig,
    StageConfig,
    build_dataclass,
    method_mixin,
    resolve_object,
    stage_where,
)

ONE_PROCESS = Ranks()
STUDENT_FILE = "student.safetensors"
EMA_FILE = "student_ema.safetensors"


@dataclass
class StageResult:
    """A stage's directory, its training result (None when it was already complete) and its student files."""

    name: str
    run_dir: Path
    result: TrainResult | None
    student: Path | None
    student_ema: Path | None

    @property
    def completed(self) -> bool:
        """True when the stage ran (or had run) all its iterations."""
        return self.result is None or self.result.completed


def stage_trainer_config(run: RunConfig, index: int) -> TrainerConfig:
    """The stage's TrainerConfig: its ``trainer`` fields, ``seed`` defaulting to the run's, ``run_dir`` the stage's."""
    stage = run.stages[index]
    values = {"seed": run.seed, **stage.trainer, "run_dir": str(Path(run.run_dir) / stage.name)}
    return build_dataclass(TrainerConfig, values, f"{stage_where(index, stage)}.trainer")


def _check_call(spec: str, where: str, args: tuple[Any, ...], kwargs: dict[str, Any], fix: str) -> None:
    """Resolve the factory ``spec`` and check that it accepts ``args`` and ``kwargs`` (else: ``fix``)."""
    factory = resolve_object(spec, where)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to check (a builtin): the call itself will tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"{where} {spec!r} cannot be called so ({error}): {fix}.") from error


def _check_factories(stage: StageConfig, where: str) -> None:
    """Resolve the stage's model, data and callback factories and check that they accept the stage's arguments."""
    if "seed" in stage.data_args:
        raise ConfigError(f"{where}.data_args.seed: the data factory gets the trainer seed; set trainer.seed instead.")
    call = "it is called as factory({}); fix {} or the factory's signature"
    _check_call(stage.model, f"{where}.model", (None, None), stage.model_args,
                call.format("method_mixin, distill_config, **model_args", f"{where}.model_args"))
    _check_call(stage.data, f"{where}.data", (None,), {"seed": 0, **stage.data_args},
                call.format("model, seed=<trainer seed>, **data_args", f"{where}.data_args"))
    for i, spec in enumerate(stage.callbacks):
        _check_call(spec, f"{where}.callbacks[{i}]", (None, None), {}, "a callback is made as factory(model, data)")


def _check_stage(run: RunConfig, index: int, previous: Any) -> Any:
    """Build stage ``index``'s trainer and method configs and check its factories; returns the method config
    (``previous``: the previous stage's, for ``init_from_previous='ema'``)."""
    stage = run.stages[index]
    where = stage_where(index, stage)
    stage_trainer_config(run, index)
    build_dataclass(ParallelConfig, stage.parallel, f"{where}.parallel")
    distill = build_dataclass(method_mixin(stage.method).config_class, stage.method_config, f"{where}.method_config")
    if previous is not None and stage.init_from_previous == "ema" and getattr(previous, "ema", None) is None:
        raise ConfigError(
            f"{where} init_from_previous='ema' but stage {run.stages[index - 1].name!r} has no EMA: set its "
            "method_config.ema, or use init_from_previous='student'."
        )
    _check_factories(stage, where)
    return distill


def check_run_config(run: RunConfig) -> None:
    """Check every stage before any training (trainer and method configs, factories and their arguments), so
    a config error in a later stage fails at once: a :class:`~distill_mixins.errors.ConfigError` naming it."""
    previous = None
    for index in range(len(run.stages)):
        previous = _check_stage(run, index, previous)


def _finished_checkpoint(config: TrainerConfig) -> Path | None:
    path = DistillCheckpointer(Path(config.run_dir) / "checkpoints").find_resumable()
    if path is not None and int(read_manifest(path)["iteration"]) >= config.iterations:
        return path
    return None


def _extract(checkpoint: Path, stage_dir: Path, ranks: Ranks) -> tuple[Path, Path | None]:
    """The stage's student (and EMA) files, written by rank 0 while the others wait."""
    student, ema = stage_dir / STUDENT_FILE, None
    if "net_ema" in read_manifest(checkpoint)["networks"]:
        ema = stage_dir / EMA_FILE
    if ranks.is_main:
        extract_student_weights(checkpoint, student)
        if ema is not None:
            extract_student_weights(checkpoint, ema, ema=True)
    barrier(ranks)
    return student, ema


def _initial_weights(stage: StageConfig, previous: StageResult | None) -> Path | None:
    if previous is None or stage.init_from_previous == "none":
        return None
    if stage.init_from_previous == "ema":
        if previous.student_ema is None:
            raise ConfigError(
                f"stage {stage.name!r} init_from_previous='ema' but stage {previous.name!r} has no EMA: "
                "set its method_config.ema, or use init_from_previous='student'."
            )
        return previous.student_ema
    return previous.student


def run_stage(
    run: RunConfig, index: int, previous: StageResult | None, resolved: dict[str, Any], ranks: Ranks = ONE_PROCESS
) -> StageResult:
    """Build the stage's model (seeded), load the previous student, parallelize it over the processes (several),
    build data and callbacks, train, extract."""
    stage = run.stages[index]
    config = stage_trainer_config(run, index)
    stage_dir = Path(config.run_dir)
    finished = _finished_checkpoint(config)
    if finished is not None:
        logger.info("stage {} is complete ({}); skipping it", stage.name, finished)
        return StageResult(stage.name, stage_dir, None, *_extract(finished, stage_dir, ranks))
    mixin = method_mixin(stage.method)
    distill = build_dataclass(mixin.config_class, stage.method_config, f"stages.{index}.method_config")
    seed_everything(config.seed)
    model = resolve_object(stage.model, f"stages.{index}.model")(mixin, distill, **stage.model_args)
    init = _initial_weights(stage, previous)
    if init is not None:
        load_student_weights(model, init)
        logger.info("stage {} starts from {}", stage.name, init)
    if ranks.distributed:
        parallelize(model, build_dataclass(ParallelConfig, stage.parallel, f"stages.{index}.parallel"))
    data = resolve_object(stage.data, f"stages.{index}.data")(model, seed=config.seed, **stage.data_args)
    callbacks = [resolve_object(spec, f"stages.{index}.callbacks")(model, data) for spec in stage.callbacks]
    extra = {"run": resolved, "stage": stage.name, "initial_student": str(init) if init else None}
    result = DistillationTrainer(model, data, config, callbacks, extra_config=extra).fit()
    if not result.completed:
        return StageResult(stage.name, stage_dir, result, None, None)
    return StageResult(stage.name, stage_dir, result, *_extract(result.checkpoint, stage_dir, ranks))


def run_stages(run: RunConfig) -> list[StageResult]:
    """Run every stage in order, writing the resolved config to ``<run_dir>/run_config.json`` first; stops after
    a stage that did not complete (a signal). Every stage is checked first (:func:`check_run_config`). Under
    torchrun (``WORLD_SIZE`` > 1) the process group is initialised here and each stage's model parallelized. A signal
    outside a training loop raises :class:`~distill_mixins.trainer.signals.Signalled` (no later stage starts)."""
    check_run_config(run)
    ranks = init_distributed(stage_trainer_config(run, 0).device)  # torchrun: WORLD_SIZE > 1
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run.to_dict()
    if ranks.is_main:
        write_text_atomic(run_dir / "run_config.json", json.dumps(resolved, indent=2))
    results: list[StageResult] = []
    with raise_on_signal():  # outside a training loop (loading, extracting) a signal raises Signalled
        for index in range(len(run.stages)):
            results.append(run_stage(run, index, results[-1] if results else None, resolved, ranks))
            if not results[-1].completed:
                break
    return results
