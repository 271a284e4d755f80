"""LoRA distillation: the student and the critic are peft adapters on ONE frozen base network (issue 22).

With ``DistillConfig.lora = LoraSpec(...)`` the core does not copy the teacher. It injects named LoRA adapters
(peft's functional API, :func:`peft.functional.inject_adapter_in_model`) into the host's own network, which becomes
the **base**: ``"student"``, ``"critic"`` (methods with a critic, unless ``LoraSpec.critic=False``) and ``"ema"``
(with ``DistillConfig.ema``). The core's networks become thin views of that one base:

- ``net`` / ``net_fake_score`` / ``net_ema``: :class:`AdapterView` s. Calling one runs the base with only its
  adapter active; its parameters (what an optimizer holds, what the EMA averages, what a checkpoint saves) are its
  adapter's ``lora_A`` / ``lora_B`` weights and nothing else;
- ``net_teacher``: a :class:`TeacherView`, the base with every adapter off. Its parameters and state dict are the
  base's own weights (the adapters left out); it is never saved.

Every call goes through :func:`adapter_scope`, one context manager that selects the adapter (peft's ``set_adapter``
/ ``enable_adapters``) and afterwards restores, also when the call raises, every adapter layer's active adapter and
enabled flag, every ``requires_grad`` flag of the base (peft's switching changes them; the phase, not peft, decides
what trains) and every module's train/eval mode. Method code (kd.py, dmd2.py) does not change: it calls
``self.net``, ``self.net_teacher`` and ``self.net_fake_score`` as before.

The base's weights have ``requires_grad=False`` and never change. Adapters are held in float32 (also on a bf16
base; under bf16 autocast they compute in bf16, their weights and gradients stay float32). At initialisation
``lora_B = 0``, so the student (and the critic) equal the teacher bit for bit.

Export (:func:`adapter_to_diffusers`, :func:`merge_adapter`; ``distill-mixins extract-weights --lora`` /
``--merge --base``): the student adapter in the PEFT key format diffusers' LoRA loaders read
(``transformer.<module>.lora_A.weight``, with its ``LoraConfig`` in the safetensors metadata), or the base's full
state dict with the adapter merged in (``W + alpha / rank * B @ A``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from distill_mixins.config import DistillConfig, LoraSpec

if TYPE_CHECKING:
    from distill_mixins.core import DistillationCoreMixin

STUDENT, CRITIC, EMA = "student", "critic", "ema"
"""Adapter names on the base: the student's, the critic's and the student's EMA."""
VIEW_PREFIX = "adapter."
"""State-dict prefix of an :class:`AdapterView`'s keys (``adapter.<module>.lora_A.weight``)."""
ADAPTER_LAYER_NAMES = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})
"""Submodule names under which peft's LoRA layers keep adapter weights."""
DIFFUSERS_PREFIX = "transformer"
"""Key prefix of a diffusers LoRA file for a pipeline's transformer (``WanLoraLoaderMixin`` and others)."""
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry where diffusers reads an adapter's ``LoraConfig`` (``LORA_ADAPTER_METADATA_KEY``)."""
INSTALL_HINT = "pip install 'distill-mixins[lora]'"


def require_peft() -> Any:
    """The ``peft`` module, or an ImportError that says how to install it."""
    try:
        import peft
        from peft.tuners.lora import LoraLayer  # noqa: F401 - the LoRA tuner must be importable too
    except ImportError as error:
        raise ImportError(
            f"DistillConfig.lora (LoRA distillation) needs the peft package: {INSTALL_HINT}. ({error})"
        ) from error
    return peft


# ------------------------------------------------------------------------------------------------ the base


@dataclass
class LoraBase:
    """The one base network and its LoRA layers (module path -> peft layer), shared by every view."""

    base: nn.Module
    layers: dict[str, nn.Module]
    spec: LoraSpec
    adapters: tuple[str, ...]

    def adapter_parameters(self, adapter: str) -> list[Tensor]:
        """The current parameter objects of ``adapter`` (live: FSDP replaces them when it shards)."""
        return [p for layer in self.layers.values() for p in _adapter_modules(layer, adapter).parameters()]


def _adapter_modules(layer: nn.Module, adapter: str) -> nn.ModuleDict:
    return nn.ModuleDict({"lora_A": layer.lora_A[adapter], "lora_B": layer.lora_B[adapter]})


