"""parallelize: data parallelism applied to a composed distillation model from outside (ARCHITECTURE.md,
"Distributed").

Each **network** (student ``net``, critic ``net_fake_score``, discriminator ``net_discriminator``, EMA ``net_ema``,
frozen teacher ``net_teacher``) is wrapped on its own, never the composed model (``fully_shard`` swaps a module's
class, which would break a mixin class composed with a host):

- ``ddp``: FSDP2 on a (world x 1) mesh, i.e. whole parameters on every rank with gradients all-reduced, one unit
  per trainable network (a phase reduces only the gradients its networks received, no
  ``find_unused_parameters``); the teacher and the EMA stay plain copies;
- ``fsdp`` / ``hsdp``: FSDP2 ``fully_shard`` on each network's blocks then on its root, over a 1-D mesh (shard)
  or a 2-D mesh (replicate x shard); the teacher reshards after every forward, the EMA is sharded like the student
  so its update runs on local shards.

Context parallel (``ParallelConfig.cp`` > 1): the ranks form a ``dp_replicate x dp_shard x cp`` mesh, ``cp``
innermost (:mod:`~distill_mixins.parallel.groups`; megatron-core's groups when its ``parallel_state`` is
initialised). The host (a :class:`~distill_mixins.contract.ContextParallelHost`) makes each network's forward
context-parallel over the CP group; the ranks of a CP group are one data-parallel rank (same samples, same draws).
The networks are sharded over ``dp_shard x cp`` ranks; since each CP rank's parameter gradients cover its own
tokens (their sum is the clip's gradient), FSDP sums the gradients and divides by the data-parallel size only.

Parameters become DTensors; the method code does not change. Gradient clipping in
:meth:`~distill_mixins.core.DistillationCoreMixin.clip_gradients` takes the norm of each network over all of its
shards. Draws depend on the sample's global index (:mod:`distill_mixins.draws`): one process and N processes give
the same update for the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from loguru import logger
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from distill_mixins.contract import ContextParallelHost
from distill_mixins.core import DistillationCoreMixin
from distill_mixins.lora import checkpoint_lora_base, is_view, lora_base
from distill_mixins.parallel.activation import checkpoint_networks, network_blocks
from distill_mixins.parallel.attention import set_attention_backend
from distill_mixins.parallel.config import ParallelConfig
from distill_mixins.parallel.groups import ParallelGroups, cp_mesh_shape, parallel_groups
from distill_mixins.parallel.meta import target_device
from distill_mixins.precision import resolve_precision

NETWORKS = ("net", "net_fake_score", "net_discriminator", "net_logvar", "net_ema", "net_teacher")
"""The networks of a composed model that :func:`parallelize` wraps, each on its own."""
SMALL_HEADS = ("net_discriminator", "net_logvar")
"""Tiny heads kept whole on every rank, gradients all-reduced by hooks: GAN heads, sCM's adaptive-weighting head."""


@dataclass(frozen=True)
class ParallelPlan:
    """What :func:`parallelize` did: the mesh, the data-parallel rank and size, and how each network is held
    (``"sharded"``, ``"replicated"`` (gradients all-reduced) or ``"copy"`` (a plain copy on every rank))."""

    mesh: DeviceMesh
    mode: str
    dp_rank: int
    dp_size: int
    networks: dict[str, str]
    precision: str
    checkpointed_blocks: dict[str, int]
    cp_size: int = 1
    """Context-parallel degree (1: off)."""
    groups_source: str = "device_mesh"
    """Where the data- and context-parallel groups came from: ``"device_mesh"``, or ``"megatron"`` (cp > 1)."""


