"""One attention dispatch: flash-attn (FlashAttention-3 or -2) on CUDA when installed and the call fits, PyTorch SDPA
otherwise, SDPA's math backend whenever forward-mode AD is active.

Every attention path of the library (Ulysses attention, the hosts' attention processors) calls :func:`attention`.
``backend="auto"`` resolves per call, by :func:`resolve_attention_backend`:

- ``flash3``: ``flash_attn_interface`` (FlashAttention-3, built from flash-attention's ``hopper/``) importable, a
  CUDA device of compute capability 9.x, float16/bfloat16, ``head_dim <= 256`` and a multiple of 8, no mask;
- ``flash2``: ``flash_attn`` (``pip install 'distill-mixins[flash]'``) importable, CUDA capability >= 8.0,
  float16/bfloat16, ``head_dim <= 256``, no mask;
- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention`, which picks its own kernel (on a CPU its
  fused CPU kernel, equal to the math backend to float rounding);
- ``math``: SDPA restricted to its math backend (forward-mode AD runs through it, slowly: PyTorch differentiates
  its decomposed safe softmax);
- ``explicit``: softmax attention written out with its own forward-mode rule
  (:func:`~distill_mixins.parallel.explicit_attention.explicit_attention`). ``auto`` takes it whenever forward-mode
  AD is active (``torch.func.jvp``, ``torch.func.jacfwd``, ``torch.autograd.forward_ad.dual_level``), for the
  consistency methods: SDPA's fused kernels (the CPU one included) and flash-attn have no forward derivative, and
  it is about twice as fast as differentiating the math backend; ``sdpa`` or ``math`` asked for under forward-mode
  AD run the math backend.

The choice is logged once per (request, choice, device, dtype, reason). A backend named explicitly (in a config:
:func:`check_attention_backend`; for the process: :func:`set_attention_backend`) is used as given, and one that cannot
run raises with the fix (flash-attn not installed: the ``pip install`` line; flash-attn under forward-mode AD).

flash-attn takes ``(B, S, H, D)`` tensors and ``softmax_scale``, SDPA ``(B, H, S, D)`` and ``scale``: callers give
either layout and get the output in the same layout. The flash functions are loaded through
:data:`FLASH_IMPLEMENTATIONS`, which a test can point at a stand-in with flash-attn's signature.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from loguru import logger
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill_mixins.parallel.explicit_attention import explicit_attention, sdpa_as_called

ATTENTION_BACKENDS = ("auto", "flash3", "flash2", "sdpa", "math", "explicit")
"""What a user may ask for; ``auto`` resolves to one of the others."""
LAYOUTS = ("bhsd", "bshd")
"""``bhsd``: (batch, heads, seq, head_dim), SDPA's layout; ``bshd``: (batch, seq, heads, head_dim), flash-attn's."""
FLASH_BACKENDS = ("flash3", "flash2")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
FLASH_INSTALL_HINT = {
    "flash2": "pip install 'distill-mixins[flash]' (flash-attn; add --no-build-isolation if pip builds it)",
    "flash3": "build FlashAttention-3 from flash-attention's hopper/ directory on a Hopper GPU",
}

FlashFunction = Callable[..., Any]
"""``fn(q, k, v, softmax_scale=None, causal=False) -> out`` (or a tuple whose first item is ``out``) in (B, S, H, D)."""


def _load(module: str) -> FlashFunction:
    return importlib.import_module(module).flash_attn_func


FLASH_IMPLEMENTATIONS: dict[str, Callable[[], FlashFunction]] = {
    "flash3": functools.partial(_load, "flash_attn_interface"),
    "flash2": functools.partial(_load, "flash_attn"),
}
"""Loader per flash backend: returns the ``flash_attn_func`` to call, raises ImportError when it is not installed."""

_loaded: dict[str, tuple[Callable[[], FlashFunction], FlashFunction | None, str]] = {}
_logged: set[tuple[str, str, str, str, str]] = set()
_default_backend = "auto"


def check_attention_backend(backend: Any, owner: str = "attention_backend") -> str:
    """``backend`` if it is one of :data:`ATTENTION_BACKENDS`; a ValueError naming ``owner`` and the choices else."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"{owner}={backend!r} is not an attention backend; choose one of {', '.join(ATTENTION_BACKENDS)}."
        )
    return backend


def set_attention_backend(backend: str) -> str:
    """Set what :func:`attention` uses when called without ``backend`` (``"auto"`` at start); returns the previous."""
    global _default_backend
    previous, _default_backend = _default_backend, check_attention_backend(backend)
    return previous


def get_attention_backend() -> str:
    """What :func:`attention` uses when called without ``backend``."""
    return _default_backend


def flash_function(backend: str) -> FlashFunction | None:
    """The flash-attn function of ``backend`` (``flash3`` or ``flash2``), None when it is not installed (cached)."""
    return _flash(backend)[0]


def _flash(backend: str) -> tuple[FlashFunction | None, str]:
    loader = FLASH_IMPLEMENTATIONS[backend]
    cached = _loaded.get(backend)
    if cached is None or cached[0] is not loader:  # a new loader (a test's stand-in) is loaded afresh
        try:
            cached = (loader, loader(), "")
        except ImportError as error:
            cached = (loader, None, f"{type(error).__name__}: {error}")
        _loaded[backend] = cached
    return cached[1], cached[2]


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def forward_ad_active(*tensors: Tensor) -> bool:
    """Whether forward-mode AD is active: a ``torch.autograd.forward_ad`` dual level is open (``torch.func.jvp`` and
    ``jacfwd`` open one). Conservative: inside a dual level every call counts, dual inputs or not."""
    level = getattr(forward_ad, "_current_level", None)
    if level is not None:
        return level >= 0
    try:  # a torch without the level counter: look at the inputs themselves
        return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    except RuntimeError:  # unpack_dual has no batching rule (under vmap): assume forward AD
        return True


