"""Sharded networks in :class:`DistillCheckpointer`: one ``torch.distributed.checkpoint`` (DCP) folder per network.

A network is *sharded* when its parameters are DTensors (FSDP2 ``fully_shard`` or ``replicate``). Such a network
and its optimizer go to ``<stem>.dcp/`` (one ``__<rank>_0.distcp`` file per rank and a ``.metadata`` index), which
loads at any world size, also into an unsharded network in a single process without a process group.

Loading never runs pickled code: the DCP index is read with an unpickler that admits only DCP's own metadata
classes, and DCP's non-tensor entries (optimizer hyperparameters) must pass ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distill_mixins.checkpointer.files import CheckpointError
from torch import Tensor, nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

T = TypeVar("T")
MODEL, OPTIM = "model", "optim"
FULL = StateDictOptions(full_state_dict=True)


def is_sharded(net: nn.Module) -> bool:
    """Whether ``net``'s parameters are DTensors (FSDP2 ``fully_shard`` / ``replicate``, or others).

    An FSDP2 module inside ``net`` counts too: after a forward without backward (e.g. a no-grad sample), an FSDP2
    root keeps plain unsharded parameters until it reshards, and its state dict is sharded all the same.
    """
    fsdp = any(isinstance(m, FSDPModule) for m in net.modules())
    return fsdp or any(isinstance(p, DTensor) for p in net.parameters())


def rng_file(rank: int) -> str:
    """Checkpoint-relative file of rank ``rank``'s RNG states in a sharded checkpoint."""
    return f"rng/rank_{rank}.pt"


