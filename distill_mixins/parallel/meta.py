"""Meta-device construction: build a composed model without memory, shard it, then fill each rank's shards.

A big teacher (and its copies: student, critic, EMA) never exists whole on a rank::

    with meta_init():                                      # parameters on "meta", buffers computed for real
        model = MyDistill(<host args>, distill=DMD2Config(...))
    plan = parallelize(model, ParallelConfig(mode="fsdp"))  # shards the meta parameters, builds the optimizers
    materialize(model, "teacher/transformer")               # each rank fills only its own shards

:func:`materialize` allocates every network on ``device`` (``to_empty``), then fills

- the **teacher** from the weights: one ``.safetensors`` file, a folder of shards with a
  ``*.safetensors.index.json`` (Hugging Face / diffusers ``save_pretrained`` layout), or a diffusers model folder
  (``diffusion_pytorch_model.safetensors``; pass ``subfolder="transformer"`` for a pipeline folder). With
  ``read="own"`` each rank reads only the bytes of its own shards from the file (``safe_open`` slices; the file must
  be visible to every rank); with ``read="rank0"`` rank 0 reads one whole tensor at a time and broadcasts it, and
  each rank keeps its shard (the other ranks need no access to the file);
- the **student** and the **critic**, when they are copies of the teacher (``student_net`` / ``critic_net`` unset),
  from the teacher's local shards (same placements: a local copy, no communication; different ones: the teacher
  tensor gathered one at a time);
- the **EMA** from the student (cast to its float32 like the core does);
- networks that are **not copies** (the GAN discriminator heads; a student or critic given as a factory) by
  building them again on the host, whole, from the CPU random generator (``seed``, or the global one) and copying
  each rank's part;
- the EMA step counter ``ema_num_updates`` to zero.

Then it rebuilds the optimizers (they were built over the meta parameters by :func:`parallelize`, and have no state
yet), moves the hooks :func:`parallelize` put on replicated parameters (the discriminator's gradient averaging) onto
the materialized ones, and checks that nothing is left on meta.

Buffers (the rule). Meta tensors have no values, and a buffer computed in ``__init__`` (rotary tables, Fourier
frequencies such as :class:`distill_mixins.toy.unet.FourierTime`) is in no weights file when it is non-persistent.
:func:`meta_init` therefore puts only **parameters** on meta (a global parameter-registration hook, removed on exit);
buffers are computed by ``__init__`` exactly as in eager construction and kept through :func:`materialize`.
Persistent buffers of the teacher are read from the weights like parameters. A model built under a plain
``torch.device("meta")`` works when it has no non-persistent buffers; otherwise :func:`materialize` names the buffer
and stops before reading anything.

What is bit-equal to eager construction (same teacher weights, same config, same mesh; tests/test_parallel_meta.py):
every parameter and buffer of the teacher, student, critic and EMA, every non-persistent buffer, the EMA counter, the
optimizers' parameter lists, and hence the training steps that follow. The GAN discriminator (and any network given
as a factory) equals eager construction when the CPU generator is in the same state when it is built: eager
construction builds it after the host has randomly initialised the teacher, a state meta construction cannot
reproduce without running that initialisation (its draws depend on the teacher's architecture); materialize builds it
from the generator as it is when called (or ``seed``), so ``torch.set_rng_state(state)`` with the eager state gives
the same heads. The global random state after construction differs (meta initialisation draws nothing).

Peak host memory per rank (measured: the rise of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` from just before
construction to after :func:`parallelize` (eager) or :func:`materialize` (meta); 2 gloo CPU ranks, fsdp, float32,
DMD2 with critic, EMA and conv3d GAN heads on a 5.34M-parameter conv teacher, i.e. four 21.4 MB networks; each
process first ran the same steps on a tiny model, so that one-time imports are not counted): eager construction
88.5 MB per rank (every network whole: 85.4 MB); meta construction + materialize 41.9 MB with ``read="own"`` and
42.2 MB with ``read="rank0"``, i.e. the rank's shards of the four networks and the heads (42.8 MB), nothing more: the
tensor in flight (3.5 MB, its half of the largest tensor, with ``own``; 7.1 MB, the whole largest tensor, with
``rank0``) is freed before the last networks are filled. In general: the rank's shards of every network + the largest
tensor in flight (its own slice with ``read="own"``; one whole tensor with ``read="rank0"``, or where a copy is sharded
unlike its source) + each non-copy network whole while it is rebuilt (the GAN heads). One fixed cost comes on top,
once per process and independent of the model: the first initialisation of a meta tensor imports torch's Python
meta kernels (about 800 modules, 30 to 80 MB). :class:`MaterializeReport` gives this rank's bytes read and the largest
tensor the reader held.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from distill_mixins.core import DistillationCoreMixin, local

NETWORK_ORDER = ("net_teacher", "net", "net_fake_score", "net_discriminator", "net_ema")
"""Networks in the order :func:`materialize` fills them (the EMA after the student it copies)."""
READ_MODES = ("own", "rank0")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
"""A folder's single weights file, by preference (diffusers, then transformers naming)."""
INDEX_SUFFIX = ".safetensors.index.json"
MODEL_LEVEL_COUNTERS = ("ema_num_updates",)
"""Buffers of the composed model itself that start at zero (the EMA step counter)."""

