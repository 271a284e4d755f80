"""Data parallelism applied from outside: DDP, FSDP2 or HSDP per network, activation checkpointing, memory figures.

``parallelize(model, ParallelConfig(...))`` after constructing a composed model, under ``torchrun`` (or any
initialised process group); ``meta_init`` + ``materialize`` build a large model on the meta device and fill it from
the teacher's weights shard by shard. See docs/distributed.md.
"""

from distill_mixins.parallel.activation import (
    apply_activation_checkpointing,
    check_activation_checkpointing,
    network_blocks,
    saved_activation_bytes,
)
from distill_mixins.parallel.config import PARALLEL_MODES, ParallelConfig
from distill_mixins.parallel.meta import MaterializeReport, materialize, meta_init
from distill_mixins.parallel.parallelize import NETWORKS, ParallelPlan, build_mesh, parallelize

__all__ = [
    "MaterializeReport",
    "NETWORKS",
    "PARALLEL_MODES",
    "ParallelConfig",
    "ParallelPlan",
    "apply_activation_checkpointing",
    "build_mesh",
    "check_activation_checkpointing",
    "materialize",
    "meta_init",
    "network_blocks",
    "parallelize",
    "saved_activation_bytes",
]
