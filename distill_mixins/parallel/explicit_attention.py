"""Softmax attention written out, with its own forward-mode rule: what :func:`~distill_mixins.parallel.attention.
attention` runs under forward-mode AD (``torch.func.jvp``) unless SDPA's math backend is asked for.

``O = P V`` with ``P = softmax(s Q K^T + bias)``. The forward derivative along ``(dQ, dK, dV)`` is
``dO = P dV + G V - rowsum(G) * O`` with ``G = P * s (dQ K^T + Q dK^T)`` (``*`` elementwise): three batched matrix
products on the saved ``P`` and ``O``, where differentiating SDPA's math backend runs PyTorch's decomposed safe
softmax (about twice the time on a CPU, ``benchmarks/scm_step.py``). The backward is the usual one. The mask is a
constant: no tangent flows through it. A row whose keys are all masked gives zeros (SDPA's math backend does too).

:class:`ExplicitSDPA` is a function mode, entered for the duration of a JVP (``velocity_jvp``), that sends
``F.scaled_dot_product_attention`` calls of networks outside the library (diffusers' attention processors) to the
same rule; calls it cannot take (dropout, grouped-query attention) run as called (SDPA's math backend under
``sdpa_kernel``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

__all__ = ["ExplicitSDPA", "explicit_attention", "sdpa_as_called"]

_as_called = threading.local()


@contextmanager
def sdpa_as_called() -> Iterator[None]:
    """SDPA calls inside run as called even under :class:`ExplicitSDPA` (the attention dispatch's ``math`` backend,
    asked for by name, stays SDPA's math backend)."""
    previous = getattr(_as_called, "on", False)
    _as_called.on = True
    try:
        yield
    finally:
        _as_called.on = previous


class _Attention(torch.autograd.Function):
    """``(O, P)`` of softmax attention over (B, H, S, D) tensors; ``P`` is returned for the rules (not
    differentiable)."""

    generate_vmap_rule = True  # torch.func.jacfwd (vmap over jvp)

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        wide = torch.promote_types(q.dtype, torch.float32)
        scores = ((q * scale) @ k.transpose(-2, -1)).to(wide)
        if bias is not None:
            scores += bias
        p = torch.softmax(scores, dim=-1)
        if bias is not None:
            p = p.nan_to_num_(0.0)  # a fully masked row: softmax of -inf everywhere
        p = p.to(v.dtype)
        return p @ v, p

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        q, k, v, scale, _ = inputs
        o, p = output
        ctx.scale = scale
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros
        ctx.mark_non_differentiable(p)
        ctx.save_for_forward(q, k, v, o, p)
        ctx.save_for_backward(q, k, v, p)

    @staticmethod
    def jvp(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, *_: object) -> tuple[Tensor, None]:  # noqa: ANN001
        q, k, v, o, p = ctx.saved_tensors
        do = torch.zeros_like(o) if dv is None else p @ dv
        if dq is None and dk is None:
            return do, None
        # dS = s (dQ K^T + Q dK^T) as one product [s dQ, s Q] [K, dK]^T: one (S, S) result, no sum of two
        pairs = ([(dq, k)] if dq is not None else []) + ([(q, dk)] if dk is not None else [])
        left = torch.cat([a * ctx.scale for a, _ in pairs], dim=-1)
        right = torch.cat([b for _, b in pairs], dim=-1)
        g = left @ right.transpose(-2, -1)
        g *= p  # G = P * dS, in place
        return do + g @ v - g.sum(dim=-1, keepdim=True) * o, None

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor, _: Tensor | None) -> tuple[Tensor, Tensor, Tensor, None, None]:  # noqa: ANN001
        q, k, v, p = ctx.saved_tensors
        if do is None:
            return None, None, None, None, None
        dv = p.transpose(-2, -1) @ do
        dp = do @ v.transpose(-2, -1)
        ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True)) * ctx.scale
        return ds @ k, ds.transpose(-2, -1) @ q, dv, None, None


def _additive(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``keep`` (boolean), -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention (B, H, S_q, D) of q (B, H, S_q, D) over k, v (B, H, S_k, D), as
    :func:`torch.nn.functional.scaled_dot_product_attention` computes it (``scale`` None: ``1/sqrt(D)``;
    ``causal``: query i sees keys <= i; ``attn_mask``: boolean, True = attend, or additive), with a forward-mode
    rule (module docstring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    wide = torch.promote_types(q.dtype, torch.float32)
    bias = None
    if attn_mask is not None:
        bias = _additive(attn_mask, wide) if attn_mask.dtype == torch.bool else attn_mask.to(wide)
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        bias = _additive(keep, wide) if bias is None else bias + _additive(keep, wide)
    return _Attention.apply(q, k, v, scale, bias)[0]


class ExplicitSDPA(TorchFunctionMode):
    """Within ``with ExplicitSDPA():``, ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal,
    scale)`` runs :func:`explicit_attention`; every other call (and SDPA with dropout or ``enable_gqa``) as called."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention or getattr(_as_called, "on", False):
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args, strict=False)), **kwargs}
        if call.get("dropout_p", 0.0) or call.get("enable_gqa", False) or set(call) - set(names):
            return func(*args, **kwargs)
        return explicit_attention(call["query"], call["key"], call["value"], scale=call.get("scale"),
                                  causal=bool(call.get("is_causal", False)), attn_mask=call.get("attn_mask"))