def is_adapter_name(name: str) -> bool:
    """Whether a parameter or state-dict name of the base belongs to an adapter (``...lora_A.student.weight``)."""
    return any(part in ADAPTER_LAYER_NAMES for part in name.split("."))


@contextmanager
def adapter_scope(lora: LoraBase, adapter: str | None, training: bool = False) -> Iterator[None]:
    """Run the base with only ``adapter`` active (``None``: every adapter off, i.e. the teacher), in train mode when
    ``training``, and restore on exit, also on an exception: each LoRA layer's active adapter and enabled flag, every
    ``requires_grad`` flag of the base's parameters, and every module's train/eval mode.

    peft's switching (``set_adapter``, ``enable_adapters``) sets ``requires_grad`` of the adapters it (de)activates;
    the flags are put back before the body runs, so the current phase decides what gets gradients."""
    from peft.functional import set_adapter

    base = lora.base
    layers = list(lora.layers.values())
    states = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for p in base.parameters()]
    modes = [(m, m.training) for m in base.modules()]

    def restore_flags() -> None:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)

    try:
        if adapter is None:
            for layer in layers:
                layer.enable_adapters(False)
        else:
            set_adapter(base, adapter)
            for layer in layers:
                layer.enable_adapters(True)
        restore_flags()
        if base.training != training or any(m.training != training for m, _ in modes):
            base.train(training)
        yield
    finally:
        for layer, active, disabled in states:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        restore_flags()
        for m, mode in modes:
            m.training = mode


class _Forwarding(nn.Module):
    """Attribute lookups the view does not answer go to the base (``net.config``, ``net.blocks``, ...), so host
    code written for the network (``predict``, ``feature_blocks``, gradient checkpointing switches) works on views."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            lora = self.__dict__.get("_lora")
            if lora is None or name.startswith("__"):
                raise
            return getattr(lora.base, name)

    @property
    def lora_base(self) -> nn.Module:
        """The base network the view runs (its weights' dtype is the host's compute dtype)."""
        return self.__dict__["_lora"].base


class AdapterView(_Forwarding):
    """One adapter of the base as a network: calling it runs the base with only this adapter active (in this view's
    train/eval mode); its parameters and state dict are the adapter's weights only
    (``adapter.<module>.lora_A.weight``, ``adapter.<module>.lora_B.weight``), never the base's."""

    def __init__(self, lora: LoraBase, adapter: str) -> None:
        super().__init__()
        self.__dict__["_lora"] = lora  # not registered: the base is registered once, in the teacher view
        self.adapter_name = adapter
        tree = nn.Module()
        for path, layer in lora.layers.items():
            node = tree
            for part in path.split("."):
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]  # type: ignore[assignment]
            node.add_module("lora_A", layer.lora_A[adapter])
            node.add_module("lora_B", layer.lora_B[adapter])
            node.add_module("lora_dropout", layer.lora_dropout[adapter])
        self.adapter = tree

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        lora: LoraBase = self.__dict__["_lora"]
        with adapter_scope(lora, self.adapter_name, self.training):
            return lora.base(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, base={type(self.__dict__['_lora'].base).__name__}"


class TeacherView(_Forwarding):
    """The base with every adapter off: the teacher. ``base`` is the one registered copy of the base network (with
    the adapters inside it); :meth:`named_parameters` and :meth:`state_dict` leave the adapters out, so the teacher's
    parameters are exactly the frozen base weights."""

    def __init__(self, lora: LoraBase) -> None:
        super().__init__()
        self.__dict__["_lora"] = lora
        self.base = lora.base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapter_scope(self.__dict__["_lora"], None, False):
            return self.base(*args, **kwargs)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if not is_adapter_name(name):
                yield name, p

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix) and is_adapter_name(k[len(prefix):])]:
            del state[key]
        return state


