"""The causal pipeline as commands: ODE pairs -> CausalKD -> bridge -> Self-Forcing (MATH.md section 7).

``distill-mixins pipeline self-forcing --stage {ode-pairs,causal-kd,bridge,self-forcing,all} --config run.json``.
A pipeline config is a JSON object::

    {"run_dir": "runs/self-forcing", "seed": 0,
     "ode_pairs": {"data": "pkg.mod:batches", "num_samples": 512, "steps": 36, "guidance": 5.0},
     "causal_kd": {"model": "pkg.mod:build_model", "method_config": {...}, "trainer": {...}},
     "self_forcing": {"model": "pkg.mod:build_model", "data": "pkg.mod:conditions", "method_config": {...},
                      "trainer": {...}}}

``causal_kd`` and ``self_forcing`` are stages of the stage runner (:mod:`distill_mixins.trainer.stages`, their
``method`` fixed): the model factory is called ``factory(mixin, distill_config, **model_args)`` and its teacher is
the bidirectional teacher; CausalKD's data default to the ODE pairs (``ode_pair_data``). ``ode_pairs`` holds the
:class:`~distill_mixins.data.KDDataConfig` fields (``path_times``: the CausalKD student's times) plus ``data``
(``"module:factory"``, called ``factory(**data_args)``, an iterable of host batches). Every stage is resumable and
skipped when done; the resolved config is written to ``<run_dir>/pipeline_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_mixins.errors import ConfigError
from distill_mixins.run_config import RunConfig, build_dataclass, read_json, resolve_object

PIPELINE_STAGES = ("ode-pairs", "causal-kd", "bridge", "self-forcing")
ODE_PAIRS_DIR = "ode_pairs"


@dataclass
class ODEPairsStage:
    """Stage 1: the teacher's ODE pairs. ``data``: ``"module:factory"`` of host batches (``factory(**data_args)``);
    ``kd_data``: :class:`~distill_mixins.data.KDDataConfig` fields (its ``path_times`` come from the student)."""

    data: str
    data_args: dict[str, Any] = field(default_factory=dict)
    kd_data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfForcingPipeline:
    """A run directory, a seed, and the pipeline's stages (see the module docstring)."""

    run_dir: str
    ode_pairs: ODEPairsStage
    causal_kd: dict[str, Any]
    self_forcing: dict[str, Any]
    seed: int = 0

    def run_config(self) -> RunConfig:
        """The two training stages as a run config of the stage runner."""
        causal_kd = dict(self.causal_kd)
        if "data" not in causal_kd:  # the ODE pairs of stage 1
            causal_kd["data"] = "distill_mixins.trainer.pipeline:ode_pair_data"
            causal_kd["data_args"] = {"root": str(Path(self.run_dir) / ODE_PAIRS_DIR), **causal_kd.get("data_args", {})}
        stages = [{**causal_kd, "name": "causal_kd", "method": "causal_kd"},
                  {**self.self_forcing, "name": "self_forcing", "method": "self_forcing",
                   "init_from_previous": self.self_forcing.get("init_from_previous", "student")}]
        return build_dataclass(RunConfig, {"run_dir": self.run_dir, "seed": self.seed, "stages": stages}, "")


def load_pipeline(path: str | Path) -> SelfForcingPipeline:
    """Read and check a pipeline config (a :class:`ConfigError` names the file and the field)."""
    data = read_json(path, "pipeline config", "--config")
    for key in ("causal_kd", "self_forcing"):
        if isinstance(data.get(key), dict) and {"name", "method"} & set(data[key]):
            raise ConfigError(f"{path}: {key} sets 'name' or 'method', which the pipeline fixes; remove them.")
    try:
        pipeline = build_dataclass(SelfForcingPipeline, data, "")
        pipeline.run_config()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    return pipeline


def ode_pair_data(model: Any, *, seed: int, root: str, batch_size: int = 16) -> Any:
    """Trainer data of the ODE pairs in ``root`` (shuffled, ``batch_size`` pairs a step)."""
    from distill_mixins.trainer.data import MapStyleData

    from distill_mixins.data import KDShardDataset

    return MapStyleData(KDShardDataset(root), batch_size, seed=seed)


