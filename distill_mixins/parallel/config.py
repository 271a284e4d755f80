"""ParallelConfig: how :func:`~distill_mixins.parallel.parallelize` spreads a composed model over the ranks."""

from __future__ import annotations

from dataclasses import dataclass

from distill_mixins.config import check_choice, config_to_dict
from distill_mixins.precision import check_precision

PARALLEL_MODES = ("ddp", "fsdp", "hsdp")
"""``ddp``: every rank holds every network, gradients all-reduced; ``fsdp``: FSDP2 shards every network over all
ranks; ``hsdp``: FSDP2 on a 2-D mesh, replicated across ``dp_replicate`` groups, sharded within each."""


@dataclass
class ParallelConfig:
    """Data parallelism of one training job (ARCHITECTURE.md, "Distributed").

    The world is ``dp_replicate x dp_shard x cp`` ranks, ``cp`` innermost (megatron-core's default order).
    ``dp_shard=-1`` takes the world size divided by ``dp_replicate x cp``. ``ddp`` needs ``dp_shard`` 1 or -1 and
    ``fsdp`` needs ``dp_replicate`` 1. ``cp`` > 1: context parallel, each clip's tokens split over ``cp`` ranks
    (docs/distributed.md, "Context parallel"); the networks are still sharded (``fsdp``/``hsdp``) over the
    ``dp_shard x cp`` ranks, as torchtitan and Megatron do. ``precision``: ``auto`` computes in bf16 (reducing
    gradients in float32) where the device has native bf16, float32 otherwise (:mod:`distill_mixins.precision`).
    """

    mode: str = "fsdp"
    dp_replicate: int = 1
    dp_shard: int = -1
    precision: str = "auto"
    reshard_after_forward: bool = True
    """FSDP: free each trainable network's gathered parameters after its forward (the frozen teacher always is)."""
    activation_checkpointing: str | int = "none"
    """``none``, ``full`` (every block of the trainable networks) or k (every k-th block): recompute activations
    in backward instead of keeping them."""
    cp: int = 1
    """Context-parallel degree: the ranks that split one clip's tokens (Ulysses attention); it divides the heads."""
    attention_backend: str = "auto"
    """The attention dispatch for library attention paths (:mod:`distill_mixins.parallel.attention`): ``auto``
    (flash-attn on CUDA when installed and the dtype and shape fit, else SDPA; under forward-mode AD the explicit
    attention with its forward rule), ``flash3``, ``flash2``, ``sdpa``, ``math``, ``explicit``."""

    def __post_init__(self) -> None:
        check_choice("ParallelConfig", "mode", self.mode, PARALLEL_MODES)
        for name in ("dp_replicate", "dp_shard", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not (value >= 1 or value == -1):
                raise ValueError(f"ParallelConfig.{name}={value!r}: give an int >= 1 (or -1 for dp_shard: the rest).")
        for name in ("dp_replicate", "cp"):
            if getattr(self, name) == -1:
                raise ValueError(
                    f"ParallelConfig.{name}=-1: give the size (an int >= 1); only dp_shard takes the rest."
                )
        if self.mode == "ddp" and self.dp_shard not in (1, -1):
            raise ValueError(
                f"ParallelConfig.dp_shard={self.dp_shard} with mode='ddp': ddp does not shard; use mode='hsdp'."
            )
        if self.mode == "fsdp" and self.dp_replicate != 1:
            raise ValueError(
                f"ParallelConfig.dp_replicate={self.dp_replicate} with mode='fsdp': fsdp shards over all ranks; "
                "use mode='hsdp' to replicate across groups."
            )
        check_precision(self.precision, "ParallelConfig.precision")
        from distill_mixins.parallel.activation import check_activation_checkpointing

        self.activation_checkpointing = check_activation_checkpointing(self.activation_checkpointing)
        from distill_mixins.parallel.attention import check_attention_backend

        check_attention_backend(self.attention_backend, "ParallelConfig.attention_backend")

    def data_parallel_shape(self, world_size: int) -> tuple[int, int]:
        """``(dp_replicate, dp_shard)``: the data-parallel sizes at ``world_size`` ranks (without ``cp``); an error
        names sizes that do not fit."""
        if world_size % self.cp:
            raise ValueError(
                f"ParallelConfig.cp={self.cp} does not divide the world size {world_size}: launch a multiple of "
                f"{self.cp} processes, or choose a cp that divides {world_size}."
            )
        ranks = world_size // self.cp
        if self.mode == "ddp":
            return ranks, 1
        shard = ranks // self.dp_replicate if self.dp_shard == -1 else self.dp_shard
        if self.dp_replicate * shard * self.cp != world_size:
            raise ValueError(
                f"ParallelConfig dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x cp={self.cp} does not "
                f"make the world size {world_size}: choose sizes whose product is {world_size} (dp_shard=-1 takes "
                "the rest)."
            )
        return self.dp_replicate, shard

    def mesh_shape(self, world_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """``(shape, dim names)`` of the networks' (FSDP) device mesh at ``world_size`` ranks: the shard dimension
        holds ``dp_shard x cp`` ranks (``cp`` innermost, so its row-major order is the ``dp_shard x cp`` mesh
        flattened); an error names sizes that do not fit."""
        replicate, shard = self.data_parallel_shape(world_size)
        if self.mode == "ddp":  # a shard dimension of size 1: FSDP2 then replicates whole parameters
            return (world_size, 1), ("dp_replicate", "dp_shard")
        if self.mode == "fsdp":
            return (shard * self.cp,), ("dp_shard",)
        return (replicate, shard * self.cp), ("dp_replicate", "dp_shard")

    def to_dict(self) -> dict[str, object]:
        """The config as JSON-ready values."""
        return config_to_dict(self)