Factory = Callable[[], nn.Module]


# ------------------------------------------------------------------------------------------- construction


@contextmanager
def meta_init() -> Iterator[None]:
    """Construct modules with their parameters on the ``meta`` device (no memory, no initialisation draws) and their
    buffers computed for real, as in eager construction. Use around the composed model's construction, then
    :func:`~distill_mixins.parallel.parallelize` and :func:`materialize`.

    A parameter is allocated where its module creates it (uninitialised ``torch.empty`` costs no resident memory) and
    replaced by a meta parameter of the same shape, dtype and strides when the module registers it, so the module's
    own initialisation (``reset_parameters``) runs on meta. Parameter subclasses other than ``nn.Parameter`` are left
    as they are. Not thread-safe (a global ``nn.Module`` hook while the block runs)."""

    def to_meta(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter | None:
        if type(param) is not nn.Parameter or param.is_meta:
            return None
        meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        meta.__dict__.update(param.__dict__)
        return meta

    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def target_device(model: nn.Module, mesh: Any = None) -> torch.device:
    """Where ``model``'s networks live: its first parameter's device; for a model built on meta, ``mesh``'s device
    type, else the first sharded parameter's mesh, else this process's accelerator (CPU without one)."""
    first = next(model.parameters(), None)
    if first is None:
        return torch.device("cpu")
    if not first.is_meta:
        return first.device
    if mesh is not None:
        return torch.device(mesh.device_type)
    for p in model.parameters():
        if isinstance(p, DTensor):
            return torch.device(p.device_mesh.device_type)
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return torch.device(accelerator.type) if accelerator is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a weights source: the file that holds it, its shape and its safetensors dtype."""

    file: str
    shape: tuple[int, ...]
    dtype: str


def weight_files(path: str | Path, subfolder: str | None = None) -> tuple[str, list[Path]]:
    """``(description, safetensors files)`` of a weights source: one ``.safetensors`` file, or a folder with an
    ``*.safetensors.index.json`` (its shards) or a single safetensors file (diffusers' name first)."""
    root = Path(path) / subfolder if subfolder else Path(path)
    if root.is_file():
        if root.suffix != ".safetensors":
            raise ValueError(f"teacher weights {str(root)!r}: a single file must be a .safetensors file.")
        return str(root), [root]
    if not root.is_dir():
        raise FileNotFoundError(
            f"teacher weights {str(root)!r} do not exist: give a .safetensors file, a folder of safetensors shards "
            "with an index json, or a diffusers model folder."
        )
    indexes = sorted(root.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:  # variants (fp16, ...): prefer the default names
        preferred = [root / (name + ".index.json") for name in WEIGHT_FILES]
        indexes = [p for p in preferred if p in indexes] or indexes
    if len(indexes) > 1:
        raise ValueError(
            f"{str(root)!r} holds several weight indexes ({', '.join(p.name for p in indexes)}): pass the folder of "
            "one, or one .safetensors file."
        )
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(indexes[0])!r} has no 'weight_map' (key -> shard file).")
        files = [root / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{str(indexes[0])!r} names shards that do not exist: {', '.join(absent[:3])}.")
        return str(indexes[0]), files
    files = sorted(root.glob("*.safetensors"))
    named = [root / name for name in WEIGHT_FILES if (root / name).is_file()]
    if named:
        return str(named[0]), named[:1]
    if len(files) == 1:
        return str(files[0]), files
    pipeline = (root / "model_index.json").is_file()
    hint = " (a diffusers pipeline folder: pass subfolder='transformer')" if pipeline else ""
    raise FileNotFoundError(
        f"{str(root)!r} has no {WEIGHT_FILES[0]}, no *{INDEX_SUFFIX} and not exactly one .safetensors file{hint}."
    )


def weight_index(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of ``files`` by key (headers only: nothing is read). A key in two files is an error."""
    from safetensors import safe_open

    index: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in index:
                    raise ValueError(f"tensor {key!r} is in both {index[key].file!r} and {str(file)!r}.")
                part = f.get_slice(key)
                index[key] = TensorInfo(str(file), tuple(part.get_shape()), part.get_dtype())
    return index


class _Reader:
    """Reads the parts of tensors each rank needs (``own``), or whole tensors on rank 0, broadcast (``rank0``)."""

    def __init__(self, index: dict[str, TensorInfo], mode: str, device: torch.device, stack: ExitStack) -> None:
        self.index, self.mode, self.device, self.stack = index, mode, device, stack
        self.handles: dict[str, Any] = {}
        self.tensors_read = self.bytes_read = self.largest_read = 0
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _handle(self, file: str) -> Any:
        if file not in self.handles:
            from safetensors import safe_open

            self.handles[file] = self.stack.enter_context(safe_open(file, framework="pt", device="cpu"))
        return self.handles[file]

    def read(self, key: str, region: tuple[slice, ...]) -> Tensor:
        """The part ``region`` of tensor ``key`` (every rank calls it in the same order)."""
        info = self.index[key]
        if self.mode == "own" or not self.distributed:
            part = self._handle(info.file).get_slice(key)[region]
            self._count(part)
            return part
        if dist.get_rank() == 0:
            whole = self._handle(info.file).get_tensor(key).to(self.device)
        else:
            whole = torch.empty(info.shape, dtype=_SAFETENSORS_DTYPES[info.dtype], device=self.device)
        dist.broadcast(whole, src=0)
        self._count(whole)
        return whole[region]

    def _count(self, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.tensors_read += 1
        self.bytes_read += size
        self.largest_read = max(self.largest_read, size)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ----------------------------------------------------------------------------------------------- sharding


def shard_region(tensor: Tensor) -> tuple[slice, ...]:
    """The part of the full tensor this rank holds: everything for a plain tensor; for a DTensor sharded with
    ``Shard``/``Replicate`` placements (FSDP2, HSDP), ``torch.chunk``'s part of each sharded dimension at this rank's
    mesh coordinate (checked against the local shard's shape)."""
    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    mesh, coordinate = tensor.device_mesh, tensor.device_mesh.get_coordinate()
    if coordinate is None:
        raise RuntimeError("materialize: this rank is not in the mesh of a sharded parameter.")
    offsets, sizes = [0] * tensor.ndim, list(tensor.shape)
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(
                f"materialize: placement {placement} is not supported (only Shard(d) and Replicate, as FSDP2 uses)."
            )
        d, n, k = placement.dim, sizes[placement.dim], mesh.size(mesh_dim)
        chunk = -(-n // k)
        start = min(coordinate[mesh_dim] * chunk, n)
        offsets[d], sizes[d] = offsets[d] + start, min(chunk, n - start)
    local_shape = tuple(tensor.to_local().shape)
    if tuple(sizes) != local_shape:
        raise RuntimeError(
            f"materialize: computed shard {tuple(sizes)} of a {tuple(tensor.shape)} tensor with placements "
            f"{tensor.placements}, but the local shard is {local_shape}."
        )
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))


def _part_for(target: Tensor, source: Tensor) -> Tensor:
    """The values of ``target``'s local part taken from ``source`` (the same full tensor, sharded or not): the
    source's local shard when both are sharded alike, else a slice of the whole source (gathered if sharded)."""
    if isinstance(source, DTensor):
        if (
            isinstance(target, DTensor) and target.device_mesh == source.device_mesh
            and tuple(target.placements) == tuple(source.placements)
        ):
            return source.to_local()
        source = source.full_tensor()  # a collective: every rank runs the same sequence
    return source[shard_region(target)]


# -------------------------------------------------------------------------------------------- allocation


def _allocate(net: nn.Module, device: torch.device) -> None:
    """``net.to_empty(device)`` for a network with meta tensors, keeping the values of tensors that already have
    them (buffers computed under :func:`meta_init`) and the hooks and attributes of parameters whose object is
    replaced (plain modules: ``to_empty`` makes new ``Parameter`` objects; FSDP2 swaps its sharded ones in place)."""
    modules = list(net.modules())
    if not any(t.is_meta for m in modules for t in [*m._parameters.values(), *m._buffers.values()] if t is not None):
        return
    kept: list[tuple[dict[str, Tensor | None], str, Tensor]] = []
    params: list[tuple[nn.Module, str, nn.Parameter]] = []
    for m in modules:
        for name, p in m._parameters.items():
            if p is None:
                continue
            params.append((m, name, p))
            if not p.is_meta:
                kept.append((m._parameters, name, local(p).detach()))
        kept += [(m._buffers, name, b) for name, b in m._buffers.items() if b is not None and not b.is_meta]
    net.to_empty(device=device)
    with torch.no_grad():
        for table, name, value in kept:
            local(table[name]).copy_(value)  # type: ignore[arg-type]
    for m, name, old in params:
        new = m._parameters[name]
        if new is old or new is None:
            continue
        new.__dict__.update(old.__dict__)
        for hook in (old._post_accumulate_grad_hooks or {}).values():
            new.register_post_accumulate_grad_hook(hook)
        for hook in (old._backward_hooks or {}).values():
            new.register_hook(hook)


def _state(net: nn.Module, owner: str) -> dict[str, Tensor]:
    """``net``'s state-dict entries as its live parameters and buffers (``keep_vars``)."""
    state = net.state_dict(keep_vars=True)
    live = {id(t) for _, t in net.named_parameters(remove_duplicate=False)}
    live |= {id(t) for _, t in net.named_buffers(remove_duplicate=False)}
    foreign = [key for key, t in state.items() if id(t) not in live]
    if foreign:
        raise TypeError(
            f"materialize: {owner}.state_dict() returns tensors that are not its parameters or buffers "
            f"({foreign[0]}, ...): a state-dict hook transforms them, so they cannot be filled in place."
        )
    return state


def _meta_non_persistent(net: nn.Module) -> list[str]:
    """Non-persistent buffers of ``net`` that are on meta (no weights file holds them)."""
    out = []
    for prefix, m in net.named_modules():
        out += [f"{prefix}.{n}".lstrip(".") for n, b in m._buffers.items()
                if b is not None and b.is_meta and n in m._non_persistent_buffers_set]
    return out


@torch.no_grad()
def _copy_state(target: nn.Module, source_state: Mapping[str, Tensor], owner: str, source: str) -> None:
    state = _state(target, owner)
    missing = sorted(set(state) - set(source_state))
    if missing:
        raise ValueError(f"materialize: {owner} has {missing[0]!r}, which {source} lacks (not a copy of it?).")
    for key, tensor in state.items():
        local(tensor).copy_(_part_for(tensor, source_state[key]))


@torch.no_grad()
def _copy_buffers(target: nn.Module, source: nn.Module) -> None:
    """Every buffer of ``target`` (also the non-persistent ones) from the same-named buffer of ``source``."""
    values = dict(source.named_buffers(remove_duplicate=False))
    for name, buffer in target.named_buffers(remove_duplicate=False):
        local(buffer).copy_(_part_for(buffer, values[name]))


# ---------------------------------------------------------------------------------------------- materialize


@dataclass
class MaterializeReport:
    """What :func:`materialize` did: the device, the source, how each network was filled, and this rank's reading
    (tensors read, bytes read, the largest tensor held at once by the reader)."""

    device: str
    source: str
    read: str
    networks: dict[str, str] = field(default_factory=dict)
    tensors_read: int = 0
    bytes_read: int = 0
    largest_read_bytes: int = 0


def _copies(model: DistillationCoreMixin) -> dict[str, str]:
    """Networks that are copies of another one: ``name -> source``."""
    config = model.distill_config
    out = {}
    if config.student_net is None:
        out["net"] = "net_teacher"
    if "net_fake_score" in model._modules and config.critic_net is None:
        out["net_fake_score"] = "net_teacher"
    if "net_ema" in model._modules:
        out["net_ema"] = "net"
    return out


def _factories(model: DistillationCoreMixin, rebuild: Mapping[str, Factory] | None) -> dict[str, Factory]:
    """How to build again each network that is not a copy: a factory ``student_net`` / ``critic_net``, the DMD2
    discriminator from its config, or what ``rebuild`` gives (which wins)."""
    config = model.distill_config
    known: dict[str, Factory] = {}
    for name, spec in (("net", config.student_net), ("net_fake_score", getattr(config, "critic_net", None))):
        if spec is not None and not isinstance(spec, nn.Module) and callable(spec):
            known[name] = spec
    disc = getattr(config, "discriminator", None)
    if "net_discriminator" in model._modules and disc is not None:
        from distill_mixins.discriminator import build_discriminator

        known["net_discriminator"] = lambda: build_discriminator(disc)
    known.update(rebuild or {})
    return known


def _agree(ok: bool, device: torch.device) -> bool:
    """Whether every rank is ``ok`` (so that an error on one rank stops all of them before any collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _first(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def _check_teacher(teacher: nn.Module, index: dict[str, TensorInfo], source: str, strict: bool) -> dict[str, str]:
    """``{teacher key: file key}``; a ValueError naming missing keys, shapes that differ and (``strict``)
    unexpected keys."""
    state = _state(teacher, "net_teacher")
    groups: dict[int, list[str]] = {}
    for key, tensor in state.items():  # tied weights: one tensor under several keys, any of them in the file
        groups.setdefault(id(tensor), []).append(key)
    chosen, missing = {}, []
    for keys in groups.values():
        found = next((k for k in keys if k in index), None)
        if found is None:
            missing.append(keys[0])
        else:
            chosen.update(dict.fromkeys(keys, found))
    if missing:
        raise ValueError(
            f"{source} lacks the teacher's {_first(sorted(missing))} ({len(index)} tensors in the file, "
            f"{len(groups)} in {type(teacher).__name__}): it holds another model's weights, or a differently "
            "configured one."
        )
    for key, file_key in chosen.items():
        expected, found = tuple(state[key].shape), index[file_key].shape
        if expected != found:
            raise ValueError(
                f"{source}: tensor {file_key!r} has shape {found}, the teacher's {key!r} has {expected}: the model "
                "was configured differently (widths, layer count) from the checkpoint."
            )
    ignored = getattr(teacher, "_keys_to_ignore_on_load_unexpected", None) or []  # diffusers' rule
    unexpected = sorted(k for k in set(index) - set(chosen.values()) if not any(re.search(p, k) for p in ignored))
    if unexpected and strict:
        raise ValueError(
            f"{source} holds tensors the teacher does not have: {_first(unexpected)}; pass strict=False to ignore "
            "them, or check that the file holds this model's weights, not a whole pipeline's."
        )
    return chosen


def _check_construction(
    model: DistillationCoreMixin, copies: dict[str, str], factories: dict[str, Factory]
) -> list[str]:
    """Problems that stop :func:`materialize` before anything is read: values that no source provides."""
    problems, owned = [], set()
    for name in NETWORK_ORDER:
        net = model._modules.get(name)
        if net is None:
            continue
        owned |= {id(t) for t in [*net.parameters(), *net.buffers()]}
        if name == "net_teacher" or name in copies:
            problems += [
                f"{name}.{buffer} is a non-persistent buffer built on meta: no weights file holds it. Construct the "
                "model under distill_mixins.parallel.meta.meta_init() (buffers stay real), not torch.device('meta')."
                for buffer in _meta_non_persistent(net)
            ]
        elif name not in factories and _on_meta(net):
            problems.append(
                f"{name} was built on meta and is neither the teacher nor a copy of it: pass "
                f"rebuild={{'{name}': factory}} (a function that builds it on the host)."
            )
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta and id(t) not in owned and name not in MODEL_LEVEL_COUNTERS:
            problems.append(
                f"{name} is on meta but belongs to no distillation network ({', '.join(NETWORK_ORDER)}): build that "
                "module outside meta_init() (or load it yourself before materialize)."
            )
    return problems


def _on_meta(net: nn.Module) -> bool:
    return any(t.is_meta for t in [*net.parameters(), *net.buffers()])


def materialize(
    model: DistillationCoreMixin, weights: str | Path, *, device: torch.device | str | None = None,
    read: str = "own", subfolder: str | None = None, strict: bool = True, seed: int | None = None,
    rebuild: Mapping[str, Factory] | None = None,
) -> MaterializeReport:
    """Allocate the networks of a model built under :func:`meta_init` (after :func:`parallelize`, or without it in a
    single process) on ``device`` and fill them: the teacher from ``weights``, its copies from it, the rest rebuilt.

    ``weights``: a ``.safetensors`` file, a folder of shards with an index json, or a diffusers model folder
    (``subfolder``, e.g. ``"transformer"``). ``device``: default the device the model was sharded for (else this
    process's accelerator, else CPU). ``read``: ``"own"`` (each rank reads only its shards) or ``"rank0"`` (rank 0
    reads, broadcasts). ``strict``: file tensors the teacher lacks are an error. ``seed``: build the networks that
    are not copies (GAN heads, factory students) from ``torch.manual_seed(seed)``'s CPU generator (the global one is
    restored after); default: the global CPU generator as it is. ``rebuild``: ``{network name: factory}`` for other
    non-copy networks built on meta. Every rank must call it (collectives); a missing or misshapen tensor raises a
    ValueError naming it on every rank before anything is allocated. See the module docstring for what is bit-equal.
    """
    if not isinstance(model, DistillationCoreMixin):
        raise TypeError(f"materialize needs a composed distillation model, got {type(model).__name__}.")
    if read not in READ_MODES:
        raise ValueError(f"materialize(read={read!r}): choose one of {', '.join(READ_MODES)}.")
    if model.optimizers_built and any(opt.state for opt in model.optimizers().values()):
        raise RuntimeError("materialize after an optimizer step: call it right after parallelize, before training.")
    device = target_device(model) if device is None else torch.device(device)
    teacher = model.net_teacher
    copies, factories = _copies(model), _factories(model, rebuild)
    problems = _check_construction(model, copies, factories)
    if problems:  # the same on every rank (the same model): all of them stop here
        raise ValueError("materialize: " + " ".join(problems))
    error: BaseException | None = None
    try:
        source, index = _source_index(weights, subfolder, read, device)
        chosen = _check_teacher(teacher, index, source, strict)
    except (OSError, ValueError, TypeError) as err:
        error = err
    if not _agree(error is None, device):  # an error on one rank stops every rank before any collective
        raise error if error is not None else RuntimeError("materialize failed on another rank (see its error).")

    report = MaterializeReport(str(device), source, read)
    _allocate(teacher, device)
    report.tensors_read, report.bytes_read, report.largest_read_bytes = _read_teacher(
        teacher, index, chosen, read, device
    )
    report.networks["net_teacher"] = f"read from {source}"
    rebuilt = {name: f for name, f in factories.items() if name in model._modules and name not in copies}
    for name in NETWORK_ORDER[1:]:
        net = model._modules.get(name)
        if net is None:
            continue
        if name in copies:
            _allocate(net, device)
            source_net = model._modules[copies[name]]
            _copy_state(net, _state(source_net, copies[name]), name, copies[name])
            if name == "net_ema":
                _copy_buffers(net, source_net)  # the core's EMA copies every buffer of the student
            report.networks[name] = f"copied from {copies[name]}"
        elif name in rebuilt and _on_meta(net):
            fresh = _build(rebuilt[name], seed)
            _allocate(net, device)
            _copy_state(net, _state(fresh, f"rebuilt {name}"), name, f"the rebuilt {name}")
            _copy_buffers(net, fresh)
            report.networks[name] = "rebuilt" + (f" (seed {seed})" if seed is not None else "")
        else:
            report.networks[name] = "kept (not on meta)"
    for name in MODEL_LEVEL_COUNTERS:
        buffer = model._buffers.get(name)
        if buffer is not None and buffer.is_meta:
            model._buffers[name] = torch.zeros_like(buffer, device=device)
    _rebuild_optimizers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"materialize left {_first(left)} on meta.")
    return report


@torch.no_grad()
def _read_teacher(
    teacher: nn.Module, index: dict[str, TensorInfo], chosen: dict[str, str], read: str, device: torch.device
) -> tuple[int, int, int]:
    """Fill the allocated teacher from the weights; ``(tensors, bytes, largest)`` read. The files are closed (and
    unmapped) on return."""
    with ExitStack() as stack:
        reader = _Reader(index, read, device, stack)
        for key, tensor in _state(teacher, "net_teacher").items():
            local(tensor).copy_(reader.read(chosen[key], shard_region(tensor)))
        counts = reader.tensors_read, reader.bytes_read, reader.largest_read
        reader.handles.clear()
    return counts


def _source_index(
    weights: str | Path, subfolder: str | None, read: str, device: torch.device
) -> tuple[str, dict[str, TensorInfo]]:
    """The source's description and tensor index: read by every rank (``own``), or by rank 0 and broadcast."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if read == "own" or not distributed:
        source, files = weight_files(weights, subfolder)
        return source, weight_index(files)
    message: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            source, files = weight_files(weights, subfolder)
            message = [(source, weight_index(files))]
        except (OSError, ValueError) as err:
            message = [err]
    dist.broadcast_object_list(message, src=0, device=device if device.type != "cpu" else None)
    if isinstance(message[0], BaseException):
        raise ValueError(f"rank 0 could not read the teacher weights: {message[0]}")
    return message[0]


def _build(factory: Factory, seed: int | None) -> nn.Module:
    """``factory()`` on the host, from the global CPU generator or, with ``seed``, from a seeded one."""
    if seed is None:
        return factory()
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        return factory()
    finally:
        torch.set_rng_state(state)


def _rebuild_optimizers(model: DistillationCoreMixin) -> None:
    """Optimizers (and schedulers) built over the meta parameters hold stale tensors: build them again (they have no
    state yet, so this is what eager construction would have built)."""
    if model.optimizers_built:
        model.reset_optimizers()
        model.optimizers()


__all__ = [
    "MaterializeReport",
    "TensorInfo",
    "materialize",
    "meta_init",
    "shard_region",
    "target_device",
    "weight_files",
    "weight_index",
]
