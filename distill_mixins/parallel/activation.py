"""Activation checkpointing of the trainable networks' blocks (``ParallelConfig.activation_checkpointing``).

A checkpointed block keeps only its inputs during the forward and recomputes its inner activations when the
backward reaches it (PyTorch's *non-reentrant* ``torch.utils.checkpoint``), trading one extra block forward for
most of its activation memory. Losses and gradients are the same as without it (the recomputation replays the
block's forward with the forward's RNG and autocast state).

Policies (:func:`check_activation_checkpointing`):

- ``"none"``: nothing is checkpointed;
- ``"full"``: every block;
- an int ``k >= 1``: every k-th block, counted from one: the blocks with ``index % k == k - 1`` (0-based), so
  ``k = 2`` checkpoints blocks 1, 3, 5, ... (half of them, rounded down) and ``k = 1`` is ``"full"``.

How a block is checkpointed: its ``forward`` is overridden on the instance (``block.forward``, a small callable
object, never a wrapper module), so the block keeps its class, attributes, hooks and state-dict keys: checkpoint
files are the same with and without checkpointing (torch's ``checkpoint_wrapper`` would add
``_checkpoint_wrapped_module`` to every key). Forward hooks and pre-hooks registered on the block itself (e.g.
the GAN heads' :class:`~distill_mixins.discriminator.FeatureTaps`, FSDP2's unshard/reshard) run once, around the
checkpointed forward, and never during the recomputation, which calls the block's own forward directly; hooks on
modules *inside* a checkpointed block do run again during the recomputation. Under ``torch.no_grad()`` (sampling,
the frozen teacher) the block runs plainly.

Order with FSDP2: checkpoint first, then ``fully_shard`` each block and then the network (FSDP2 unshards a block's
parameters before its backward, so the recomputation sees full parameters). The library never checkpoints the
composed model itself, only blocks of its networks (:func:`checkpoint_networks`): the trainable student and
critic, and the frozen teacher when the GAN heads tap it (its tapped forward keeps a graph in student phases).

Measuring it on a CPU: :func:`saved_activation_bytes` counts the bytes of the distinct tensors a step saves for
backward (a checkpointed block saves only its inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

FIELD = "ParallelConfig.activation_checkpointing"
POLICIES = ("none", "full")
TRAINABLE_BLOCK_NETWORKS = ("net", "net_fake_score")
"""The trained networks with blocks: the student and the critic (the GAN heads have none; the EMA is never trained)."""

Policy = str | int

# ------------------------------------------------------------------------------------------------ policy


def check_activation_checkpointing(value: Policy) -> Policy:
    """``value`` if it is ``"none"``, ``"full"`` or an int ``k >= 1`` (every k-th block); else a ValueError."""
    if isinstance(value, str) and value in POLICIES:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(
        f"{FIELD}={value!r} is not valid; choose 'none', 'full', or an int k >= 1 to checkpoint every k-th block "
        "(blocks k-1, 2k-1, ...)."
    )


def checkpointed_indices(num_blocks: int, policy: Policy) -> list[int]:
    """Indices (0-based) of the blocks ``policy`` checkpoints among ``num_blocks``: none, all, or ``i % k == k - 1``."""
    policy = check_activation_checkpointing(policy)
    if policy == "none":
        return []
    k = 1 if policy == "full" else int(policy)
    return [i for i in range(num_blocks) if i % k == k - 1]


# ------------------------------------------------------------------------------------------------ blocks


def network_blocks(model: nn.Module, net: nn.Module, path: str | None = None) -> list[nn.Module]:
    """The blocks of ``net`` that activation checkpointing (and, by default, the GAN feature taps) index.

    In order of preference: ``net.<path>`` (a dotted path to an ``nn.ModuleList``/``nn.Sequential``, e.g.
    ``DiscriminatorConfig.block_path``); the host's ``model.feature_blocks(net)`` when it defines one; else the
    modules of the non-empty ``nn.ModuleList`` s that are direct children of ``net``, in registration order.
    """
    if path is not None:
        from distill_mixins.discriminator import find_blocks  # the same resolution and errors as the GAN taps

        return list(find_blocks(net, path))
    host_blocks = getattr(model, "feature_blocks", None)
    if callable(host_blocks):
        blocks = list(host_blocks(net))
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise ValueError(
                f"{type(model).__name__}.feature_blocks(net) returned {len(blocks)} items, not a non-empty list of "
                f"nn.Modules; {FIELD} needs the network's blocks. Fix feature_blocks(net) on the host."
            )
        return blocks
    blocks = [block for child in net.children() if isinstance(child, nn.ModuleList) for block in child]
    if not blocks:
        raise ValueError(
            f"{FIELD}: {type(net).__name__} has no nn.ModuleList of blocks among its direct children; define "
            f"feature_blocks(net) -> list[nn.Module] on the host ({type(model).__name__}) to name its blocks, or "
            f"set {FIELD}='none'."
        )
    return blocks


# ---------------------------------------------------------------------------------------- checkpointing


class CheckpointedForward:
    """``block.forward`` of a checkpointed block: the block's own forward under non-reentrant checkpointing.

    A callable object (not a closure) so that ``copy.deepcopy`` of a network rebinds it to the copied block and a
    pickled network stays loadable. ``previous`` is an instance-level ``forward`` the block had before (kept and
    called), or None for the class's ``forward``.
    """

    def __init__(self, block: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.block = block
        self.previous = previous

    def inner(self, *args: Any, **kwargs: Any) -> Any:
        """The block's forward without checkpointing."""
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.block).forward(self.block, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing is saved for backward: run plainly
            return self.inner(*args, **kwargs)
        function = self.inner if not kwargs else _with_kwargs(self.inner, kwargs)
        return checkpoint(function, *args, use_reentrant=False)


def _with_kwargs(function: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[..., Any]:
    """``function`` with ``kwargs`` bound (so a block keyword never collides with checkpoint's own keywords)."""

    def call(*args: Any) -> Any:
        return function(*args, **kwargs)

    return call


def is_activation_checkpointed(block: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` checkpointed ``block``."""
    return isinstance(block.__dict__.get("forward"), CheckpointedForward)


def apply_activation_checkpointing(blocks: Sequence[nn.Module], policy: Policy) -> int:
    """Checkpoint the blocks ``policy`` chooses (see :func:`checkpointed_indices`); returns how many it wrapped now.

    Idempotent: a block already checkpointed stays as it is (and is not counted again), so applying the same
    policy twice wraps nothing the second time. A block that is checkpointed but that ``policy`` does not choose
    (e.g. ``"full"`` then ``2``) is an error: call :func:`remove_activation_checkpointing` first.
    Apply it before ``fully_shard`` / DDP. State-dict keys and module classes do not change.
    """
    blocks = list(blocks)
    chosen = set(checkpointed_indices(len(blocks), policy))
    stray = [i for i, block in enumerate(blocks) if is_activation_checkpointed(block) and i not in chosen]
    if stray:
        raise ValueError(
            f"{FIELD}={policy!r}: blocks {stray} are already checkpointed by an earlier call with another policy; "
            "call remove_activation_checkpointing(blocks) before applying a new policy."
        )
    wrapped = 0
    for i in sorted(chosen):
        block = blocks[i]
        if is_activation_checkpointed(block):
            continue
        block.forward = CheckpointedForward(block, block.__dict__.get("forward"))
        wrapped += 1
    return wrapped


def remove_activation_checkpointing(blocks: Iterable[nn.Module]) -> int:
    """Undo :func:`apply_activation_checkpointing` on ``blocks``; returns how many were checkpointed."""
    removed = 0
    for block in blocks:
        wrapper = block.__dict__.get("forward")
        if not isinstance(wrapper, CheckpointedForward):
            continue
        if wrapper.previous is None:
            del block.forward
        else:
            block.forward = wrapper.previous
        removed += 1
    return removed


def graph_networks(model: nn.Module) -> list[str]:
    """Names of ``model``'s networks whose forward keeps a graph in some training step: the student ``net``, the
    critic ``net_fake_score``, and the frozen ``net_teacher`` when GAN heads tap it (``DiscriminatorConfig.source
    == "teacher"``: the generator term backpropagates through the teacher's blocks up to the last tap)."""
    names = [name for name in TRAINABLE_BLOCK_NETWORKS if name in model._modules]
    config = getattr(model, "distill_config", None)
    discriminator = getattr(config, "discriminator", None)
    if getattr(config, "gan_loss_weight", 0) > 0 and getattr(discriminator, "source", None) == "teacher":
        names.append("net_teacher")
    return names


def checkpoint_networks(
    model: nn.Module, policy: Policy, networks: Sequence[str] | None = None, path: str | None = None
) -> dict[str, int]:
    """Apply ``policy`` to the blocks (:func:`network_blocks`) of each of ``model``'s ``networks`` that exists.

    Returns ``{network name: blocks wrapped}``. ``networks`` defaults to :func:`graph_networks` (student, critic,
    and the teacher when the GAN heads tap it); the EMA never needs it. ``path`` (a dotted path to the blocks)
    defaults to the GAN taps' ``DiscriminatorConfig.block_path`` for the networks that have it when the host has no
    ``feature_blocks``: the blocks the taps use. A network with its own gradient checkpointing switched on
    (diffusers' ``is_gradient_checkpointing``) is refused: it would recompute twice.
    """
    policy = check_activation_checkpointing(policy)
    if policy == "none":  # nothing to wrap: networks without blocks are fine
        return {}
    tap_path = _tap_block_path(model) if path is None else None
    counts: dict[str, int] = {}
    for name in graph_networks(model) if networks is None else networks:
        net = model._modules.get(name)
        if net is None:
            continue
        net_path = path if path is not None else (tap_path if _has_submodule(net, tap_path) else None)
        if policy != "none" and getattr(net, "is_gradient_checkpointing", False) is True:
            raise ValueError(
                f"{FIELD}={policy!r}: {name} already uses its own gradient checkpointing; turn that off (the host's "
                f"gradient_checkpointing=False) or set {FIELD}='none'."
            )
        counts[name] = apply_activation_checkpointing(network_blocks(model, net, net_path), policy)
    return counts


def _tap_block_path(model: nn.Module) -> str | None:
    """The GAN taps' ``DiscriminatorConfig.block_path`` when the taps use it (the host has no ``feature_blocks``)."""
    if callable(getattr(model, "feature_blocks", None)):
        return None
    discriminator = getattr(getattr(model, "distill_config", None), "discriminator", None)
    return getattr(discriminator, "block_path", None)


def _has_submodule(net: nn.Module, path: str | None) -> bool:
    if path is None:
        return False
    try:
        net.get_submodule(path)
    except AttributeError:
        return False
    return True


# ------------------------------------------------------------------------------------------- measurement


def saved_activation_bytes(
    fn: Callable[[], Tensor], exclude: Iterable[nn.Module] = (), *, backward: bool = True
) -> int:
    """Bytes of the distinct tensors saved for backward while ``fn()`` builds its graph: activation memory on a CPU.

    ``fn`` runs a forward and returns a scalar loss. Every tensor autograd saves (through
    ``torch.autograd.graph.saved_tensors_hooks``) is counted once per storage (the storage's full size, deduplicated
    by its data pointer); storages of the parameters and buffers of the modules in ``exclude`` (the weights, not
    activations) are not counted. Inside a checkpointed block only the block's inputs are saved: its own saved
    tensors go to the checkpoint and are recomputed in the backward. Afterwards ``loss.backward()`` runs when
    ``backward`` (gradients accumulate into ``.grad`` as usual), else the graph is freed unused. Storages are held
    until ``fn`` returns, so a graph that ``fn`` builds and drops counts too (an upper bound on the peak).
    """
    weights = {_storage_key(t) for m in exclude for t in (*m.parameters(), *m.buffers())}
    seen: dict[int, tuple[Any, int]] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in weights and key not in seen:
            seen[key] = (_storage(tensor), _storage_bytes(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = fn()
    total = sum(nbytes for _, nbytes in seen.values())
    seen.clear()
    if backward:
        loss.backward()
    return total


def _storage(tensor: Tensor) -> Any:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage (e.g. DTensor)
        return tensor


def _storage_key(tensor: Tensor) -> int:
    storage = _storage(tensor)
    return storage.data_ptr() if isinstance(storage, torch.UntypedStorage) else id(tensor)


def _storage_bytes(tensor: Tensor) -> int:
    storage = _storage(tensor)
    if isinstance(storage, torch.UntypedStorage):
        return storage.nbytes()
    return tensor.numel() * tensor.element_size()


__all__ = [
    "FIELD",
    "POLICIES",
    "TRAINABLE_BLOCK_NETWORKS",
    "CheckpointedForward",
    "apply_activation_checkpointing",
    "check_activation_checkpointing",
    "checkpoint_networks",
    "checkpointed_indices",
    "graph_networks",
    "is_activation_checkpointed",
    "network_blocks",
    "remove_activation_checkpointing",
    "saved_activation_bytes",
]
