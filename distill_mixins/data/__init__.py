"""Teacher-generated KD data: sharded safetensors + manifest, datasets over them, and ODE pairs."""

from distill_mixins.data.dataset import KDShardDataset, ODEPairDataset, write_ode_pairs
from distill_mixins.data.kd_data import (
    KDDataConfig,
    KDDataError,
    KDDataResult,
    TeacherGrid,
    generate_kd_data,
    load_manifest,
    prompt_batches,
    read_prompts,
    sample_noise,
    split_grid,
    teacher_grid,
    teacher_hash,
)

__all__ = [
    "KDDataConfig",
    "KDDataError",
    "KDDataResult",
    "KDShardDataset",
    "ODEPairDataset",
    "TeacherGrid",
    "generate_kd_data",
    "load_manifest",
    "prompt_batches",
    "read_prompts",
    "sample_noise",
    "split_grid",
    "teacher_grid",
    "teacher_hash",
    "write_ode_pairs",
]