def _keep_base_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook of the teacher view: refuse teacher keys, keep the base (and the adapters inside it, which the
    adapter views load under their own names)."""
    leaked = [key for key in state_dict if key.startswith(prefix)]
    if leaked:
        raise ValueError(
            f"state dict holds teacher weights ({leaked[0]}, ...): the LoRA base comes from the host, never from a "
            f"distillation checkpoint. Drop the '{prefix}' keys."
        )
    state_dict.update(nn.Module.state_dict(module, prefix=prefix))


def lora_base(model: nn.Module) -> LoraBase | None:
    """The LoRA base of a composed model (``None`` unless it was built with ``DistillConfig.lora``)."""
    teacher = getattr(model, "_modules", {}).get("net_teacher")
    return teacher.__dict__["_lora"] if isinstance(teacher, TeacherView) else None


def is_view(net: nn.Module) -> bool:
    """Whether ``net`` is a view of a LoRA base (an adapter or the teacher), not a network of its own."""
    return isinstance(net, (AdapterView, TeacherView))


# ------------------------------------------------------------------------------------------------ building


def build_lora_networks(model: DistillationCoreMixin, config: DistillConfig) -> None:
    """The core's ``_build_networks`` with ``config.lora``: adapters on ``model.net`` (the host's network) and the
    views ``net``, ``net_fake_score``, ``net_teacher``, ``net_ema`` over it; no copy of the base."""
    from distill_mixins.core import _instantiate, trained_parameter_names

    spec = config.lora
    assert spec is not None
    require_peft()
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    base: nn.Module = model.net
    if any(isinstance(m, BaseTunerLayer) for m in base.modules()):
        raise ValueError(
            f"{type(config).__name__}.lora: the host's network ({type(base).__name__}) already carries peft adapters "
            "(e.g. it is the base of another LoRA distillation model): build the model on a network without "
            "adapters (merge or unload them first), or start from the previous stage's adapter with "
            "load_student_state_dict."
        )
    critic_copy = None
    if model.uses_critic and not spec.critic:  # a full critic: copied before any adapter is injected
        critic_copy = _instantiate(config.critic_net, base, "critic_net")
    base.requires_grad_(False)
    adapters = (STUDENT,) + ((CRITIC,) if model.uses_critic and spec.critic else ()) + (
        (EMA,) if config.ema is not None else ()
    )
    target = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    peft_config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=target, lora_dropout=spec.dropout, init_lora_weights=True,
        bias="none",
    )
    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        for name in adapters:
            try:
                inject_adapter_in_model(peft_config, base, adapter_name=name)
            except ValueError as error:
                raise ValueError(
                    f"{type(config).__name__}.lora: LoraSpec.target_modules={spec.target_modules!r} does not fit "
                    f"{type(base).__name__}: {error}"
                ) from error
    layers = {path: m for path, m in base.named_modules() if isinstance(m, BaseTunerLayer)}
    _check_layers(layers, spec, type(base).__name__)
    lora = LoraBase(base, layers, spec, adapters)
    with torch.no_grad():
        for name in adapters:  # adapters in float32, also on a bf16 base
            for p in lora.adapter_parameters(name):
                if p.dtype != torch.float32:
                    p.data = p.data.float()
        if EMA in adapters:  # the EMA starts as the student
            for p_ema, p in zip(lora.adapter_parameters(EMA), lora.adapter_parameters(STUDENT), strict=True):
                p_ema.copy_(p)
    for layer in layers.values():  # at rest the base is the teacher
        layer.enable_adapters(False)
    base.requires_grad_(False)
    model.net = AdapterView(lora, STUDENT).requires_grad_(True).train()
    if critic_copy is not None:
        model.net_fake_score = critic_copy
    elif CRITIC in adapters:
        model.net_fake_score = AdapterView(lora, CRITIC).requires_grad_(True).train()
    model._trained_names = {
        name: frozenset(n for n, _ in net.named_parameters()) if isinstance(net, AdapterView)
        else trained_parameter_names(net)
        for name, net in model.trainable_networks().items()
    }
    teacher = TeacherView(lora).eval()
    teacher.register_load_state_dict_pre_hook(_keep_base_on_load)
    model.net_teacher = teacher
    if EMA in adapters:
        model.net_ema = AdapterView(lora, EMA).requires_grad_(False).eval()
        model.register_buffer("ema_num_updates", torch.zeros((), dtype=torch.long))


def _check_layers(layers: dict[str, nn.Module], spec: LoraSpec, base_name: str) -> None:
    from peft.tuners.lora import Linear as LoraLinear

    if not layers:
        raise ValueError(f"LoraSpec.target_modules={spec.target_modules!r} matched no layer of {base_name}.")
    other = sorted(path for path, layer in layers.items() if not isinstance(layer, LoraLinear))
    if other:
        raise ValueError(
            f"LoraSpec.target_modules={spec.target_modules!r} matched {other[0]} ({type(layers[other[0]]).__name__}): "
            "LoRA distillation adapts linear layers only; name linear projections (attention q/k/v/out, MLP)."
        )


# ------------------------------------------------------------------------------------------------ parallel


def lora_blocks(model: nn.Module) -> list[nn.Module]:
    """The base's blocks (the host's ``feature_blocks`` or its ``nn.ModuleList`` children), for sharding units and
    activation checkpointing: each block holds its layers' base weights and every adapter of them."""
    from distill_mixins.parallel.activation import network_blocks

    lora = lora_base(model)
    assert lora is not None
    return network_blocks(model, lora.base)


