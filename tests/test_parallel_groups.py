"""CP and DP process groups: megatron-core's parallel_state when initialised, else a DeviceMesh, else one process.

Two launches on gloo (CPU): 2 processes (:func:`_world2`) and 4 processes (:func:`_world4`, dp=2 x cp=2, the case
where the rank order matters). Each rank returns plain data (ranks, sizes, group members, error messages); the
tests compare them here. The megatron cases run in the same launches when megatron-core is installed (it costs
seconds to import, so the workers import it only then); their tests are skipped only when it is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from distill_mixins.parallel.groups import ParallelGroups, cp_mesh_shape, parallel_groups
from tests.distributed import run_distributed

HAS_MEGATRON = importlib.util.find_spec("megatron.core") is not None
needs_megatron = pytest.mark.skipif(not HAS_MEGATRON, reason="megatron-core is not installed")


def _parallel_state() -> types.ModuleType:
    """megatron-core's ``parallel_state``, imported without running ``megatron/core/__init__.py``.

    Speed only: that ``__init__`` imports tensor_parallel, transformer, optimizers (~3 s of CPU per process, and this
    file starts 6 of them on a 2-core machine), none of which ``parallel_state`` needs; a package stub whose
    ``__path__`` is the real directory makes ``import megatron.core.parallel_state`` load the real, unmodified
    module (and its real ``megatron.core.utils``) under its real name, which is where the library looks for it.
    """
    if "megatron.core" not in sys.modules:
        package = types.ModuleType("megatron.core")
        package.__path__ = list(importlib.util.find_spec("megatron.core").submodule_search_locations)
        sys.modules["megatron.core"] = package
    return importlib.import_module("megatron.core.parallel_state")


def _summary(groups: ParallelGroups) -> dict[str, object]:
    """The fields of ``groups`` with each group replaced by its global ranks."""
    return {
        "source": groups.source,
        "dp": (groups.dp_rank, groups.dp_size, dist.get_process_group_ranks(groups.dp_group)),
        "cp": (groups.cp_rank, groups.cp_size, dist.get_process_group_ranks(groups.cp_group)),
    }


def _mesh(world_size: int, dp_replicate: int, dp_shard: int, cp: int):
    shape, names = cp_mesh_shape(world_size, dp_replicate, dp_shard, cp)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except ValueError as error:
        return str(error)
    return "no error"


def _megatron_orders() -> dict[tuple[int, int, int], tuple[list, list, list, list]]:
    """Megatron's CP and DP rank groups (default order, tp = pp = 1) and the mesh's, for several sizes."""
    RankGenerator = _parallel_state().RankGenerator  # noqa: N806 - megatron's class

    out = {}
    for rep, shard, cp in [(1, 4, 2), (2, 2, 2), (2, 1, 4), (1, 2, 4), (3, 2, 2), (1, 8, 1), (1, 1, 8)]:
        ranks = torch.arange(rep * shard * cp).reshape(cp_mesh_shape(rep * shard * cp, rep, shard, cp)[0])
        mesh_cp = ranks.reshape(-1, cp).tolist()  # cp innermost: each row one CP group
        mesh_dp = ranks.reshape(-1, cp).T.tolist()  # dp_replicate x dp_shard flattened: each column one DP group
        generator = RankGenerator(tp=1, ep=1, dp=rep * shard, pp=1, cp=cp, order="tp-cp-ep-dp-pp")
        out[(rep, shard, cp)] = (mesh_cp, generator.get_ranks("cp"), mesh_dp, generator.get_ranks("dp"))
    return out


def _megatron_cases(rank: int, world_size: int, mesh) -> dict[str, object]:
    """Megatron's groups at cp=2 (any mesh passed in is not used), its errors, then the fallback after destroy."""
    parallel_state = _parallel_state()
    # initialize_model_parallel runs on gloo/CPU as is: without a nccl_communicator_config_path it passes no NCCL
    # options, and its only CUDA calls are under use_sharp / high-priority streams, both off by default.
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    out = {"megatron": _summary(parallel_groups(mesh, cp_size=2)), "megatron_default": _summary(parallel_groups())}
    out["megatron_cp_mismatch"] = _error(parallel_groups, cp_size=world_size * 2)
    parallel_state.destroy_model_parallel()
    out["after_destroy"] = _summary(parallel_groups(mesh))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    out["megatron_tp"] = _error(parallel_groups)
    parallel_state.destroy_model_parallel()
    if rank == 0:
        out["orders"] = _megatron_orders()
    return out


