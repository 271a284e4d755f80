"""distill_mixins.trainer: the dedicated distillation trainer (installed from top-level trainer/).

``DistillationTrainer(model, data, TrainerConfig(...)).fit()`` drives ``model.training_step`` with gradient
accumulation, autocast, checkpoints (``distill_mixins.checkpointer``), auto-resume, signal handling and
callbacks. A loop you already have works too: see docs/existing_loop.md.
"""

from distill_mixins.trainer.callbacks import (
    Callback,
    JsonlMetrics,
    LoguruLogger,
    ProgressBar,
    StepResult,
    TensorBoardLogger,
    TrainResult,
    ValidationCallback,
    VisualCallback,
    distillation_rows,
    student_sample_validation,
)
from distill_mixins.trainer.config import TrainerConfig
from distill_mixins.trainer.data import DataSource, FunctionData, IterableData, MapStyleData, as_data_source
from distill_mixins.trainer.seeding import isolated_rng, seed_everything
from distill_mixins.trainer.trainer import DistillationTrainer, NonFiniteLossError, standard_callbacks

__all__ = [
    "Callback",
    "DataSource",
    "DistillationTrainer",
    "FunctionData",
    "IterableData",
    "JsonlMetrics",
    "LoguruLogger",
    "MapStyleData",
    "NonFiniteLossError",
    "ProgressBar",
    "StepResult",
    "TensorBoardLogger",
    "TrainResult",
    "TrainerConfig",
    "ValidationCallback",
    "VisualCallback",
    "distillation_rows",
    "as_data_source",
    "isolated_rng",
    "seed_everything",
    "standard_callbacks",
    "student_sample_validation",
]