def run_ode_pairs(pipeline: SelfForcingPipeline) -> Path:
    """Stage 1 (resumable: finished shards are skipped): the CausalKD stage's model (its teacher) solves the ODE."""
    from distill_mixins.data import KDDataConfig, generate_ode_pairs
    from distill_mixins.run_config import method_mixin

    run = pipeline.run_config()
    stage = run.stages[0]
    mixin = method_mixin("causal_kd")
    model = resolve_object(stage.model, "causal_kd.model")(
        mixin, build_dataclass(mixin.config_class, stage.method_config, "causal_kd.method_config"), **stage.model_args)
    config = build_dataclass(KDDataConfig, {"seed": pipeline.seed, **pipeline.ode_pairs.kd_data}, "ode_pairs.kd_data")
    batches = resolve_object(pipeline.ode_pairs.data, "ode_pairs.data")(**pipeline.ode_pairs.data_args)
    return generate_ode_pairs(model, batches, Path(pipeline.run_dir) / ODE_PAIRS_DIR, config, prompt_key=None)


def run_bridge(pipeline: SelfForcingPipeline) -> Path:
    """The bridge: the CausalKD stage's student, extracted to ``<run_dir>/causal_kd/student.safetensors``."""
    from distill_mixins.checkpointer import extract_student_weights
    from distill_mixins.trainer.stages import STUDENT_FILE, _finished_checkpoint, stage_trainer_config

    run = pipeline.run_config()
    checkpoint = _finished_checkpoint(stage_trainer_config(run, 0))
    if checkpoint is None:
        raise ConfigError(
            f"the CausalKD stage in {pipeline.run_dir}/causal_kd has not finished: run --stage causal-kd first."
        )
    return extract_student_weights(checkpoint, Path(run.run_dir) / "causal_kd" / STUDENT_FILE)


def run_pipeline(pipeline: SelfForcingPipeline, stage: str = "all") -> list[str]:
    """Run ``stage`` (one of :data:`PIPELINE_STAGES`, or ``all``); returns what ran, in order."""
    from distill_mixins.checkpointer.files import write_text_atomic
    from distill_mixins.trainer.stages import StageResult, run_stage
    from loguru import logger

    if stage != "all" and stage not in PIPELINE_STAGES:
        raise ConfigError(f"--stage {stage!r}: one of {', '.join(PIPELINE_STAGES)} or all.")
    out = Path(pipeline.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "pipeline_config.json", json.dumps(dataclasses.asdict(pipeline), indent=2))
    run, resolved = pipeline.run_config(), pipeline.run_config().to_dict()
    done = []
    for name in PIPELINE_STAGES if stage == "all" else (stage,):
        if name == "ode-pairs":
            run_ode_pairs(pipeline)
        elif name == "causal-kd":
            result = run_stage(run, 0, None, resolved)
            if not result.completed:
                return done
        elif name == "bridge":
            run_bridge(pipeline)
        else:
            student = run_bridge(pipeline)
            previous = StageResult("causal_kd", out / "causal_kd", None, student, None)
            if not run_stage(run, 1, previous, resolved).completed:
                return done
        logger.info("pipeline stage {} done", name)
        done.append(name)
    return done


def register(commands: Any) -> None:
    """Add ``distill-mixins pipeline self-forcing``."""
    parser = commands.add_parser("pipeline", help="run a multi-stage pipeline (self-forcing: ODE pairs -> CausalKD "
                                 "-> bridge -> Self-Forcing)")
    parser.add_argument("name", choices=("self-forcing",), help="the pipeline")
    parser.add_argument("--config", required=True, help="pipeline config (JSON; see docs/causal.md)")
    parser.add_argument("--stage", default="all", choices=(*PIPELINE_STAGES, "all"), help="default: all, in order")
    parser.set_defaults(func=_pipeline)


def _pipeline(args: Any) -> int:
    done = run_pipeline(load_pipeline(args.config), args.stage)
    print(f"pipeline {args.name}: {', '.join(done) or 'nothing'} done")
    expected = PIPELINE_STAGES if args.stage == "all" else (args.stage,)
    return 0 if tuple(done) == tuple(expected) else 1


__all__ = ["PIPELINE_STAGES", "ODEPairsStage", "SelfForcingPipeline", "load_pipeline", "ode_pair_data",
           "run_bridge", "run_ode_pairs", "run_pipeline"]
