"""Data parallelism applied from outside: DDP, FSDP2 or HSDP per network, activation checkpointing, memory figures.

``parallelize(model, ParallelConfig(...))`` after constructing a composed model, under ``torchrun`` (or any
initialised process group); ``meta_init`` + ``materialize`` build a large model on the meta device and fill it from
the teacher's weights shard by shard; ``attention.attention`` is the one attention dispatch (flash-attn or SDPA) and
``ulysses_attention`` its sequence-parallel form, ``parallel_groups`` the data- and context-parallel groups (from
megatron-core when it is initialised, else a device mesh): context parallel groundwork. See docs/distributed.md.
"""

from distill_mixins.parallel.activation import (
    apply_activation_checkpointing,
    check_activation_checkpointing,
    network_blocks,
    saved_activation_bytes,
)
from distill_mixins.parallel.attention import (  # its function `attention` stays there: the module has that name
    ATTENTION_BACKENDS,
    check_attention_backend,
    resolve_attention_backend,
    set_attention_backend,
)
from distill_mixins.parallel.config import PARALLEL_MODES, ParallelConfig
from distill_mixins.parallel.groups import ParallelGroups, cp_mesh_shape, parallel_groups
from distill_mixins.parallel.meta import MaterializeReport, materialize, meta_init
from distill_mixins.parallel.parallelize import NETWORKS, ParallelPlan, build_mesh, parallelize
from distill_mixins.parallel.ulysses import gather_sequence, head_to_seq, seq_to_head, split_sequence, ulysses_attention

__all__ = [
    "ATTENTION_BACKENDS",
    "MaterializeReport",
    "NETWORKS",
    "PARALLEL_MODES",
    "ParallelConfig",
    "ParallelGroups",
    "ParallelPlan",
    "apply_activation_checkpointing",
    "build_mesh",
    "check_activation_checkpointing",
    "check_attention_backend",
    "cp_mesh_shape",
    "gather_sequence",
    "head_to_seq",
    "materialize",
    "meta_init",
    "network_blocks",
    "parallel_groups",
    "parallelize",
    "resolve_attention_backend",
    "seq_to_head",
    "set_attention_backend",
    "split_sequence",
    "saved_activation_bytes",
    "ulysses_attention",
]
