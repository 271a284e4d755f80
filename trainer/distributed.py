"""The trainer's side of data parallelism: ranks, the local share of a global batch, agreement across ranks.

Under ``torchrun`` every rank runs the same trainer on its share of each global batch (the model parallelized
first: :func:`distill_mixins.parallel.parallelize`). Rank 0 logs, shows progress and writes the run's files;
every rank takes part in checkpoints (sharded networks are saved collectively), signals (a stop on one rank
stops all at the same iteration) and non-finite losses (the loss averaged over ranks decides for all).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger
from torch import Tensor, nn


@dataclass(frozen=True)
class Ranks:
    """This process's place: global ``rank`` of ``world`` processes, data-parallel ``dp_rank`` of ``dp_size``."""

    rank: int = 0
    world: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    device: str = "cpu"
    """Where the small agreement tensors live (the device of the model: nccl needs CUDA tensors)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world > 1


def init_distributed(device: str = "cpu") -> Ranks:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1) if not done yet: nccl
    for CUDA (each rank on ``cuda:LOCAL_RANK``), gloo for CPU. Returns this process's ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        logger.info("process group: {} ranks on {}", world, backend)
    if not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), dist.get_rank(), dist.get_world_size())


def rank_device(device: str) -> torch.device:
    """``device`` for this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun, anything else stays."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def model_ranks(model: nn.Module, device: torch.device | str = "cpu") -> Ranks:
    """The ranks of a (possibly parallelized) composed model; an error when several processes train a model that
    was not parallelized (each would train alone on its share)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    dp_rank = int(getattr(model, "data_parallel_rank", 0))
    dp_size = int(getattr(model, "data_parallel_size", 1))
    cp_size = int(getattr(model, "context_parallel_size", 1))  # the ranks of a CP group share one data rank
    if dp_size * cp_size != dist.get_world_size():
        raise RuntimeError(
            f"{dist.get_world_size()} processes, but the model's data-parallel size is {dp_size} (x context-parallel "
            f"{cp_size}): call "
            "distill_mixins.parallel.parallelize(model, ParallelConfig(...)) before training (or set the stage's "
            "'parallel' section in a run config)."
        )
    return Ranks(dist.get_rank(), dist.get_world_size(), dp_rank, dp_size, str(device))


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, dict):
        sizes = [_batch_size(v) for v in batch.values()]
    elif isinstance(batch, (list, tuple)):
        sizes = [_batch_size(v) for v in batch] if any(isinstance(v, (Tensor, dict)) for v in batch) else [len(batch)]
    else:
        return None
    return next((s for s in sizes if s is not None), None)


def _slice(value: Any, n: int, start: int, stop: int) -> Any:
    if isinstance(value, Tensor):
        return value[start:stop] if value.ndim and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _slice(v, n, start, stop) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (Tensor, dict)) for v in value):
            return type(value)(_slice(v, n, start, stop) for v in value)
        return value[start:stop] if len(value) == n else value
    return value


def local_share(batch: Any, ranks: Ranks) -> Any:
    """This data-parallel rank's equal share of a global batch: every tensor (and list of per-sample items, e.g.
    prompts) whose first dimension is the batch size, sliced; everything else as it is."""
    if ranks.dp_size == 1:
        return batch
    n = _batch_size(batch)
    if n is None:
        raise ValueError(f"cannot split a batch of type {type(batch).__name__} across ranks: give a dict of tensors.")
    if n % ranks.dp_size:
        raise ValueError(
            f"a global batch of {n} samples does not split evenly over {ranks.dp_size} data-parallel ranks: make the "
            f"batch size a multiple of {ranks.dp_size}."
        )
    share = n // ranks.dp_size
    return _slice(batch, n, ranks.dp_rank * share, (ranks.dp_rank + 1) * share)


def mean_over_ranks(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    """Each value averaged over the ranks (one all-reduce; every rank passes the same keys)."""
    if not ranks.distributed or not values:
        return values
    keys = sorted(values)
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(total)
    return {k: float(v) / ranks.world for k, v in zip(keys, total.tolist(), strict=True)}


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
    if not ranks.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ranks.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing in one process)."""
    if ranks.distributed:
        dist.barrier()


__all__ = [
    "Ranks", "any_rank", "barrier", "init_distributed", "local_share", "mean_over_ranks", "model_ranks", "rank_device",
]
