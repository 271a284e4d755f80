"""Context-parallel (CP) and data-parallel (DP) process groups on one mesh ``dp_replicate x dp_shard x cp``.

One switch, :func:`parallel_groups`, with three sources, the first that applies winning (logged once per source):

- ``"megatron"``: megatron-core's ``parallel_state`` is initialised in this process (a Megatron-initialised job
  keeps its groups: they are read, never re-created). Tensor and pipeline parallel sizes other than 1 are refused.
- ``"device_mesh"``: a torch ``DeviceMesh`` (the caller's, else one built from the default process group with
  :func:`cp_mesh_shape`).
- ``"single_process"``: ``torch.distributed`` is not initialised: ranks 0, sizes 1, groups ``None``.

Rank order. :func:`cp_mesh_shape` puts ``cp`` innermost, so for the same sizes a mesh built from it has the same CP
groups and DP groups as megatron-core's default ``order="tp-cp-ep-dp-pp"`` at ``tp = pp = 1`` (megatron's
``RankGenerator`` varies the first name in ``order`` fastest: ``rank = cp_rank + cp * dp_rank``, which is the
row-major index of ``(dp_replicate, dp_shard, cp)`` with ``dp_rank = replicate_rank * dp_shard + shard_rank``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType

import torch.distributed as dist
from loguru import logger
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

CP_DIM = "cp"
DP_DIMS = ("dp_replicate", "dp_shard", "dp")
_LOGGED: set[str] = set()  # the sources already logged in this process


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's data-parallel and context-parallel groups, ranks within them and their sizes.

    ``dp_group``: the ranks that hold different samples (data parallel *without* the CP ranks, which share a
    sample); ``cp_group``: the ranks that split one sample's sequence. Both are ``None`` only when
    ``source == "single_process"`` (torch.distributed not initialised). Under a distributed run a dimension of
    size 1, or one absent from the mesh, is a real group of this rank alone, never ``None`` (``None`` means the
    whole world to ``torch.distributed`` and to :func:`~distill_mixins.parallel.ulysses.ulysses_attention`).
    ``source``: ``"megatron"``, ``"device_mesh"`` or ``"single_process"``.
    """

    dp_group: ProcessGroup | None
    dp_rank: int
    dp_size: int
    cp_group: ProcessGroup | None
    cp_rank: int
    cp_size: int
    source: str