def checkpoint_lora_base(model: nn.Module, policy: Any) -> dict[str, int]:
    """Activation checkpointing of a LoRA model: the base's blocks, once (the student, the critic and the teacher
    all run them). Returns ``{"net_teacher": blocks wrapped}`` (``{}`` for ``"none"``).

    The backward recomputes a block after :func:`adapter_scope` has exited, so each checkpointed forward records the
    adapter state it ran with (active adapter and enabled flag of the block's LoRA layers, ``requires_grad`` flags,
    train modes) and the recomputation runs in that state (``checkpoint(context_fn=...)``), restoring afterwards."""
    from distill_mixins.parallel.activation import (
        CheckpointedForward,
        apply_activation_checkpointing,
        check_activation_checkpointing,
    )

    policy = check_activation_checkpointing(policy)
    if policy == "none":
        return {}
    lora = lora_base(model)
    assert lora is not None
    blocks = lora_blocks(model)
    wrapped = apply_activation_checkpointing(blocks, policy)
    for block in blocks:
        wrapper = block.__dict__.get("forward")
        if type(wrapper) is CheckpointedForward:
            layers = [m for m in block.modules() if any(m is layer for layer in lora.layers.values())]
            block.forward = _adapter_checkpointed(CheckpointedForward)(block, wrapper.previous, layers)
    return {"net_teacher": wrapped}


def _adapter_checkpointed(base_class: type) -> type:
    """A :class:`~distill_mixins.parallel.activation.CheckpointedForward` whose recomputation runs in the adapter
    state of the forward (a subclass, so ``is_activation_checkpointed`` and its removal still apply)."""
    from torch.utils.checkpoint import checkpoint

    from distill_mixins.parallel.activation import _with_kwargs

    class AdapterCheckpointedForward(base_class):  # type: ignore[misc,valid-type]
        def __init__(self, block: nn.Module, previous: Any, layers: list[nn.Module]) -> None:
            super().__init__(block, previous)
            self.layers = layers

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return self.inner(*args, **kwargs)
            state = _block_state(self.block, self.layers)
            function = self.inner if not kwargs else _with_kwargs(self.inner, kwargs)
            return checkpoint(function, *args, use_reentrant=False,
                              context_fn=lambda: (_null_context(), _recompute_in(self.block, self.layers, state)))

    return AdapterCheckpointedForward


def _block_state(block: nn.Module, layers: list[nn.Module]) -> tuple[list[Any], list[Any], list[Any]]:
    return (
        [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers],
        [(p, p.requires_grad) for p in block.parameters()],
        [(m, m.training) for m in block.modules()],
    )


@contextmanager
def _null_context() -> Iterator[None]:
    yield


@contextmanager
def _recompute_in(block: nn.Module, layers: list[nn.Module], state: tuple[list[Any], list[Any], list[Any]]):
    """Put the block's LoRA layers, ``requires_grad`` flags and modes into ``state`` (the forward's), restore after."""
    now = _block_state(block, layers)

    def put(target: tuple[list[Any], list[Any], list[Any]]) -> None:
        for layer, active, disabled in target[0]:
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for p, flag in target[1]:
            p.requires_grad_(flag)
        for m, mode in target[2]:
            m.training = mode

    try:
        put(state)
        yield
    finally:
        put(now)


# ------------------------------------------------------------------------------------------------ export


