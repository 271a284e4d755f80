"""The host contract: the one thing every distillation method depends on.

A *host* is the user's own diffusion model class (an ``nn.Module``). The composed class
``class MyDistill(DMD2Mixin, MyHost)`` is checked twice: when it is *created*
(member functions present, mixins before the host in the bases) and when it is
*constructed* (``net`` and the schedule attributes set and valid). Both raise a
``TypeError`` that names the member and shows the fix.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

SCALINGS = ("edm", "rectified_flow", "trigflow")
PREDICTION_TYPES = ("x0", "eps", "v", "velocity")


@runtime_checkable
class DiffusionHost(Protocol):
    """What a host model provides (ARCHITECTURE.md, "The host contract")."""

    net: nn.Module
    """The trained teacher network. After composition ``net`` is the student."""
    scaling: str
    """Noise schedule: ``"edm"`` (x = x0 + sigma eps), ``"rectified_flow"`` (x = (1-tau) x0 + tau eps)
    or ``"trigflow"`` (x = cos t x0 + sin t sigma_data eps)."""
    prediction_type: str
    """What ``predict`` returns: ``"x0"``, ``"eps"``, ``"v"`` (VP) or ``"velocity"`` (eps - x0)."""
    sigma_data: float
    """Data standard deviation of the schedule (EDM 0.5, rectified flow 1.0)."""

    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """Raw output of ``net`` in the native parameterization.

        x: native state (B, C, T, H, W); time: native time (sigma, tau or t), shape (B,)
        or per-frame (B, T) if ``supports_per_frame_time``; returns a tensor shaped like x.
        """
        ...

    def get_data_and_condition(self, batch: Any) -> tuple[Tensor, Any, Any]:
        """``(x0, condition, uncondition)``: latent video (B, C, T, H, W) and the CFG conditions."""
        ...


@runtime_checkable
class ContextParallelHost(Protocol):
    """Optional capability: a host whose networks can run context-parallel (ARCHITECTURE.md, "Distributed").

    Needed by ``ParallelConfig(cp=N)`` with N > 1; :func:`~distill_mixins.parallel.parallelize` calls it once per
    network (teacher, student, critic, EMA) before sharding.
    """

    def enable_context_parallel(self, net: nn.Module, group: Any) -> None:
        """Make ``net``'s forward context-parallel over the process ``group`` (``None``: off).

        Every rank of the group passes the same full inputs and gets the same full output (B, C, T, H, W); inside,
        each rank keeps a contiguous chunk of the tokens (rank order) and attention runs over the group (Ulysses).
        Gradient convention: each rank's parameter gradients cover its own tokens, so their sum over the group is
        the one-process gradient (the gather's backward keeps the local chunk). Outputs of the blocks, which GAN
        feature taps record, are the local chunks (B, S/P, D). Raise a ValueError naming the sizes when the
        group size does not divide the heads.
        """
        ...


@runtime_checkable
class CausalHost(Protocol):
    """Optional capability of a causal (chunk-by-chunk) student host (ARCHITECTURE.md, "Causal students"; MATH.md
    section 7), checked when a causal method is composed (:func:`check_causal_host_class`).

    Semantics: a frame of chunk c attends to every frame of chunks <= c (chunks of ``chunk_size`` latent frames,
    the first chunk taking the remainder: :func:`distill_mixins.causal.chunk_bounds`); positions (RoPE) are absolute
    frame indices. The KV cache belongs to ``net`` (one per network), built from :mod:`distill_mixins.causal`.
    """

    chunk_size: int
    """Latent frames per chunk (published: 3)."""

    def predict_causal(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """Block-causal full-sequence forward: raw output (B, C, T, H, W) of ``net`` at native state x and per-frame
        native time (B, T). ``x`` holds frames ``0 .. T - 1`` of the clip ``condition`` belongs to (all of them, or
        a prefix). Raises when the block-causal layout cannot be built (never full attention instead)."""
        ...

    def predict_chunk(
        self, net: nn.Module, x: Tensor, time: Tensor, condition: Any, start_frame: int, store_kv: bool
    ) -> Tensor:
        """Raw output (B, C, n, H, W) of one chunk x (B, C, n, H, W) holding frames ``start_frame ..
        start_frame + n - 1``, at per-frame native time (B, n), attending to ``net``'s cached frames before
        ``start_frame`` plus itself. ``condition`` is the whole clip's. ``store_kv=True`` writes the chunk's keys and
        values (detached) over its frames' cache slots (idempotent); ``store_kv=False`` never changes the cache.
        Frames past the cache's capacity raise."""
        ...

    def clear_kv_cache(self, net: nn.Module) -> None:
        """Forget every cached frame of ``net``."""
        ...


_CAUSAL_MEMBERS = {
    "chunk_size": "an attribute `chunk_size: int`, latent frames per chunk (published: 3)",
    "predict_causal": "a method `predict_causal(net, x, time, condition)`: the block-causal full-sequence forward "
    "with per-frame time (B, T)",
    "predict_chunk": "a method `predict_chunk(net, x, time, condition, start_frame, store_kv)`: one chunk through "
    "the KV cache",
    "clear_kv_cache": "a method `clear_kv_cache(net)`",
}


def check_causal_host_class(cls: type) -> None:
    """TypeError naming the first :class:`CausalHost` member that ``cls`` lacks (a causal method is composed)."""
    for name, help_text in _CAUSAL_MEMBERS.items():
        member = inspect.getattr_static(cls, name, None)
        stub = callable(member) and getattr(member, "__qualname__", "") == f"CausalHost.{name}"
        if (member is None and name != "chunk_size") or stub:
            raise TypeError(
                f"{cls.__name__} composes a causal method, but its host lacks `{name}`: add {help_text} "
                "(distill_mixins.contract.CausalHost; docs/causal.md)."
            )


def check_causal_host_instance(obj: Any) -> None:
    """At construction of a causal method: ``chunk_size`` set to an int >= 1."""
    size = getattr(obj, "chunk_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TypeError(
            f"{type(obj).__name__}.chunk_size={size!r}: a causal host sets `chunk_size`, the latent frames per "
            "chunk (an int >= 1; published: 3)."
        )


@runtime_checkable
class FrameConditioning(Protocol):
    """A Video2World condition: ground-truth frames the model is conditioned on.

    gt_frames: (B, C, T, H, W) clean latents; frame_mask: (B, 1, T, 1, 1), 1 on given frames.
    Conditions with these two attributes get the frames pasted into input and output.
    """

    gt_frames: Tensor
    frame_mask: Tensor


_MEMBER_HELP = {
    "net": "an attribute `net: nn.Module`, the trained teacher network",
    "predict": "a method `predict(net, x, time, condition) -> Tensor` returning the raw output of `net` "
    "in the host's native parameterization",
    "scaling": f"an attribute `scaling: str`, one of {', '.join(SCALINGS)}",
    "prediction_type": f"an attribute `prediction_type: str`, one of {', '.join(PREDICTION_TYPES)}",
    "sigma_data": "an attribute `sigma_data: float` > 0, the data std of the schedule (EDM 0.5, RF 1.0)",
    "get_data_and_condition": "a method `get_data_and_condition(batch) -> (x0, condition, uncondition)` "
    "with x0 a latent video (B, C, T, H, W)",
}
_METHODS = ("predict", "get_data_and_condition")
_ATTRIBUTES = ("net", "scaling", "prediction_type", "sigma_data")


def _missing_message(cls_name: str, member: str) -> str:
    return (
        f"{cls_name} does not satisfy the distill-mixins host contract: it lacks `{member}`. "
        f"Add {_MEMBER_HELP[member]} to the host class, or to {cls_name} as a thin adapter. "
        "See docs/host_contract.md."
    )


def _is_library_mixin(klass: type) -> bool:
    from distill_mixins.trigflow import TrigFlowMixin

    return issubclass(klass, TrigFlowMixin)


def is_composed(cls: type) -> bool:
    """True when ``cls`` combines a library mixin with a host class (then the contract is checked)."""
    return any(not _is_library_mixin(k) and k is not object and k.__module__ != "typing" for k in cls.__mro__)


def check_base_order(cls: type) -> None:
    """Raise TypeError if a host class comes before a distillation mixin in ``cls``'s MRO."""
    mro = [k for k in cls.__mro__ if k not in (object, Protocol) and k.__module__ != "typing"]
    mixin_positions = [i for i, k in enumerate(mro) if _is_library_mixin(k)]
    host_positions = [i for i, k in enumerate(mro) if not _is_library_mixin(k)]
    if not host_positions or not mixin_positions or host_positions[0] > mixin_positions[-1]:
        return
    mixins = [b.__name__ for b in cls.__bases__ if _is_library_mixin(b)]
    hosts = [b.__name__ for b in cls.__bases__ if not _is_library_mixin(b)]
    mixin = mixins[0] if mixins else mro[mixin_positions[-1]].__name__
    raise TypeError(
        f"class {cls.__name__}: the host class {mro[host_positions[0]].__name__} comes before the "
        f"distillation mixin {mixin} in the method resolution order, so the host's methods would override "
        f"the mixin's. List the mixins first: class {cls.__name__}({', '.join(mixins + hosts)}): ..."
    )


INTENDED_OVERRIDES = frozenset({"training_step", "state_dict", "load_state_dict", "train", "_abc_impl", "_is_protocol"})
"""Host members the mixins replace on purpose (the training step, state dicts without the teacher)."""


def shadowed_host_members(cls: type) -> list[str]:
    """Names defined by a host class in ``cls``'s MRO that a library mixin shadows unintentionally."""
    library = [k for k in cls.__mro__ if _is_library_mixin(k) and k.__module__.startswith("distill_mixins.")]
    hosts = [k for k in cls.__mro__ if not _is_library_mixin(k) and not k.__module__.startswith(("torch", "typing"))]
    mixin_names = {name for k in library for name in vars(k) if not name.startswith("__")} - INTENDED_OVERRIDES
    return sorted(mixin_names & {name for k in hosts if k is not object for name in vars(k)})


def check_host_class(cls: type) -> None:
    """Checks at class creation: base order, the contract's methods with their arity, and a warning
    for host members that a mixin shadows."""
    check_base_order(cls)
    if issubclass(cls, DenoiseAdapterMixin) and not callable(getattr(cls, "denoise", None)):
        raise TypeError(
            f"{cls.__name__} uses DenoiseAdapterMixin but its host has no `denoise(x, sigma, condition)` "
            "method using self.net; add one, or drop the adapter and give the host a `predict`."
        )
    shadowed = shadowed_host_members(cls)
    if shadowed:
        warnings.warn(
            f"{cls.__name__}: the distillation mixins replace the host's {', '.join(shadowed)}; the host's own "
            "code calling these names will now run the mixin's version. Rename them in the host, or make sure "
            "that is what you want.",
            stacklevel=3,
        )
    for name in _METHODS:
        member = inspect.getattr_static(cls, name, None)
        if member is None or not callable(getattr(cls, name)):
            raise TypeError(_missing_message(cls.__name__, name))
        if getattr(cls, name).__qualname__ == f"DiffusionHost.{name}":  # the Protocol's own stub
            raise TypeError(_missing_message(cls.__name__, name))
    params = inspect.signature(cls.predict).parameters.values()
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(required) < 5 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"{cls.__name__}.predict{inspect.signature(cls.predict)} must take "
            "(self, net, x, time, condition): the network to run is passed in, so the mixin can run "
            "the teacher, the student and the critic through the same host code."
        )