def cp_mesh_shape(
    world_size: int, dp_replicate: int, dp_shard: int, cp: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``(shape, names)`` of the ``dp_replicate x dp_shard x cp`` mesh at ``world_size`` ranks, ``cp`` innermost.

    All three dimensions are always present (size 1 included). ``dp_shard=-1`` takes the ranks left over. With
    ``cp`` innermost, CP ranks are neighbours and the CP and DP groups equal megatron-core's for the same sizes
    (default ``order="tp-cp-ep-dp-pp"``, tp = pp = 1). An error names sizes whose product is not ``world_size``.
    """
    for name, value in (("world_size", world_size), ("dp_replicate", dp_replicate), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"cp_mesh_shape: {name}={value!r}; give an int >= 1.")
    shard = world_size // (dp_replicate * cp) if dp_shard == -1 else dp_shard
    if not isinstance(shard, int) or shard < 1 or dp_replicate * shard * cp != world_size:
        raise ValueError(
            f"cp_mesh_shape: dp_replicate={dp_replicate} x dp_shard={dp_shard} x cp={cp} does not make the world size "
            f"{world_size}; choose sizes whose product is {world_size} (dp_shard=-1 takes the rest)."
        )
    return (dp_replicate, shard, cp), ("dp_replicate", "dp_shard", CP_DIM)


def parallel_groups(mesh: DeviceMesh | None = None, *, cp_size: int = 1) -> ParallelGroups:
    """This rank's DP and CP groups: from megatron-core when initialised, else from ``mesh``, else one process.

    ``mesh``: a mesh with a ``"cp"`` dimension and DP dimensions among ``"dp_replicate"``, ``"dp_shard"``, ``"dp"``
    (flattened into one DP group); ``None`` builds ``cp_mesh_shape(world, 1, -1, cp_size)`` over the default
    process group. ``cp_size``: the CP size the caller expects; when > 1 it must match megatron's or the mesh's.
    Collective under torch.distributed (it may create groups): call it on every rank, in the same order.
    """
    megatron = _initialised_megatron()
    if megatron is not None:
        groups = _megatron_groups(megatron, cp_size)
    elif mesh is not None:
        groups = _mesh_groups(mesh, cp_size)
    elif dist.is_available() and dist.is_initialized():
        groups = _mesh_groups(_default_mesh(cp_size), cp_size)
    else:
        groups = _single_process_groups(cp_size)
    _log_once(groups, ignored_mesh=megatron is not None and mesh is not None)
    return groups


def _initialised_megatron() -> ModuleType | None:
    """megatron-core's ``parallel_state`` when it is initialised in this process, else ``None``.

    Read from ``sys.modules``: a process that never imported it cannot have initialised it, and importing
    megatron-core only to find that out would cost seconds in every job that does not use it."""
    state = sys.modules.get("megatron.core.parallel_state")
    if state is None or not state.model_parallel_is_initialized():
        return None
    return state


def _megatron_groups(state: ModuleType, cp_size: int) -> ParallelGroups:
    tp, pp = state.get_tensor_model_parallel_world_size(), state.get_pipeline_model_parallel_world_size()
    if tp != 1 or pp != 1:
        raise ValueError(
            f"megatron-core parallel_state has tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}: "
            "this library does data and context parallelism only; initialise megatron with both sizes 1."
        )
    megatron_cp = state.get_context_parallel_world_size()
    if cp_size > 1 and megatron_cp != cp_size:
        raise ValueError(
            f"megatron-core parallel_state has context_parallel_size={megatron_cp} but cp_size={cp_size} was "
            f"requested: pass cp_size={megatron_cp}, or initialise megatron with context_parallel_size={cp_size}."
        )
    return ParallelGroups(
        dp_group=state.get_data_parallel_group(with_context_parallel=False),
        dp_rank=state.get_data_parallel_rank(with_context_parallel=False),
        dp_size=state.get_data_parallel_world_size(with_context_parallel=False),
        cp_group=state.get_context_parallel_group(),
        cp_rank=state.get_context_parallel_rank(),
        cp_size=megatron_cp,
        source="megatron",
    )


def _default_mesh(cp_size: int) -> DeviceMesh:
    """``cp_mesh_shape(world, 1, -1, cp_size)`` over the default process group, on its device type."""
    shape, names = cp_mesh_shape(dist.get_world_size(), 1, -1, cp_size)
    device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def _mesh_groups(mesh: DeviceMesh, cp_size: int) -> ParallelGroups:
    names = tuple(mesh.mesh_dim_names or ())
    unknown = [n for n in names if n != CP_DIM and n not in DP_DIMS]
    if not names or unknown:
        raise ValueError(
            f"parallel_groups: mesh dimensions {names or '(unnamed)'} include {unknown or 'no names'}; name them "
            f"among {(*DP_DIMS, CP_DIM)} (cp_mesh_shape gives the shape and names)."
        )
    cp_group, cp_rank, mesh_cp = _dim_group(mesh, (CP_DIM,) if CP_DIM in names else ())
    if cp_size > 1 and mesh_cp != cp_size:
        raise ValueError(
            f"parallel_groups: the mesh's cp dimension has size {mesh_cp} but cp_size={cp_size} was requested; "
            f"pass cp_size={mesh_cp}, or build the mesh with cp={cp_size} (cp_mesh_shape)."
        )
    dp_group, dp_rank, dp_size = _dim_group(mesh, tuple(n for n in names if n != CP_DIM))
    return ParallelGroups(dp_group, dp_rank, dp_size, cp_group, cp_rank, mesh_cp, "device_mesh")


def _dim_group(mesh: DeviceMesh, dims: tuple[str, ...]) -> tuple[ProcessGroup, int, int]:
    """``(group, rank, size)`` over ``dims`` of ``mesh`` flattened (row-major); no dims: this rank alone."""
    if not dims:
        return _own_group(), 0, 1
    sub = mesh[dims]._flatten() if len(dims) > 1 else mesh[dims[0]]
    return sub.get_group(), sub.get_local_rank(), sub.size()


def _own_group() -> ProcessGroup:
    """A group of this rank alone (collective: every rank creates every rank's group)."""
    group, _ = dist.new_subgroups_by_enumeration([[r] for r in range(dist.get_world_size())])
    return group


def _single_process_groups(cp_size: int) -> ParallelGroups:
    if cp_size > 1:
        raise ValueError(
            f"parallel_groups: cp_size={cp_size} but torch.distributed is not initialised (one process); launch "
            f"with torchrun on a multiple of {cp_size} processes, or pass cp_size=1."
        )
    return ParallelGroups(None, 0, 1, None, 0, 1, "single_process")


def _log_once(groups: ParallelGroups, ignored_mesh: bool) -> None:
    if groups.source in _LOGGED:
        return
    _LOGGED.add(groups.source)
    note = " (megatron-core is initialised: the mesh passed in is not used)" if ignored_mesh else ""
    logger.info("parallel groups from {}{}: dp rank {} of {}, cp rank {} of {}", groups.source, note,
                groups.dp_rank, groups.dp_size, groups.cp_rank, groups.cp_size)


__all__ = ["CP_DIM", "DP_DIMS", "ParallelGroups", "cp_mesh_shape", "parallel_groups"]