def _auto(device: torch.device, dtype: torch.dtype, head_dim: int, has_mask: bool) -> tuple[str, str]:
    if device.type != "cuda":
        return "sdpa", f"{device.type} device: flash-attn runs on CUDA only"
    if has_mask:
        return "sdpa", "an attn_mask is given: flash-attn takes none"
    if dtype not in FLASH_DTYPES:
        return "sdpa", f"{dtype}: flash-attn computes in float16/bfloat16 only"
    if head_dim > FLASH_MAX_HEAD_DIM:
        return "sdpa", f"head_dim {head_dim} > {FLASH_MAX_HEAD_DIM}: too large for flash-attn"
    major, minor = _cuda_capability(device)
    sm = f"sm{major}{minor}"
    flash3, why3 = _flash("flash3")
    if flash3 is not None and major == 9 and head_dim % 8 == 0:
        return "flash3", f"FlashAttention-3 on {sm}, {dtype}, head_dim {head_dim}"
    flash2, why2 = _flash("flash2")
    if flash2 is not None and major >= 8:
        return "flash2", f"FlashAttention-2 on {sm}, {dtype}, head_dim {head_dim}"
    if flash2 is None and flash3 is None:
        return "sdpa", f"flash-attn is not installed ({why2}); for FlashAttention-2: {FLASH_INSTALL_HINT['flash2']}"
    if major < 8:
        return "sdpa", f"{sm}: FlashAttention-2 needs compute capability >= 8.0 (Ampere or newer)"
    return "sdpa", f"only FlashAttention-3 is installed and it does not fit {sm} with head_dim {head_dim}"


def resolve_attention_backend(
    backend: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    head_dim: int = 64,
    needs_forward_ad: bool = False,
    *,
    has_mask: bool = False,
) -> tuple[str, str]:
    """``(choice, reason)``: the backend that runs an attention call on ``device`` in ``dtype`` with ``head_dim``
    (see the module's docstring); logs it once. An explicit ``flash3``/``flash2`` that cannot run (not installed,
    forward-mode AD, a mask) raises; its device and dtype are flash-attn's own to check."""
    check_attention_backend(backend)
    device = torch.device(device)
    if needs_forward_ad:
        if backend in FLASH_BACKENDS:
            raise ValueError(
                f"attention backend {backend!r} under forward-mode AD (torch.func.jvp): flash-attn has no forward "
                "derivative; use 'auto' or 'explicit' (attention with its forward rule), or 'math' (SDPA's math "
                "backend)."
            )
        if backend in ("auto", "explicit"):
            choice, reason = "explicit", "forward-mode AD: explicit attention with its forward rule"
        else:
            choice = "math"
            reason = (f"forward-mode AD with {backend!r} asked for: SDPA's math backend (no fused kernel has a "
                      "forward rule)")
    elif backend == "auto":
        choice, reason = _auto(device, dtype, head_dim, has_mask)
    else:
        choice, reason = backend, "requested"
        if backend in FLASH_BACKENDS:
            if has_mask:
                raise ValueError(f"attention backend {backend!r} takes no attn_mask; use 'sdpa' (or 'auto').")
            if _flash(backend)[0] is None:
                raise ImportError(
                    f"attention backend {backend!r} needs {'FlashAttention-3' if backend == 'flash3' else 'flash-attn'}"
                    f", which is not installed ({_flash(backend)[1]}): {FLASH_INSTALL_HINT[backend]}; "
                    "or use attention backend 'auto' (flash-attn when installed, SDPA otherwise)."
                )
    key = (backend, choice, str(device), str(dtype).removeprefix("torch."), reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("attention {} -> {} on {} ({}): {}", *key)
    return choice, reason


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    layout: str = "bhsd",
    scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention of ``q`` over ``k``, ``v``, all in ``layout`` (:data:`LAYOUTS`); the output is in the same
    layout (a transposed view where the backend's layout differs).

    ``scale`` multiplies ``q @ k^T`` (``1/sqrt(head_dim)`` when None). ``causal``: query i attends to keys <= i
    (equal query and key lengths only: SDPA and flash-attn align the mask differently otherwise; give an
    ``attn_mask`` then). ``attn_mask``: SDPA's boolean or additive mask, broadcastable to (B, H, S_q, S_k) in either
    layout; it rules out flash-attn. ``backend``: one of :data:`ATTENTION_BACKENDS`; None takes
    :func:`get_attention_backend`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"attention layout={layout!r} is not known; choose one of {', '.join(LAYOUTS)}.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention {name} has shape {tuple(t.shape)}: give a 4-D tensor in layout {layout!r}.")
    seq = 2 if layout == "bhsd" else 1
    if causal and q.shape[seq] != k.shape[seq]:
        raise ValueError(
            f"attention causal=True with {q.shape[seq]} queries and {k.shape[seq]} keys: causal needs equal lengths; "
            "pass an attn_mask instead."
        )
    requested = _default_backend if backend is None else backend
    choice, _ = resolve_attention_backend(
        requested, q.device, q.dtype, q.shape[-1], forward_ad_active(q, k, v), has_mask=attn_mask is not None
    )
    if choice in FLASH_BACKENDS:
        fn = flash_function(choice)
        assert fn is not None  # resolve_attention_backend raised otherwise
        if layout == "bhsd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = fn(q, k, v, softmax_scale=scale, causal=causal)
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2) if layout == "bhsd" else out
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if choice == "explicit":
        out = explicit_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask)
    elif choice == "math":
        with sdpa_kernel(SDPBackend.MATH), sdpa_as_called():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2) if layout == "bshd" else out
