"""One precision policy, and inference precision helpers.

:func:`resolve_precision` turns ``"auto" | "bf16" | "fp32"`` into the precision that runs: ``auto`` picks bf16 only
where the device computes it natively (CUDA with bf16 support; a CPU with AMX tiles or AVX512-BF16, by torch's own
capability checks) and float32 otherwise, because emulated bf16 is slow: on an AVX2-only CPU a bf16-autocast
convolution ran 54x longer than in float32 (measured). The choice is logged once per device with its reason.

The environment variable ``DISTILL_MIXINS_PRECISION`` (``auto``, ``bf16`` or ``fp32``) sets what ``auto`` resolves to
for the whole process (``DISTILL_MIXINS_PRECISION=fp32 make test`` runs everything in float32, as an AVX2-only CPU
does); an explicit ``"bf16"`` or ``"fp32"`` request is kept as given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")
"""What a user may ask for."""
PRECISION_ENV = "DISTILL_MIXINS_PRECISION"
"""Environment variable that sets what ``auto`` resolves to (``auto``, ``bf16`` or ``fp32``)."""
MATMUL_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_logged: set[tuple[str, str, str]] = set()


def check_precision(precision: Any, owner: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; a ValueError naming ``owner`` and the choices otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}={precision!r} is not a precision; choose one of {', '.join(PRECISIONS)}.")
    return precision


def native_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (torch's capability checks)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA with bf16 support" if ok else "CUDA without native bf16"
    if device.type == "cpu":
        amx, avx512_bf16 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
        if amx or avx512_bf16:
            return True, "CPU with " + ("AMX" if amx else "AVX512-BF16")
        capability = torch.backends.cpu.get_cpu_capability()
        return False, f"CPU ({capability}) without AMX or AVX512-BF16: bf16 would be emulated (up to 54x slower)"
    return False, f"{device.type} device: bf16 speed unknown"


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu") -> str:
    """``"bf16"`` or ``"fp32"``: ``precision`` itself, or for ``"auto"`` the policy of this module (the
    :data:`PRECISION_ENV` variable first, then the device's native bf16 support); logs the choice once."""
    check_precision(precision)
    if precision != "auto":
        return precision
    forced = os.environ.get(PRECISION_ENV, "auto").strip().lower() or "auto"
    check_precision(forced, f"environment variable {PRECISION_ENV}")
    if forced != "auto":
        choice, reason = forced, f"{PRECISION_ENV}={forced}"
    else:
        native, reason = native_bf16(device)
        choice = "bf16" if native else "fp32"
    key = (str(torch.device(device)), choice, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("precision auto -> {} on {}: {}", choice, key[0], reason)
    return choice


def autocast(precision: str, device: torch.device | str = "cpu") -> AbstractContextManager[Any]:
    """bf16 autocast on ``device`` when ``precision`` resolves to bf16, else nothing (float32)."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16":
        return uncached_autocast(device.type, torch.bfloat16)
    return nullcontext()


def uncached_autocast(device_type: str, dtype: torch.dtype) -> torch.autocast:
    """``torch.autocast`` without its weight-cast cache. FSDP2 re-gathers a resharded network into the same
    unsharded parameters at every forward, and the cache then hands a later forward the cast made by an earlier one:
    in a DMD2 student phase (the student runs more than once) under FSDP2 with float32 parameters, the student got
    no gradient and stayed untrained. Each use casts afresh instead."""
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def frozen_weights_for(precision: str, *nets: nn.Module, device: torch.device | str = "cpu") -> ExitStack:
    """Frozen networks hold bf16 conv/linear weights while they run under bf16 autocast (bit-identical results
    without per-call weight casts: :func:`matmul_weights_in`); nothing in float32."""
    stack = ExitStack()
    if resolve_precision(precision, device) == "bf16":
        for net in nets:
            stack.enter_context(matmul_weights_in(net))
    return stack


@dataclass(frozen=True)
class PrecisionReport:
    """What ran and why: the requested precision, the resolved one and the device's bf16 support."""

    requested: str
    resolved: str
    device: str
    native_bf16: bool
    reason: str

    @classmethod
    def of(cls, precision: str, device: torch.device | str = "cpu") -> PrecisionReport:
        native, reason = native_bf16(device)
        return cls(precision, resolve_precision(precision, device), str(torch.device(device)), native, reason)


@contextmanager
def matmul_weights_in(net: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[nn.Module]:
    """Hold the weights and biases of ``net``'s convolutions and linear layers in ``dtype`` inside the block, and
    restore the exact originals on exit (also on an error).

    Under ``torch.autocast(dtype=dtype)`` those layers cast their weights to ``dtype`` on every call, and autocast
    caches the cast only for weights that require grad, so a frozen network (a teacher, a student being sampled)
    pays the cast at each evaluation (about 15% of a small UNet's forward on CPU). Inside this block the results
    under autocast are bit-identical and the cast is gone. Norm layers keep their dtype (autocast runs them in
    float32). Not for training: the optimizer must see the original parameters.
    """
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for module in net.modules():
            if isinstance(module, MATMUL_MODULES):
                for p in module.parameters(recurse=False):
                    saved.append((p, p.data))
                    p.data = p.data.to(dtype)
        yield net
    finally:
        for p, data in saved:
            p.data = data