def _world2(rank: int, world_size: int, with_megatron: bool) -> dict[str, object]:
    cp_mesh, dp_mesh = _mesh(2, 1, 1, 2), _mesh(2, 1, 2, 1)
    out: dict[str, object] = {
        "mesh_cp2": _summary(parallel_groups(cp_mesh, cp_size=2)),
        "mesh_dp2": _summary(parallel_groups(dp_mesh)),
        "mesh_1d": _summary(parallel_groups(init_device_mesh("cpu", (2,), mesh_dim_names=("dp_shard",)))),
        "default_cp2": _summary(parallel_groups(cp_size=2)),
        "default": _summary(parallel_groups()),
        "mesh_cp_mismatch": _error(parallel_groups, dp_mesh, cp_size=2),
        "mesh_unknown_dim": _error(parallel_groups, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))),
    }
    if with_megatron:
        out.update(_megatron_cases(rank, world_size, dp_mesh))
    return out


def _world4(rank: int, world_size: int, with_megatron: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "shard2_cp2": _summary(parallel_groups(_mesh(4, 1, 2, 2), cp_size=2)),
        "rep2_cp2": _summary(parallel_groups(_mesh(4, 2, 1, 2), cp_size=2)),
    }
    if with_megatron:
        parallel_state = _parallel_state()
        parallel_state.initialize_model_parallel(context_parallel_size=2)
        out["megatron"] = _summary(parallel_groups(cp_size=2))
        out["parallelize"] = _parallelize_dmd2()  # dp=2 x cp=2 on megatron's groups
        parallel_state.destroy_model_parallel()
    return out


def _parallelize_dmd2() -> dict[str, object]:
    """parallelize at cp=2 while megatron-core is initialised: its groups, and the DMD2 iterations' weights."""
    from distill_mixins.parallel import ParallelConfig, parallelize
    from tests.test_cp_parallel import build, train

    model = build("dmd2")
    plan = parallelize(model, ParallelConfig(cp=2))
    ranks = dist.get_process_group_ranks(model.context_parallel_group)
    return {"plan": (plan.dp_rank, plan.dp_size, plan.cp_size, plan.groups_source), "cp_ranks": ranks,
            **train(model, "dmd2")}


@pytest.fixture(scope="module")
def world2() -> list[dict[str, object]]:
    return run_distributed(_world2, 2, HAS_MEGATRON)


@pytest.fixture(scope="module")
def world4() -> list[dict[str, object]]:
    return run_distributed(_world4, 4, HAS_MEGATRON)


def test_single_process():
    assert not dist.is_initialized()
    assert parallel_groups() == ParallelGroups(None, 0, 1, None, 0, 1, "single_process")
    message = _error(parallel_groups, cp_size=2)
    assert "cp_size=2" in message and "torchrun" in message


def test_cp_mesh_shape():
    assert cp_mesh_shape(8, 2, 2, 2) == ((2, 2, 2), ("dp_replicate", "dp_shard", "cp"))
    assert cp_mesh_shape(8, 1, -1, 4) == ((1, 2, 4), ("dp_replicate", "dp_shard", "cp"))
    assert cp_mesh_shape(1, 1, 1, 1) == ((1, 1, 1), ("dp_replicate", "dp_shard", "cp"))
    message = _error(cp_mesh_shape, 8, 1, 3, 2)
    assert "dp_replicate=1 x dp_shard=3 x cp=2" in message and "world size 8" in message
    assert "world size 6" in _error(cp_mesh_shape, 6, 1, -1, 4)
    assert "cp=0" in _error(cp_mesh_shape, 4, 1, -1, 0)