def build_mesh(config: ParallelConfig, device_type: str) -> DeviceMesh:
    """The data-parallel device mesh of ``config`` over the default process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "parallelize needs a process group: launch with torchrun (e.g. `torchrun --nproc_per_node=2 -m "
            "distill_mixins.cli train --config run.json`) or call torch.distributed.init_process_group first."
        )
    shape, names = config.mesh_shape(dist.get_world_size())
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def mixed_precision(config: ParallelConfig, device: torch.device) -> tuple[MixedPrecisionPolicy, str]:
    """FSDP2's policy for the resolved precision: bf16 compute with float32 gradient reduction, or float32. On the
    CPU, float32 parameters either way (bf16 compute comes from the trainer's autocast): torch 2.13's FSDP2 on gloo
    assigns the reduced bf16 gradient to the float32 shard and fails ("grad_dtype 'Float'")."""
    precision = resolve_precision(config.precision, device)
    if precision == "bf16" and device.type != "cpu":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), precision
    if precision == "bf16":
        logger.info("parallelize: bf16 on the CPU keeps FSDP2's parameters in float32 (FSDP2 on gloo cannot reduce "
                    "bf16 gradients into float32 shards); run the step under autocast (the trainer does) for bf16 "
                    "compute")
    return MixedPrecisionPolicy(), precision


def _blocks(model: nn.Module, net: nn.Module) -> list[nn.Module]:
    """The network's blocks when it has any (they become their own sharding units), else none (root only)."""
    try:
        return network_blocks(model, net)
    except ValueError:
        return []


def _contiguous(name: str, net: nn.Module) -> None:
    """FSDP2 shards contiguous parameters only: move channels-last weights back to the default layout."""
    if any(not p.is_contiguous() for p in net.parameters()):
        logger.info("parallelize: {} has channels-last parameters; FSDP needs contiguous ones (converted)", name)
        net.to(memory_format=torch.contiguous_format)


def sharding_units(model: nn.Module, net: nn.Module) -> list[nn.Module]:
    """The modules of ``net`` that become their own FSDP units, children before parents: its blocks, then every other
    module that holds parameters itself (stem, embeddings, head). With no parameters left in the root unit, a
    backward that reaches the stem without passing the root's output (the GAN generator term through a tapped
    network whose output is detached) still gathers what it needs, through each unit's own pre-backward hook."""
    blocks = _blocks(model, net)
    inside = {id(m) for block in blocks for m in block.modules()}
    others = [
        m for m in reversed(list(net.modules()))
        if m is not net and id(m) not in inside and any(True for _ in m.parameters(recurse=False))
    ]
    return blocks + others


def _shard(
    model: nn.Module, net: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, reshard: bool, dp_size: int
) -> None:
    for unit in sharding_units(model, net):
        _divide_by(fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard), mesh, dp_size)
    _divide_by(fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard), mesh, dp_size)


def _divide_by(unit: nn.Module, mesh: DeviceMesh, dp_size: int) -> None:
    """Under context parallel the mesh has ``dp_size x cp`` ranks: sum the gradients over all of them and divide by
    ``dp_size`` (the CP ranks' gradients add up to the clip's). Plain sums on the wire (gloo has no pre-scaled sum)."""
    if mesh.size() != dp_size:
        unit.set_gradient_divide_factor(float(dp_size))
        unit.set_force_sum_reduction_for_comms(True)


def _average_gradients(net: nn.Module) -> None:
    """All-reduce each gradient as it is accumulated and divide by the world size (DDP by hooks). Unlike FSDP, it
    keeps the weights in place, so a double backward (R1 through the GAN heads) works."""
    world = dist.get_world_size()

    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in net.parameters():
        p.register_post_accumulate_grad_hook(average)


def _check_r1(model: nn.Module, config: ParallelConfig) -> None:
    distill = model.distill_config
    disc = getattr(distill, "discriminator", None)
    if disc is None or getattr(distill, "gan_loss_weight", 0.0) <= 0 or disc.r1_weight <= 0:
        return
    if config.cp > 1:
        raise ValueError(
            f"ParallelConfig.cp={config.cp} with the R1 penalty (DiscriminatorConfig.r1_weight={disc.r1_weight}): R1 "
            "differentiates twice through the tapped network, and the Ulysses exchanges are differentiable once only "
            "(a second derivative through them would be silently zero). Set r1_weight=0, or use cp=1."
        )
    if config.mode == "ddp":
        return
    raise ValueError(
        f"ParallelConfig.mode={config.mode!r} with the R1 penalty (DiscriminatorConfig.r1_weight={disc.r1_weight}): "
        f"R1 differentiates twice through the tapped {disc.source} network, and FSDP frees its gathered weights after "
        "the first backward. Use mode='ddp', or set r1_weight=0 (not supported yet under sharding)."
    )