def check_host_instance(obj: Any) -> None:
    """Checks at construction: every contract member present with a valid value."""
    name = type(obj).__name__
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module: compose the mixin with a host nn.Module subclass.")
    for member in _ATTRIBUTES:
        if not hasattr(obj, member):
            raise TypeError(
                _missing_message(name, member) + " (set it in the host's __init__ before the mixin's runs)."
            )
    if not isinstance(obj.net, nn.Module):
        raise TypeError(f"{name}.net must be an nn.Module, got {type(obj.net).__name__}.")
    if obj.scaling not in SCALINGS:
        raise TypeError(f"{name}.scaling={obj.scaling!r} is not supported; use one of {', '.join(SCALINGS)}.")
    if obj.prediction_type not in PREDICTION_TYPES:
        raise TypeError(
            f"{name}.prediction_type={obj.prediction_type!r} is not supported; "
            f"use one of {', '.join(PREDICTION_TYPES)}."
        )
    sigma = obj.sigma_data
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise TypeError(f"{name}.sigma_data={sigma!r} must be a float > 0 (EDM 0.5, rectified flow 1.0).")


class DenoiseAdapterMixin:
    """Adapter for Cosmos-style hosts that only have ``denoise(x_t, sigma, condition)`` using ``self.net``.

    Supplies ``predict(net, x, time, condition)`` by running the host's ``denoise`` with
    ``self.net`` temporarily bound to ``net``, and declares ``prediction_type = "x0"``. The
    host's output is read as x0 directly or from its ``x0`` attribute (Cosmos'
    ``DenoisePrediction``). List it after the method mixin, before the host:
    ``class MyDistill(DMD2Mixin, DenoiseAdapterMixin, CosmosModel)``. A native ``predict``
    is preferred: this adapter swaps a submodule for the call and is not thread-safe.
    """

    prediction_type = "x0"

    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """x0 of ``net`` at native state x (B, C, T, H, W) and native time (B,), via ``self.denoise``."""
        with bind_net(self, net):
            out = self.denoise(x, time, condition)  # type: ignore[attr-defined]
        return out if isinstance(out, torch.Tensor) else out.x0


@contextmanager
def bind_net(module: nn.Module, net: nn.Module) -> Iterator[None]:
    """Temporarily make ``module.net`` refer to ``net`` (restored even on error)."""
    original = module._modules["net"]
    module._modules["net"] = net
    try:
        yield
    finally:
        module._modules["net"] = original