def test_mesh_cp2(world2):
    for rank, result in enumerate(world2):
        assert result["mesh_cp2"] == {"source": "device_mesh", "dp": (0, 1, [rank]), "cp": (rank, 2, [0, 1])}
        assert result["default_cp2"] == result["mesh_cp2"]  # no mesh: cp_mesh_shape(2, 1, -1, 2) over the world


def test_mesh_dp2(world2):
    for rank, result in enumerate(world2):
        assert result["mesh_dp2"] == {"source": "device_mesh", "dp": (rank, 2, [0, 1]), "cp": (0, 1, [rank])}
        assert result["default"] == result["mesh_dp2"]
        assert result["mesh_1d"] == result["mesh_dp2"]  # no cp dimension: a CP group of this rank alone


def test_mesh_errors(world2):
    message = world2[0]["mesh_cp_mismatch"]
    assert "size 1" in message and "cp_size=2" in message and "cp_mesh_shape" in message
    message = world2[0]["mesh_unknown_dim"]
    assert "'tp'" in message and "dp_shard" in message


@needs_megatron
def test_megatron_cp2_matches_mesh(world2):
    for result in world2:  # megatron was given the dp=2 mesh: not used, megatron's cp=2 groups win
        assert result["megatron"] == {**result["mesh_cp2"], "source": "megatron"}
        assert result["megatron_default"] == result["megatron"]
        assert result["after_destroy"]["source"] == "device_mesh"  # destroy_model_parallel: back to the mesh


@needs_megatron
def test_megatron_errors(world2):
    message = world2[0]["megatron_cp_mismatch"]
    assert "context_parallel_size=2" in message and "cp_size=4" in message and "pass cp_size=2" in message
    message = world2[0]["megatron_tp"]
    assert "tensor_model_parallel_size=2" in message and "sizes 1" in message


@needs_megatron
def test_megatron_rank_order_matches_mesh(world2):
    for sizes, (mesh_cp, megatron_cp, mesh_dp, megatron_dp) in world2[0]["orders"].items():
        assert mesh_cp == megatron_cp, sizes
        assert mesh_dp == megatron_dp, sizes


def test_mesh_dp2_cp2(world4):
    for rank, result in enumerate(world4):
        cp_group = [rank - rank % 2, rank - rank % 2 + 1]  # CP ranks are neighbours, DP ranks 2 apart
        dp, cp = (rank // 2, 2, [rank % 2, rank % 2 + 2]), (rank % 2, 2, cp_group)
        expected = {"source": "device_mesh", "dp": dp, "cp": cp}
        assert result["shard2_cp2"] == expected
        assert result["rep2_cp2"] == expected


@needs_megatron
def test_megatron_dp2_cp2_matches_mesh(world4):
    for result in world4:
        assert result["megatron"] == {**result["shard2_cp2"], "source": "megatron"}


@needs_megatron
def test_parallelize_uses_megatron_groups_at_dp2_cp2(world4):
    """parallelize(cp=2) under an initialised megatron-core on 4 processes: its groups (dp=2 x cp=2), and two DMD2
    iterations (critic and student phases, GAN heads) within 1e-5 of one process."""
    from tests.test_cp_parallel import TOL, build, train

    reference = train(build("dmd2"), "dmd2")
    for rank, result in enumerate(world4):
        run = result["parallelize"]
        assert run["plan"] == (rank // 2, 2, 2, "megatron")
        assert run["cp_ranks"] == [rank - rank % 2, rank - rank % 2 + 1]
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(run["weights"][name], expected, atol=TOL, rtol=0, msg=name)
