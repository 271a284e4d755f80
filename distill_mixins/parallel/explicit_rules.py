"""Linear layers and LayerNorm with their own forward-mode rules, for the duration of a JVP (sCM's ``velocity_jvp``).

PyTorch's built-in forward derivatives of ``linear`` (``addmm``) and ``native_layer_norm`` materialise the tangents of
the weights as zeros when only the input carries one (a JVP along the data, as sCM takes it): a linear layer's JVP
then runs two matrix products and three copies where one product is needed (2x the product alone,
``benchmarks/scm_step.py``). The rules here take the input's tangent and add a weight's or bias's only when one is
given:

- linear: ``dy = dx W^T + x dW^T + db``;
- LayerNorm over the last dims with ``x_hat = (x - mean) rstd``: ``dy = w rstd (dx - mean(dx) - x_hat mean(x_hat dx))
  + dw x_hat + db``.

:class:`ExplicitRules` is a function mode that sends ``F.linear`` / ``F.layer_norm`` calls to them (``nn.Linear`` and
``nn.LayerNorm`` call those) and SDPA calls to the explicit attention as :class:`~distill_mixins.parallel.
explicit_attention.ExplicitSDPA` does; calls under autocast, with mixed dtypes or with unknown arguments run as
called. Both rules have the usual backward, so a graph built inside the mode is still right.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill_mixins.parallel.explicit_attention import ExplicitSDPA

__all__ = ["ExplicitRules", "linear", "layer_norm"]


def _sum(*terms: Tensor | None) -> Tensor | None:
    """The sum of the given terms (None when none is given)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


class _Linear(torch.autograd.Function):
    """``x W^T + b`` of x (..., in), W (out, in), b (out,) or None."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        x, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)  # absent tangents arrive as None, not zeros (the point of the rule)
        ctx.save_for_forward(x, weight)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None) -> Tensor:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        dy = _sum(None if dx is None else F.linear(dx, weight), None if dweight is None else F.linear(x, dweight))
        if dbias is not None:
            dy = dbias.expand(*x.shape[:-1], -1) if dy is None else dy + dbias
        return dy

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if dy is None:
            return None, None, None
        rows = dy.reshape(-1, dy.shape[-1])
        dx = dy @ weight if need_x else None
        dw = rows.transpose(0, 1) @ x.reshape(-1, x.shape[-1]) if need_w else None
        db = rows.sum(0) if ctx.has_bias and need_b else None
        return dx, dw, db


class _LayerNorm(torch.autograd.Function):
    """LayerNorm of x over its last ``len(shape)`` dims with weight / bias of that shape (or None)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float) -> Any:
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        x, shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.shape, ctx.has_weight, ctx.has_bias = shape, weight is not None, bias is not None
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, _shape: None, dweight: Tensor | None, dbias: Tensor | None, _eps: None) -> Any:  # noqa: ANN001
        x, weight, mean, rstd = ctx.saved_tensors
        dims = tuple(range(-len(ctx.shape), 0))
        x_hat = (x - mean) * rstd
        dy = None
        if dx is not None:
            dy = rstd * (dx - dx.mean(dims, keepdim=True) - x_hat * (x_hat * dx).mean(dims, keepdim=True))
            if weight is not None:
                dy = dy * weight
        dy = _sum(dy, None if dweight is None else x_hat * dweight)
        if dbias is not None:
            dy = dbias.expand_as(x) if dy is None else dy + dbias
        return dy, None, None

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, *_: Tensor | None) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, None]:  # noqa: ANN001
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None:
            return None, None, None, None, None
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, ctx.shape, mean, rstd, weight, bias, [need[0], ctx.has_weight and need[2], ctx.has_bias and need[3]]
        )
        return dx, None, dw, db, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` (x (..., in) -> (..., out)) with the forward rule of the module docstring."""
    return _Linear.apply(x, weight, bias)


def layer_norm(
    x: Tensor, shape: tuple[int, ...], weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """``F.layer_norm`` with the forward rule of the module docstring."""
    return _LayerNorm.apply(x, tuple(shape), weight, bias, float(eps))[0]


def _plain(*tensors: Tensor | None) -> bool:
    """Whether a call can take a rule: tensors of one floating dtype on one device, no autocast there."""
    given = [t for t in tensors if t is not None]
    if not all(isinstance(t, Tensor) for t in given) or len({(t.dtype, t.device) for t in given}) != 1:
        return False
    return given[0].dtype.is_floating_point and not torch.is_autocast_enabled(given[0].device.type)


class ExplicitRules(ExplicitSDPA):
    """Within ``with ExplicitRules():``, ``F.linear`` and ``F.layer_norm`` run :func:`linear` / :func:`layer_norm`
    (those under autocast, with mixed dtypes or unknown arguments run as called), SDPA as under
    :class:`~distill_mixins.parallel.explicit_attention.ExplicitSDPA`, every other call as called: one function
    mode for the three (each mode on the stack costs every op of the JVP a Python call)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.linear:
            call = {**dict(zip(("input", "weight", "bias"), args, strict=False)), **kwargs}
            if set(call) <= {"input", "weight", "bias"} and _plain(call["input"], call["weight"], call.get("bias")):
                return linear(call["input"], call["weight"], call.get("bias"))
        elif func is F.layer_norm:
            names = ("input", "normalized_shape", "weight", "bias", "eps")
            call = {**dict(zip(names, args, strict=False)), **kwargs}
            if set(call) <= set(names) and _plain(call["input"], call.get("weight"), call.get("bias")):
                return layer_norm(call["input"], tuple(call["normalized_shape"]), call.get("weight"),
                                  call.get("bias"), call.get("eps", 1e-5))
        return super().__torch_function__(func, types, args, kwargs)
