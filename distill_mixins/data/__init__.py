"""Teacher-generated KD data: sharded safetensors + manifest, datasets over them, and ODE pairs.

The generator's keys live under the prefix ``kd/`` (``KD_NOISE`` = ``"kd/noise"``, ...; defined once in
:mod:`distill_mixins.methods.kd`), next to the host's batch keys, which are stored as they are.
"""

from distill_mixins.data.dataset import KDShardDataset, ODEPairDataset, generate_ode_pairs, write_ode_pairs
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
from distill_mixins.methods.kd import (
    KD_KEYS,
    KD_NOISE,
    KD_PATH,
    KD_PATH_T,
    KD_PREFIX,
    KD_SAMPLE_INDEX,
    KD_TEACHER_X0,
    KD_VIDEO,
)

__all__ = [
    "KD_KEYS",
    "KD_NOISE",
    "KD_PATH",
    "KD_PATH_T",
    "KD_PREFIX",
    "KD_SAMPLE_INDEX",
    "KD_TEACHER_X0",
    "KD_VIDEO",
    "KDDataConfig",
    "KDDataError",
    "KDDataResult",
    "KDShardDataset",
    "ODEPairDataset",
    "TeacherGrid",
    "generate_kd_data",
    "generate_ode_pairs",
    "load_manifest",
    "prompt_batches",
    "read_prompts",
    "sample_noise",
    "split_grid",
    "teacher_grid",
    "teacher_hash",
    "write_ode_pairs",
]
