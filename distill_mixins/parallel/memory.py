"""Per-GPU memory of the training state (weights, gradients, optimizer states) under DDP, FSDP and HSDP.

A calculator, not a profiler: it counts the bytes that a distillation run keeps resident for the whole run,
before activations, per network (student, critic, discriminator, EMA, frozen teacher). Assumptions:

- **Trainable networks** (student, critic, discriminator) keep fp32 *master* weights and fp32 gradients; bf16
  is the compute dtype only (autocast, or FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).
  The optimizer is AdamW: two fp32 states (``exp_avg``, ``exp_avg_sq``) per trainable parameter; its per-tensor
  ``step`` scalar is not counted. So 4 + 4 + 8 = 16 bytes per trainable parameter.
- **EMA** of the student: one fp32 copy, no gradient, no optimizer (what ``DistillationCoreMixin`` builds).
- **Frozen teacher**: weights only (bf16 or fp32), no gradient, no optimizer; under FSDP it is sharded like
  the others and resharded after each forward.
- **DDP** replicates everything on every rank; gradients are assumed to be views of DDP's buckets
  (``gradient_as_bucket_view=True``); without it DDP keeps a second copy of the gradients.
- **FSDP** shards every network over all ``world_size`` ranks; **HSDP** (replicate x shard) over the
  ``shard_size`` ranks of its shard group only, so HSDP with shard size ``s`` is FSDP at ``s``. A rank holds
  ``ceil(params / shards)`` elements per network (FSDP2 shards each tensor on dim 0, so real shards differ by
  at most a row of padding per tensor).
- **Transient** (optional, kept apart from the totals): under FSDP/HSDP the unit being computed is
  all-gathered unsharded in the compute dtype; ``unsharded_blocks`` units of the largest size (the one running
  plus the one prefetched: 2) are added to :attr:`MemoryEstimate.peak`, never to :attr:`MemoryEstimate.total`.
  Activations, autocast's bf16 weight cache under DDP, communication buffers and the CUDA allocator's
  fragmentation are not counted.

``from_module`` and ``measure_local_bytes`` count a real ``nn.Module`` (for DTensor parameters, the local shard:
``p.to_local()``), so a benchmark can print measured per-rank bytes next to :func:`estimate_memory`.
``python -m distill_mixins.parallel.memory`` prints the tables of ``docs/distributed.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

MODES = ("ddp", "fsdp", "hsdp")
"""Data-parallel modes the calculator knows."""
FP32, BF16 = 4, 2
"""Bytes per element of float32 and bfloat16."""
ADAMW_STATES = 2
"""AdamW keeps two fp32 states per trainable parameter (``exp_avg``, ``exp_avg_sq``)."""
GIB = 2**30
GPU_CAPACITIES: dict[str, int] = {"80 GB": 80 * 10**9, "141 GB": 141 * 10**9}
"""GPU memory sizes the tables mark, in decimal bytes as sold (drivers report slightly more: conservative)."""
WORLD_SIZES = (8, 16, 32, 64)
"""FSDP world sizes of the published-recipe table."""


def _check_int(owner: str, name: str, value: object, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name}={value!r} must be an int >= {minimum}.")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r} must be True or False.")


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class NetworkMemory:
    """What one network keeps resident for the run, counted per element.

    ``params``: number of parameters (global, unsharded). ``param_bytes``: bytes per stored weight (4 for fp32
    master weights, 2 for a bf16 teacher). ``grad_bytes`` and ``optimizer_states`` (fp32 states of
    ``state_bytes`` each per parameter) must be 0 for a frozen network. ``largest_block``: parameters of the
    largest unit FSDP gathers at once (``None``: the whole network). ``sharded``: whether FSDP/HSDP shard it.
    Build one with :func:`trainable_network`, :func:`frozen_network`, :func:`ema_of` or :func:`from_module`.
    """

    name: str
    params: int
    trainable: bool
    param_bytes: int
    grad_bytes: int
    optimizer_states: int
    state_bytes: int = FP32
    largest_block: int | None = None
    sharded: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"NetworkMemory.name={self.name!r} must be a non-empty string.")
        owner = f"NetworkMemory({self.name!r})"
        _check_int(owner, "params", self.params)
        _check_bool(owner, "trainable", self.trainable)
        _check_bool(owner, "sharded", self.sharded)
        _check_int(owner, "param_bytes", self.param_bytes, 1)
        _check_int(owner, "grad_bytes", self.grad_bytes)
        _check_int(owner, "optimizer_states", self.optimizer_states)
        _check_int(owner, "state_bytes", self.state_bytes, 1)
        if not self.trainable:
            for name in ("grad_bytes", "optimizer_states"):
                if getattr(self, name) != 0:
                    raise ValueError(f"{owner}.{name}={getattr(self, name)!r} must be 0 for a frozen network.")
        if self.largest_block is not None:
            _check_int(owner, "largest_block", self.largest_block)
            if self.largest_block > self.params:
                raise ValueError(f"{owner}.largest_block={self.largest_block} exceeds params={self.params}.")

    @property
    def block_params(self) -> int:
        """Parameters of the largest unit gathered at once under FSDP (the whole network by default)."""
        return self.params if self.largest_block is None else self.largest_block

    @property
    def bytes_per_param(self) -> int:
        """Resident bytes per parameter: weight + gradient + optimizer states."""
        return self.param_bytes + self.grad_bytes + self.optimizer_states * self.state_bytes


def trainable_network(
    name: str,
    params: int,
    *,
    param_bytes: int = FP32,
    grad_bytes: int | None = None,
    optimizer_states: int = ADAMW_STATES,
    largest_block: int | None = None,
) -> NetworkMemory:
    """A network an optimizer trains: fp32 master weights, gradients like the weights, AdamW (defaults)."""
    grad = param_bytes if grad_bytes is None else grad_bytes
    return NetworkMemory(name, params, True, param_bytes, grad, optimizer_states, largest_block=largest_block)


def frozen_network(
    name: str, params: int, *, param_bytes: int = BF16, largest_block: int | None = None
) -> NetworkMemory:
    """A frozen network (the teacher): weights only, bf16 by default."""
    return NetworkMemory(name, params, False, param_bytes, 0, 0, largest_block=largest_block)


def ema_of(student: NetworkMemory, name: str = "ema") -> NetworkMemory:
    """The EMA of ``student``: one fp32 copy, frozen, sharded like the student."""
    return NetworkMemory(
        name, student.params, False, FP32, 0, 0, largest_block=student.largest_block, sharded=student.sharded
    )


@dataclass(frozen=True)
class MemoryLayout:
    """How the networks are spread: ``mode`` in :data:`MODES`, ``world_size`` ranks, and for ``hsdp`` the
    ``shard_size`` of a shard group (``world_size = replicas x shard_size``)."""

    mode: str
    world_size: int
    shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MemoryLayout.mode={self.mode!r} is not known; choose one of {', '.join(MODES)}.")
        _check_int("MemoryLayout", "world_size", self.world_size, 1)
        if self.mode != "hsdp":
            if self.shard_size is not None:
                raise ValueError(f"MemoryLayout.shard_size={self.shard_size!r} is only for mode='hsdp'.")
            return
        _check_int("MemoryLayout", "shard_size", self.shard_size, 1)
        assert self.shard_size is not None  # checked above
        if self.world_size % self.shard_size:
            raise ValueError(
                f"MemoryLayout.shard_size={self.shard_size} must divide world_size={self.world_size} (HSDP is "
                "replicate x shard)."
            )

    @property
    def shards(self) -> int:
        """Ranks one sharded network is split over: 1 (DDP), ``world_size`` (FSDP), ``shard_size`` (HSDP)."""
        if self.mode == "ddp":
            return 1
        return self.world_size if self.mode == "fsdp" else int(self.shard_size or 1)


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class NetworkBytes:
    """Bytes one rank holds for one network: ``params`` (weights), ``grads`` and ``optimizer`` states."""

    name: str
    params: int
    grads: int
    optimizer: int

    def __post_init__(self) -> None:
        for field in ("params", "grads", "optimizer"):
            _check_int(f"NetworkBytes({self.name!r})", field, getattr(self, field))

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer states."""
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes of every network under ``layout``; ``transient`` is kept out of :attr:`total`."""

    layout: MemoryLayout
    rows: tuple[NetworkBytes, ...]
    transient: int = 0

    def __post_init__(self) -> None:
        _check_int("MemoryEstimate", "transient", self.transient)
        names = [row.name for row in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"MemoryEstimate.rows has duplicate network names: {names}.")

    def row(self, name: str) -> NetworkBytes:
        """The row of network ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no network {name!r}; networks: {', '.join(r.name for r in self.rows)}.")

    @property
    def params(self) -> int:
        """Weight bytes per GPU, all networks."""
        return sum(row.params for row in self.rows)

    @property
    def grads(self) -> int:
        """Gradient bytes per GPU, all networks."""
        return sum(row.grads for row in self.rows)

    @property
    def optimizer(self) -> int:
        """Optimizer-state bytes per GPU, all networks."""
        return sum(row.optimizer for row in self.rows)

    @property
    def total(self) -> int:
        """Resident training state per GPU (weights + gradients + optimizer states), before activations."""
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> int:
        """:attr:`total` plus the transient unsharded units (still before activations)."""
        return self.total + self.transient

    def to_markdown(self) -> str:
        """Per-network rows and the total, in GiB with one decimal."""
        lines = ["| network | weights | grads | optimizer | total |", "|---|---:|---:|---:|---:|"]
        for row in (*self.rows, NetworkBytes("**total**", self.params, self.grads, self.optimizer)):
            lines.append(
                f"| {row.name} | {gib(row.params)} | {gib(row.grads)} | {gib(row.optimizer)} | {gib(row.total)} |"
            )
        return "\n".join(lines)


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors created while active (a measurement, next to this module's calculator): every tensor
    an operator returns is registered by its storage (data pointer, full storage size) and dropped once the storage is
    freed (a weak reference, checked after every operator); :attr:`peak` is the largest sum seen. Storages whose data
    pointers are in ``existing`` (e.g. the parameters and optimizer states held before) are not counted. CPU tensors
    only; inside one operator's kernel it sees nothing (scratch buffers)."""

    def __init__(self, existing: Iterable[int] = ()) -> None:
        super().__init__()
        self.existing = set(existing)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type == "cpu" and not t.is_meta:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.live and ptr not in self.existing:
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def gib(n_bytes: int) -> str:
    """``n_bytes`` in GiB with one decimal."""
    return f"{n_bytes / GIB:.1f}"


# ----------------------------------------------------------------------------------------------- estimate


def estimate_memory(
    networks: Sequence[NetworkMemory],
    mode: str,
    world_size: int,
    *,
    shard_size: int | None = None,
    unsharded_blocks: int = 0,
    compute_bytes: int = BF16,
) -> MemoryEstimate:
    """Per-GPU bytes of ``networks`` under ``mode`` at ``world_size`` (see the module docstring).

    ``unsharded_blocks``: how many of the largest FSDP units are gathered at once (2: the one computing plus the
    prefetched one), in ``compute_bytes`` per element; counted in ``transient`` only, and 0 under DDP.
    """
    layout = MemoryLayout(mode, world_size, shard_size)
    _check_int("estimate_memory", "unsharded_blocks", unsharded_blocks)
    _check_int("estimate_memory", "compute_bytes", compute_bytes, 1)
    if not networks or not all(isinstance(net, NetworkMemory) for net in networks):
        raise ValueError("estimate_memory: networks must be a non-empty sequence of NetworkMemory.")
    rows = tuple(_network_bytes(net, layout.shards if net.sharded else 1) for net in networks)
    sharded = [net.block_params for net in networks if net.sharded]
    transient = unsharded_blocks * max(sharded, default=0) * compute_bytes if layout.shards > 1 else 0
    return MemoryEstimate(layout, rows, transient)


def _network_bytes(net: NetworkMemory, shards: int) -> NetworkBytes:
    elements = math.ceil(net.params / shards)
    return NetworkBytes(
        net.name,
        elements * net.param_bytes,
        elements * net.grad_bytes,
        elements * net.optimizer_states * net.state_bytes,
    )


# ----------------------------------------------------------------------------------------------- real modules


def _local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (a DTensor's local shard, else the tensor)."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def _local_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Global number of parameters of ``module`` (a DTensor counts its full, unsharded shape)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def largest_block_params(module: nn.Module) -> int:
    """Parameters of the largest unit FSDP gathers at once, if it wraps each block of the longest
    ``nn.ModuleList`` and the root: the larger of the biggest block and everything outside the blocks."""
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    total = count_parameters(module)
    if not lists:
        return total
    blocks = max(lists, key=len)
    sizes = [count_parameters(block) for block in blocks]
    return max(max(sizes), total - sum(sizes))


def _element_size(name: str, module: nn.Module) -> int:
    sizes = {p.element_size() for p in module.parameters()}
    if len(sizes) > 1:
        raise ValueError(
            f"from_module({name!r}): parameters have mixed element sizes {sorted(sizes)}; pass param_bytes."
        )
    return sizes.pop() if sizes else FP32


def from_module(
    name: str,
    module: nn.Module,
    *,
    trainable: bool | None = None,
    param_bytes: int | None = None,
    grad_bytes: int | None = None,
    optimizer_states: int = ADAMW_STATES,
    largest_block: int | None = None,
) -> NetworkMemory:
    """:class:`NetworkMemory` of a real module: its parameter count and dtype, trainable if any parameter
    requires grad (unless ``trainable`` says), gradients like the weights, AdamW states, and the largest
    FSDP unit from :func:`largest_block_params` (unless given)."""
    is_trainable = any(p.requires_grad for p in module.parameters()) if trainable is None else trainable
    weight = _element_size(name, module) if param_bytes is None else param_bytes
    block = largest_block_params(module) if largest_block is None else largest_block
    params = count_parameters(module)
    if not is_trainable:
        return frozen_network(name, params, param_bytes=weight, largest_block=block)
    return trainable_network(
        name, params, param_bytes=weight, grad_bytes=grad_bytes, optimizer_states=optimizer_states, largest_block=block
    )


def measure_local_bytes(
    module: nn.Module, optimizer: torch.optim.Optimizer | None = None, name: str = "measured"
) -> NetworkBytes:
    """Bytes this rank holds for ``module`` now: its weights, the gradients present, and the tensor states
    ``optimizer`` keeps for its parameters (Adam's ``step`` scalars included); DTensors count their local shard."""
    params = list(module.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states: list[Tensor] = []
    if optimizer is not None:
        for p in params:
            states += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]
    return NetworkBytes(name, _local_bytes(params), _local_bytes(grads), _local_bytes(states))


# ----------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class TeacherArchitecture:
    """A teacher's size: ``blocks`` transformer blocks of ``block_params`` each, ``other_params`` outside them
    (embeddings, text projection, output head), and the blocks' feature ``width`` (the GAN heads' input)."""

    name: str
    blocks: int
    block_params: int
    other_params: int
    width: int

    def __post_init__(self) -> None:
        for field in ("blocks", "block_params", "width"):
            _check_int(f"TeacherArchitecture({self.name!r})", field, getattr(self, field), 1)
        _check_int(f"TeacherArchitecture({self.name!r})", "other_params", self.other_params)

    @property
    def params(self) -> int:
        """All parameters."""
        return self.blocks * self.block_params + self.other_params

    @property
    def largest_unit(self) -> int:
        """The largest FSDP unit: one block, or the root (everything outside the blocks)."""
        return max(self.block_params, self.other_params)


COSMOS_PREDICT25_2B = TeacherArchitecture("Cosmos-Predict2.5-2B", 28, 69_206_528, 121_392_128, 2048)
"""Counted from diffusers' ``CosmosTransformer3DModel`` with the Predict2.5-2B config (16 heads x 128, 28 layers,
text projection from 100,352 channels): 2,059,174,912 parameters."""
COSMOS_PREDICT25_14B = TeacherArchitecture("Cosmos-Predict2.5-14B", 36, 393_216_512, 212_252_672, 5120)
"""As above with 40 heads x 128 and 36 layers: 14,368,047,104 parameters."""
GAN_TAPS = 3
"""GAN heads of the published recipe: Predict2.5 taps blocks [11, 19, 27] of its critic (MATH.md section 4)."""


def discriminator_params(width: int, taps: int = GAN_TAPS, kind: str = "attention") -> int:
    """Parameters of the library's GAN heads (``build_discriminator`` with ``DiscriminatorConfig`` defaults,
    one head per tap on features of ``width``), counted on the meta device."""
    from distill_mixins.discriminator import DiscriminatorConfig, build_discriminator

    config = DiscriminatorConfig(kind=kind, feature_dim=width, taps=tuple(range(taps)))
    with torch.device("meta"):
        return count_parameters(build_discriminator(config))


@dataclass(frozen=True)
class Recipe:
    """DMD2 on ``teacher``: student and critic copies of it, optional EMA and GAN heads, teacher weights of
    ``teacher_bytes`` (bf16 by default)."""

    teacher: TeacherArchitecture
    ema: bool = False
    discriminator: bool = False
    teacher_bytes: int = BF16

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, TeacherArchitecture):
            raise ValueError(f"Recipe.teacher={self.teacher!r} must be a TeacherArchitecture.")
        _check_bool("Recipe", "ema", self.ema)
        _check_bool("Recipe", "discriminator", self.discriminator)
        _check_int("Recipe", "teacher_bytes", self.teacher_bytes, 1)

    @property
    def label(self) -> str:
        """e.g. ``DMD2 + EMA + GAN``."""
        return "DMD2" + (" + EMA" if self.ema else "") + (" + GAN" if self.discriminator else "")


def recipe_networks(recipe: Recipe) -> tuple[NetworkMemory, ...]:
    """The networks of ``recipe``: teacher (frozen), student, critic, [discriminator], [EMA]."""
    arch = recipe.teacher
    student = trainable_network("student", arch.params, largest_block=arch.largest_unit)
    networks = [
        frozen_network("teacher", arch.params, param_bytes=recipe.teacher_bytes, largest_block=arch.largest_unit),
        student,
        trainable_network("critic", arch.params, largest_block=arch.largest_unit),
    ]
    if recipe.discriminator:
        networks.append(trainable_network("discriminator", discriminator_params(arch.width)))
    if recipe.ema:
        networks.append(ema_of(student))
    return tuple(networks)


def published_recipes(
    teachers: Sequence[TeacherArchitecture] = (COSMOS_PREDICT25_2B, COSMOS_PREDICT25_14B),
) -> list[Recipe]:
    """Every teacher with and without EMA, with and without GAN heads."""
    return [Recipe(t, ema, gan) for t in teachers for ema in (False, True) for gan in (False, True)]


def fit_mark(n_bytes: int) -> str:
    """``✓`` fits an 80 GB GPU (so also 141 GB), ``◑`` fits 141 GB only, ``✗`` neither (before activations)."""
    small, large = GPU_CAPACITIES["80 GB"], GPU_CAPACITIES["141 GB"]
    return "✓" if n_bytes <= small else "◑" if n_bytes <= large else "✗"


def recipe_table(recipes: Sequence[Recipe] | None = None, world_sizes: Sequence[int] = WORLD_SIZES) -> str:
    """Markdown: per recipe, the whole training state by kind (= per GPU under DDP) and the per-GPU total under
    DDP and FSDP at ``world_sizes``, in GiB with fit marks (:func:`fit_mark`)."""
    recipes = published_recipes() if recipes is None else recipes
    head = ["teacher", "recipe", "weights", "grads", "optimizer", "DDP"] + [f"FSDP {n}" for n in world_sizes]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for recipe in recipes:
        networks = recipe_networks(recipe)
        ddp = estimate_memory(networks, "ddp", 1)
        cells = [recipe.teacher.name, recipe.label, gib(ddp.params), gib(ddp.grads), gib(ddp.optimizer)]
        for mode, n in [("ddp", 1)] + [("fsdp", n) for n in world_sizes]:
            total = estimate_memory(networks, mode, n).total
            cells.append(f"{gib(total)} {fit_mark(total)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def network_table(recipe: Recipe) -> str:
    """Markdown: the networks of ``recipe`` with parameter counts and whole-state GiB (= per GPU under DDP)."""
    networks = recipe_networks(recipe)
    estimate = estimate_memory(networks, "ddp", 1)
    lines = [
        "| network | parameters | bytes/param | weights | grads | optimizer | total |",
        "|---|---:" + "|---:" * 5 + "|",
    ]
    for net, row in zip(networks, estimate.rows, strict=True):
        cells = [net.name, f"{net.params:,}", str(net.bytes_per_param), gib(row.params), gib(row.grads)]
        lines.append("| " + " | ".join([*cells, gib(row.optimizer), gib(row.total)]) + " |")
    return "\n".join(lines)


def transient_table(
    teachers: Sequence[TeacherArchitecture] = (COSMOS_PREDICT25_2B, COSMOS_PREDICT25_14B), unsharded_blocks: int = 2
) -> str:
    """Markdown: the optional FSDP transient, ``unsharded_blocks`` of the largest unit gathered in bf16."""
    lines = ["| teacher | largest FSDP unit (parameters) | transient, 2 units in bf16 |", "|---|---:|---:|"]
    for arch in teachers:
        networks = recipe_networks(Recipe(arch))
        transient = estimate_memory(networks, "fsdp", 8, unsharded_blocks=unsharded_blocks).transient
        lines.append(f"| {arch.name} | {arch.largest_unit:,} | {gib(transient)} GiB |")
    return "\n".join(lines)


def docs_tables() -> str:
    """The tables of ``docs/distributed.md``, regenerated."""
    parts = ["Per GPU, GiB, before activations:", "", recipe_table()]
    for arch in (COSMOS_PREDICT25_2B, COSMOS_PREDICT25_14B):
        parts += ["", f"Networks of {arch.name}, DMD2 + EMA + GAN (whole state, = per GPU under DDP):", ""]
        parts.append(network_table(Recipe(arch, ema=True, discriminator=True)))
    parts += ["", "Optional FSDP transient (not in the totals above):", "", transient_table()]
    return "\n".join(parts)


if __name__ == "__main__":
    print(docs_tables())