def parallelize(model: DistillationCoreMixin, config: ParallelConfig, mesh: DeviceMesh | None = None) -> ParallelPlan:
    """Spread ``model``'s networks over the ranks as ``config`` says (call it after construction, before the first
    training step builds the optimizers). ``mesh``: an explicit data-parallel mesh (else built from ``config``)."""
    if not isinstance(model, DistillationCoreMixin):
        raise TypeError(f"parallelize needs a composed distillation model, got {type(model).__name__}.")
    if model.optimizers_built:
        raise RuntimeError(
            "parallelize after the optimizers were built: call it right after constructing the model, before the "
            "first training_step or optimizers() call (the optimizers must hold the sharded parameters)."
        )
    _check_r1(model, config)
    device = target_device(model, mesh)  # a model built on meta (parallel/meta.py): the device it will live on
    mesh = build_mesh(config, device.type) if mesh is None else mesh
    policy, precision = mixed_precision(config, device)
    set_attention_backend(config.attention_backend)  # the process default of the library's attention dispatch
    groups = _context_parallel(model, config, mesh)
    lora = lora_base(model)  # DistillConfig.lora: the networks are views of one base (distill_mixins.lora)
    checkpointed = (checkpoint_networks(model, config.activation_checkpointing) if lora is None
                    else checkpoint_lora_base(model, config.activation_checkpointing))  # before sharding
    held = {}
    for name in NETWORKS:
        net = model._modules.get(name)
        if net is None:
            continue
        if lora is not None and is_view(net):
            held[name] = _hold_lora_view(model, name, lora.base, config, mesh, policy, groups.dp_size)
            continue
        _contiguous(name, net)
        if name in SMALL_HEADS:  # small heads: whole on every rank, gradients all-reduced by hooks
            _average_gradients(net)
            held[name] = "replicated"
        elif config.mode == "ddp":  # FSDP2 on a (world x 1) mesh: whole parameters everywhere, gradients all-reduced
            trainable = name in model.trainable_networks()
            if trainable:
                _divide_by(fully_shard(net, mesh=mesh, mp_policy=policy), mesh, groups.dp_size)
            held[name] = "replicated" if trainable else "copy"
        else:
            reshard = True if name == "net_teacher" else config.reshard_after_forward
            _shard(model, net, mesh, policy, reshard, groups.dp_size)
            held[name] = "sharded"
    model.set_data_parallel(groups.dp_rank, groups.dp_size)
    model.optimizers()  # built now, over the sharded parameters (a module mid-forward holds gathered ones)
    logger.info("parallelize: {} over {} ranks (mesh {}, data parallel {} x context parallel {}), precision {}, "
                "networks {}", config.mode, mesh.size(), tuple(mesh.shape), groups.dp_size, groups.cp_size, precision,
                held)
    return ParallelPlan(mesh, config.mode, groups.dp_rank, groups.dp_size, held, precision, checkpointed,
                        groups.cp_size, groups.source)


def _hold_lora_view(
    model: DistillationCoreMixin, name: str, base: nn.Module, config: ParallelConfig, mesh: DeviceMesh,
    policy: MixedPrecisionPolicy, dp_size: int,
) -> str:
    """A LoRA view: the base is sharded once, through the teacher view (its blocks are the units; each holds its
    layers' frozen base weights and every adapter, all adapters float32); an adapter view's parameters are then the
    shards inside those units. Under ``ddp`` the base stays a plain copy and the trained adapters' gradients are
    all-reduced by hooks."""
    if config.mode == "ddp":
        if name in model.trainable_networks():
            _average_gradients(model._modules[name])
            return "replicated"
        return "copy"
    if name == "net_teacher":
        _contiguous(name, base)
        _shard(model, base, mesh, policy, True, dp_size)
    return "sharded"


def _context_parallel(model: DistillationCoreMixin, config: ParallelConfig, mesh: DeviceMesh) -> ParallelGroups:
    """The data- and context-parallel groups; with ``config.cp`` > 1, every network (but the GAN heads, which see
    gathered features) made context-parallel by the host, and the model told its CP group."""
    if config.cp == 1:
        return ParallelGroups(None, mesh.get_rank(), mesh.size(), None, 0, 1, "device_mesh")
    if lora_base(model) is not None:
        raise ValueError(
            f"ParallelConfig.cp={config.cp} with DistillConfig.lora: context parallel is not supported for LoRA "
            "distillation yet (the student, critic and teacher share one base network); use cp=1."
        )
    if not isinstance(model, ContextParallelHost):
        raise TypeError(
            f"ParallelConfig.cp={config.cp}: {type(model).__name__}'s host cannot run its networks context-parallel: "
            "give the host an `enable_context_parallel(net, group)` method (distill_mixins.ContextParallelHost; the "
            "diffusers Wan and Cosmos hosts have one), or use cp=1."
        )
    replicate, shard = config.data_parallel_shape(mesh.size())
    shape, names = cp_mesh_shape(mesh.size(), replicate, shard, config.cp)
    groups = parallel_groups(init_device_mesh(mesh.device_type, shape, mesh_dim_names=names), cp_size=config.cp)
    _check_cp_ranks(groups)
    for name in NETWORKS:
        net = model._modules.get(name)
        if net is not None and name not in SMALL_HEADS:
            model.enable_context_parallel(net, groups.cp_group)
    model.set_context_parallel(groups.cp_group)
    return groups


def _check_cp_ranks(groups: ParallelGroups) -> None:
    """The CP group must be ``cp`` neighbouring ranks (the networks' mesh shards over ``dp_shard x cp``, ``cp``
    innermost): true for the library's mesh and for megatron-core's default order."""
    rank, cp = dist.get_rank(), groups.cp_size
    expected = list(range(rank - rank % cp, rank - rank % cp + cp))
    if dist.get_process_group_ranks(groups.cp_group) != expected:
        raise ValueError(
            f"the context-parallel group of rank {rank} is ranks {dist.get_process_group_ranks(groups.cp_group)} "
            f"({groups.source}), not the neighbouring ranks {expected}: initialise megatron-core with its default "
            "order 'tp-cp-ep-dp-pp' (cp innermost), or let the library build the groups."
        )


__all__ = ["NETWORKS", "ParallelPlan", "build_mesh", "mixed_precision", "parallelize"]