def process_rank() -> int:
    """This process's rank in the default process group, 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Ranks:
    """The processes that take part in one save or load.

    Every rank of the default process group when a checkpointed network is sharded (then every rank must call
    ``save``/``load``/``resume``); otherwise this process alone, and nothing below communicates.
    """

    def __init__(self, networks: Iterable[nn.Module]) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        self.active = initialized and any(is_sharded(net) for net in networks)
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes the shared files (manifest, pointer, unsharded networks): rank 0."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing when inactive)."""
        if self.active:
            dist.barrier()

    def from_rank0(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 and its result (or its error, as a :class:`CheckpointError`) given to every rank."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.writer:
            try:
                box[0] = ("ok", fn())
            except Exception as caught:  # noqa: BLE001 - every rank must learn of it, or the others hang
                error, box[0] = caught, ("error", f"{type(caught).__name__}: {caught}")
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, value = box[0]
        if status != "ok":
            raise CheckpointError(f"rank 0 failed: {value}")
        return value


# --------------------------------------------------------------------------------------------- safe reading


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` index only: DCP metadata classes, torch sizes, dtypes and layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        if _allowed(module, name):
            return super().find_class(module, name)
        raise CheckpointError(f"the DCP index refers to {module}.{name}, which a checkpoint index never holds.")


def _allowed(module: str, name: str) -> bool:
    if module == dcp_metadata.__name__:
        return isinstance(getattr(dcp_metadata, name, None), type)
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
    }


class _SafeReader(FileSystemReader):
    """A DCP file reader whose index is read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner, with every non-tensor entry first checked by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: BinaryIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"DCP entry '{read_item.dest_index.fqn}' is not plain data: {error}") from error
        super().load_bytes(read_item, io.BytesIO(data))


def saved_keys(folder: Path) -> set[str]:
    """The flattened keys (``model.<fqn>``, ``optim.state.<fqn>.<name>``, ...) a DCP folder holds."""
    return set(_SafeReader(folder).read_metadata().state_dict_metadata)


def load_dcp(state: dict[str, Any], folder: Path, *, no_dist: bool) -> None:
    """``dcp.load`` of ``state`` from ``folder`` through the safe reader and planner; failures as CheckpointError."""
    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it loads in this process alone, as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafePlanner(), no_dist=no_dist)
    except CheckpointException as error:  # one rank's failure, reported on every rank
        cause = next(iter(error.failures.values()))[0]
        if isinstance(cause, CheckpointError):
            raise cause from error
        raise CheckpointError(f"{folder} does not fit the network: {cause}") from error


# ------------------------------------------------------------------------------------------ save and load


def save_network(net: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
    """Collective: every rank writes its shards of ``net`` (and of ``optimizer`` once it has state) to ``folder``.

    An optimizer that has never stepped is left out: reading its state would initialise it (a zero step).
    """
    state: dict[str, Any] = {MODEL: get_model_state_dict(net)}
    if optimizer is not None and optimizer.state:
        state[OPTIM] = get_optimizer_state_dict(net, optimizer)
    dcp.save(state, storage_writer=FileSystemWriter(folder))


def load_network(net: nn.Module, optimizer: torch.optim.Optimizer | None, folder: Path) -> None:
    """Load ``net`` (and ``optimizer``, when given and saved) from DCP folder ``folder``, resharding as needed.

    Collective when ``net`` is sharded; a plain ``net`` reads the full tensors in this process alone.
    """
    keys = saved_keys(folder)
    state: dict[str, Any] = {MODEL: get_model_state_dict(net)}
    _check_keys(folder, keys, {f"{MODEL}.{k}" for k in state[MODEL]}, MODEL, "weights")
    if optimizer is not None and any(k.startswith(f"{OPTIM}.") for k in keys):
        with _all_require_grad(optimizer):  # so a fresh optimizer gets a state entry for every parameter
            state[OPTIM] = get_optimizer_state_dict(net, optimizer)
        wanted = {f"{OPTIM}.state.{fqn}.{name}" for fqn, entry in state[OPTIM]["state"].items() for name in entry}
        _check_keys(folder, keys, wanted, f"{OPTIM}.state", "optimizer states")
    load_dcp(state, folder, no_dist=not (is_sharded(net) and dist.is_initialized()))
    set_model_state_dict(net, state[MODEL])
    if OPTIM in state:
        set_optimizer_state_dict(net, optimizer, state[OPTIM])


def _check_keys(folder: Path, saved: set[str], wanted: set[str], prefix: str, what: str) -> None:
    saved = {k for k in saved if k.startswith(prefix + ".")}
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not fit the network: {what} missing from the checkpoint {missing[:3]}, in the checkpoint "
            f"but not the network {unexpected[:3]}. Build the model with the same networks and settings it was "
            "saved with."
        )


@contextmanager
def _all_require_grad(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def read_full_state(folder: Path) -> dict[str, Tensor]:
    """The full (unsharded) ``state_dict`` of the network saved in DCP folder ``folder``, read in this process."""
    entries = _SafeReader(folder).read_metadata().state_dict_metadata
    prefix = f"{MODEL}."
    plain = [k for k, v in entries.items() if k.startswith(prefix) and not isinstance(v, TensorStorageMetadata)]
    if plain:
        raise CheckpointError(f"{folder} holds non-tensor entries {plain[:3]}; safetensors stores tensors only.")
    model = {
        k[len(prefix):]: torch.empty(v.size, dtype=v.properties.dtype)
        for k, v in entries.items() if k.startswith(prefix)
    }
    state = {MODEL: model}
    load_dcp(state, folder, no_dist=True)
    return state[MODEL]


def set_full_state(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Collective: load a full (unsharded) ``state_dict`` into the sharded ``net``; each rank keeps its shards."""
    try:
        set_model_state_dict(net, state, options=FULL)
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"the saved weights do not fit the sharded network: {error}") from error


def set_full_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Collective: load ``optimizer.state_dict()`` of an unsharded run into the optimizer of the sharded ``net``."""
    names = {id(p): name for name, p in net.named_parameters()}
    fqn = {}
    for saved, current in zip(state["param_groups"], optimizer.param_groups, strict=True):
        fqn.update({index: names[id(p)] for index, p in zip(saved["params"], current["params"], strict=True)})
    full = {
        "state": {fqn[index]: value for index, value in state["state"].items()},
        "param_groups": [{**group, "params": [fqn[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(net, optimizer, full, options=FULL)