def spec_scaling(spec: LoraSpec | dict[str, Any]) -> float:
    """``alpha / rank``: the factor of ``B @ A`` in every adapted layer."""
    rank, alpha = (spec.rank, spec.alpha) if isinstance(spec, LoraSpec) else (spec["rank"], spec["alpha"])
    return float(alpha) / float(rank)


def adapter_modules(state: dict[str, Tensor]) -> list[str]:
    """Module paths of an adapter view's state dict (``adapter.<path>.lora_A.weight`` -> ``<path>``), sorted."""
    paths = set()
    for key in state:
        if not key.startswith(VIEW_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"'{key}' is not a LoRA adapter key (adapter.<module>.lora_A/lora_B.weight): the "
                             "checkpoint's student is not a LoRA adapter (trained without DistillConfig.lora?).")
        paths.add(key[len(VIEW_PREFIX):].rsplit(".", 2)[0])
    return sorted(paths)


def adapter_to_diffusers(
    state: dict[str, Tensor], spec: LoraSpec | dict[str, Any], prefix: str = DIFFUSERS_PREFIX
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """An adapter view's state dict as a diffusers LoRA file: PEFT-format keys ``<prefix>.<module>.lora_A.weight``
    and the safetensors metadata diffusers reads (``lora_adapter_metadata``: the ``LoraConfig`` fields under
    ``<prefix>.``), so ``pipe.load_lora_weights(folder, weight_name=file)`` (``WanLoraLoaderMixin``) or
    ``transformer.load_lora_adapter(...)`` rebuilds the same adapter. The scaling ``alpha / rank`` is folded into
    ``lora_B`` and the file says ``lora_alpha = r``, so a loader that ignores the metadata (and takes alpha = rank,
    diffusers' default without it) computes the same output."""
    spec_dict = spec if isinstance(spec, dict) else {"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout}
    modules = adapter_modules(state)
    scaling = spec_scaling(spec_dict)
    tensors = {}
    for key, value in state.items():  # alpha / rank folded into lora_B: loaders that assume alpha = rank agree
        folded = (value.double() * scaling).to(value.dtype) if key.endswith(".lora_B.weight") else value
        tensors[f"{prefix}.{key[len(VIEW_PREFIX):]}"] = folded.contiguous()
    config = {"r": int(spec_dict["rank"]), "lora_alpha": int(spec_dict["rank"]), "target_modules": modules,
              "lora_dropout": float(spec_dict.get("dropout", 0.0)), "bias": "none", "use_dora": False,
              "lora_bias": False, "init_lora_weights": True}
    metadata = {DIFFUSERS_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
                "format": "pt"}
    return tensors, metadata


@torch.no_grad()
def merge_adapter(
    base_state: dict[str, Tensor], state: dict[str, Tensor], spec: LoraSpec | dict[str, Any]
) -> dict[str, Tensor]:
    """The base network's plain state dict with the adapter merged: ``W + alpha / rank * B @ A`` for every adapted
    linear layer (computed in float64, stored in ``W``'s dtype); every other tensor as in ``base_state``."""
    scaling = spec_scaling(spec)
    merged = dict(base_state)
    for path in adapter_modules(state):
        key = f"{path}.weight"
        if key not in base_state:
            raise ValueError(f"the base weights have no '{key}' for the adapter of module {path}: wrong --base file?")
        a, b = state[f"{VIEW_PREFIX}{path}.lora_A.weight"], state[f"{VIEW_PREFIX}{path}.lora_B.weight"]
        w = base_state[key]
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"'{key}' has shape {tuple(w.shape)}; the adapter needs ({b.shape[0]}, {a.shape[1]}).")
        merged[key] = (w.double() + scaling * (b.double() @ a.double())).to(w.dtype).contiguous()
    return merged


def checkpoint_lora_spec(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``DistillConfig.lora`` of a checkpoint's resolved config (``config.json``), or None."""
    distill = config.get("distill", config) if isinstance(config, dict) else None
    spec = distill.get("lora") if isinstance(distill, dict) else None
    return spec if isinstance(spec, dict) else None


__all__ = [
    "AdapterView",
    "LoraBase",
    "LoraSpec",
    "TeacherView",
    "adapter_scope",
    "adapter_to_diffusers",
    "build_lora_networks",
    "is_view",
    "lora_base",
    "merge_adapter",
    "require_peft",
]
