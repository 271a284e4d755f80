"""TrigFlow parameterization (Lu & Song 2024, arXiv 2410.11081) and exact conversions.

TrigFlow state: ``x_t = cos(t) x0 + sin(t) sigma_d eps``, ``t in [0, pi/2]``. Every
host schedule writes its native state as ``x = k(t) x_t = a x0 + b eps`` with
``a = k cos t`` and ``b = k sigma_d sin t``:

=================  ==========================  ===============================
scaling            native time                 k(t)
=================  ==========================  ===============================
``edm``            ``sigma = sigma_d tan t``    ``1 / cos t``
``rectified_flow`` ``tau = sigma / (1+sigma)``  ``1 / (cos t + sigma_d sin t)``
``trigflow``       ``t``                        ``1``
=================  ==========================  ===============================

Prediction types (``eps`` is unit normal): ``x0``; ``eps``; ``velocity`` = ``eps - x0``
(flow matching); ``v`` = ``alpha eps - s x0`` with ``(alpha, s) = (a, b) / sqrt(a^2 + b^2)``
(the VP v-prediction; equals MATH.md's form for TrigFlow with sigma_d = 1).
All coefficients are computed in float64 (MATH.md section 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill_mixins.config import TimeSamplerConfig, check_choice
from distill_mixins.contract import (
    PREDICTION_TYPES,
    SCALINGS,
    FrameConditioning,
    check_causal_host_class,
    check_host_class,
    is_composed,
)

HALF_PI = math.pi / 2
EDM_T_LIMIT = math.atan(1e6)
"""Largest TrigFlow time an EDM host is evaluated at (sigma = 1e6 sigma_data)."""


# ----------------------------------------------------------------------------- time


def _f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def trigflow_to_native_time(t: Tensor, scaling: str, sigma_data: float) -> Tensor:
    """TrigFlow time ``t`` -> native time (EDM sigma, rectified-flow tau, or t), float64."""
    check_choice("trigflow", "scaling", scaling, SCALINGS)
    t = _f64(t)
    if scaling == "edm":
        return sigma_data * torch.tan(t)
    if scaling == "rectified_flow":
        s = sigma_data * torch.sin(t)
        return s / (torch.cos(t) + s)
    return t


def native_to_trigflow_time(time: Tensor, scaling: str, sigma_data: float) -> Tensor:
    """Native time (EDM sigma, rectified-flow tau, or t) -> TrigFlow ``t``, float64."""
    check_choice("trigflow", "scaling", scaling, SCALINGS)
    time = _f64(time)
    if scaling == "edm":
        return torch.atan2(time, torch.full_like(time, sigma_data))
    if scaling == "rectified_flow":
        return torch.atan2(time, sigma_data * (1.0 - time))  # sigma = tau / (1 - tau)
    return time


def native_scale(t: Tensor, scaling: str, sigma_data: float) -> Tensor:
    """``k(t)`` with ``x_native = k(t) x_t`` (float64)."""
    check_choice("trigflow", "scaling", scaling, SCALINGS)
    t = _f64(t)
    if scaling == "edm":
        return 1.0 / torch.cos(t)
    if scaling == "rectified_flow":
        return 1.0 / (torch.cos(t) + sigma_data * torch.sin(t))
    return torch.ones_like(t)


def native_coefficients(t: Tensor, scaling: str, sigma_data: float) -> tuple[Tensor, Tensor]:
    """``(a, b)`` with ``x_native = a x0 + b eps`` at TrigFlow time ``t`` (float64)."""
    t = _f64(t)
    k = native_scale(t, scaling, sigma_data)
    return k * torch.cos(t), k * sigma_data * torch.sin(t)


def expand_time(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a time of shape (B,), per-frame (B, T) or x's shape against x (B, C, T, H, W)."""
    if t.ndim == 0:
        return t
    if t.shape == x.shape:
        return t
    if t.ndim == 1 and t.shape[0] == x.shape[0]:
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    if t.ndim == 2 and x.ndim == 5 and t.shape == (x.shape[0], x.shape[2]):
        return t[:, None, :, None, None]
    raise ValueError(
        f"time of shape {tuple(t.shape)} does not fit a state of shape {tuple(x.shape)}: "
        "give (B,), per-frame (B, T) for (B, C, T, H, W) states, or the state's shape."
    )


# ---------------------------------------------------------------------------- state


def _scaled(x: Tensor, coeff: Tensor) -> Tensor:
    """``coeff * x`` computed in float64, returned in x's dtype."""
    return (expand_time(coeff, x).to(x.device) * x.double()).to(x.dtype)


def trigflow_to_native_state(x_t: Tensor, t: Tensor, scaling: str, sigma_data: float) -> Tensor:
    """TrigFlow state ``x_t`` (B, ...) -> native state ``x = k(t) x_t``."""
    return _scaled(x_t, native_scale(t, scaling, sigma_data))


def native_to_trigflow_state(x: Tensor, t: Tensor, scaling: str, sigma_data: float) -> Tensor:
    """Native state ``x`` (B, ...) at TrigFlow time ``t`` -> ``x_t = x / k(t)``."""
    return _scaled(x, 1.0 / native_scale(t, scaling, sigma_data))


# --------------------------------------------------------------------------- output


def output_coefficients(t: Tensor, scaling: str, prediction_type: str, sigma_data: float) -> tuple[Tensor, Tensor]:
    """``(p, q)`` with ``x0 = p x + q out`` for a native output of ``prediction_type`` (float64).

    eps: ``x0 = (x - b eps) / a``; velocity (``eps - x0``): ``x0 = (x - b v) / (a + b)``;
    v (``alpha eps - s x0``): ``x0 = a x / r^2 - b v / r`` with ``r^2 = a^2 + b^2``; x0: ``x0 = out``.
    """
    check_choice("trigflow", "prediction_type", prediction_type, PREDICTION_TYPES)
    a, b = native_coefficients(t, scaling, sigma_data)
    if prediction_type == "x0":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction_type == "eps":
        return 1.0 / a, -b / a
    if prediction_type == "velocity":
        return 1.0 / (a + b), -b / (a + b)
    r2 = a * a + b * b
    return a / r2, -b / r2.sqrt()


def native_output_to_x0(
    out: Tensor, x: Tensor, t: Tensor, scaling: str, prediction_type: str, sigma_data: float
) -> Tensor:
    """Host output ``out`` on native state ``x`` at TrigFlow time ``t`` -> ``x0 = p x + q out`` (x's dtype)."""
    if prediction_type == "x0":
        return out.to(x.dtype)
    p, q = (expand_time(c, x).to(x.device) for c in output_coefficients(t, scaling, prediction_type, sigma_data))
    return (p * x.double() + q * out.double()).to(x.dtype)


def x0_to_native_output(
    x0: Tensor, x: Tensor, t: Tensor, scaling: str, prediction_type: str, sigma_data: float
) -> Tensor:
    """Inverse of :func:`native_output_to_x0`: ``out = (x0 - p x) / q``."""
    if prediction_type == "x0":
        return x0.to(x.dtype)
    p, q = (expand_time(c, x).to(x.device) for c in output_coefficients(t, scaling, prediction_type, sigma_data))
    return ((x0.double() - p * x.double()) / q).to(x.dtype)


def x0_to_F(x0: Tensor, x_t: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow velocity ``F = (cos t x_t - x0) / (sigma_d sin t)`` (sCM eq. for x0_hat)."""
    te = expand_time(_f64(t), x_t).to(x_t.device)
    return ((torch.cos(te) * x_t.double() - x0.double()) / (sigma_data * torch.sin(te))).to(x_t.dtype)


def F_to_x0(F: Tensor, x_t: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """``x0 = cos t x_t - sin t sigma_d F``."""
    te = expand_time(_f64(t), x_t).to(x_t.device)
    return (torch.cos(te) * x_t.double() - torch.sin(te) * sigma_data * F.double()).to(x_t.dtype)


def add_noise(x0: Tensor, eps: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """``x_t = cos t x0 + sin t sigma_d eps`` for unit-normal ``eps``."""
    te = expand_time(_f64(t), x0).to(x0.device)
    return (torch.cos(te) * x0.double() + torch.sin(te) * sigma_data * eps.double()).to(x0.dtype)


# --------------------------------------------------------------------- time samplers


def sample_time(
    n: int, config: TimeSamplerConfig, sigma_data: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Draw ``n`` TrigFlow times (float64, shape (n,)) from ``config`` (see TimeSamplerConfig)."""
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand if time_variate(config) == "uniform" else torch.randn
    return time_from_variate(draw(n, dtype=torch.float64, generator=generator, device=device), config, sigma_data)


def time_variate(config: TimeSamplerConfig) -> str:
    """What :func:`time_from_variate` maps to times under ``config``: ``"uniform"`` on [0, 1) or ``"normal"``."""
    return "uniform" if config.kind in ("uniform", "shifted_uniform") else "normal"


def time_from_variate(v: Tensor, config: TimeSamplerConfig, sigma_data: float) -> Tensor:
    """TrigFlow times (float64, (n,)) from ``config``'s variates ``v`` (n,) (:func:`time_variate` says which kind)."""
    v = v.double()
    if config.kind == "uniform":
        t = config.t_min + (config.t_max - config.t_min) * v
    elif config.kind == "shifted_uniform":
        tau = config.shift * v / (1.0 + (config.shift - 1.0) * v)
        t = native_to_trigflow_time(tau, "rectified_flow", sigma_data)
    elif config.kind == "lognormal":
        t = native_to_trigflow_time(torch.exp(config.p_mean + config.p_std * v), "edm", sigma_data)
    else:
        tau = torch.sigmoid(config.p_mean + config.p_std * v)
        t = native_to_trigflow_time(tau, "rectified_flow", sigma_data)
    return t.clamp(config.t_min, config.t_max)


# ------------------------------------------------------------------ student schedules


def max_time(scaling: str, sigma_data: float, sigma_max: float) -> float:
    """Largest usable TrigFlow time: pi/2, or ``atan(sigma_max / sigma_d)`` for EDM hosts."""
    return math.atan2(sigma_max, sigma_data) if scaling == "edm" else HALF_PI


def shifted_rf_schedule(steps: int, shift: float, sigma_data: float) -> Tensor:
    """RF times ``1, (steps-1)/steps, ..., 1/steps`` shifted by ``shift``, as TrigFlow t (float64).

    ``tau -> sigma = tau / (1 - tau) -> t = atan(sigma / sigma_d)``, as every RF-time construction
    here: ``shifted_rf_schedule(4, 5, 1)`` is Cosmos-Predict2.5's ``[pi/2, atan 15, atan 5, atan 5/3]``
    (sigma ``[inf, 15, 5, 5/3]``).
    """
    u = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    tau = shift * u / (1.0 + (shift - 1.0) * u)
    return native_to_trigflow_time(tau, "rectified_flow", sigma_data)


def student_schedule(
    spec: str | tuple[float, ...], scaling: str, sigma_data: float, *, shift: float = 5.0,
    sigma_max: float = 80.0,
) -> Tensor:
    """Descending TrigFlow times of the student's sampler (float64, shape (steps,)).

    ``one_step``: ``[t_max]``; ``cosmos_4step``: :func:`shifted_rf_schedule` (4, shift), i.e.
    sigma ``[inf, 15, 5, 5/3]`` for shift 5; a tuple is used as given. Times above the host's
    ``t_max`` (EDM) are clamped to it.
    """
    t_max = max_time(scaling, sigma_data, sigma_max)
    if spec == "one_step":
        ts = torch.tensor([t_max], dtype=torch.float64)
    elif spec == "cosmos_4step":
        ts = shifted_rf_schedule(4, shift, sigma_data)
    elif isinstance(spec, str):
        raise ValueError(f"student schedule {spec!r} is not known; use 'one_step', 'cosmos_4step' or times.")
    else:
        ts = torch.tensor(spec, dtype=torch.float64)
    ts = ts.clamp(max=t_max)
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(
            f"student schedule {ts.tolist()} is not strictly descending after capping at this host's largest "
            f"time {t_max:.6f} (EDM: atan(sigma_max / sigma_data)); drop the times above it."
        )
    return ts


# ------------------------------------------------------------------------- the mixin


@dataclass
class Denoised:
    """Output of :meth:`TrigFlowMixin.trigflow_denoise`: ``x0`` and TrigFlow velocity ``F``, (B, C, T, H, W)."""

    x0: Tensor
    F: Tensor


@dataclass
class ChunkFrames:
    """The ground-truth frames (B, C, n, H, W) and frame mask (B, 1, n, 1, 1) of a condition within one chunk."""

    gt_frames: Tensor
    frame_mask: Tensor


def _per_frame(t: Tensor, x: Tensor) -> Tensor:
    """A time (B,) or scalar as per-frame (B, T) for a state (B, C, T, H, W); (B, T) as it is."""
    if t.ndim == 2:
        return t
    return t.reshape(-1, 1).expand(x.shape[0], x.shape[2]) if t.ndim else t.expand(x.shape[0], x.shape[2])


class TrigFlowMixin:
    """Calls the host's ``predict`` in its native schedule and returns TrigFlow ``x0`` and ``F``.

    Depends only on the host contract (``predict``, ``scaling``, ``prediction_type``,
    ``sigma_data``); the optional ``supports_per_frame_time`` lets Video2World
    conditioning frames carry their own (near-zero) noise level.
    """

    scaling: str
    prediction_type: str
    sigma_data: float
    conditional_sigma: float = 1e-4
    """EDM sigma given to ground-truth frames of a Video2World condition (Cosmos: 1e-4)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if is_composed(cls):
            check_host_class(cls)
            if getattr(cls, "requires_causal_host", False):  # a causal method (CausalKD, Self-Forcing)
                check_causal_host_class(cls)

    predict: Callable[[nn.Module, Tensor, Tensor, Any], Tensor]  # from the host (contract.DiffusionHost)

    def trigflow_denoise(self, net: nn.Module, x_t: Tensor, t: Tensor, condition: Any) -> Denoised:
        """x0 and F of ``net`` at TrigFlow state ``x_t`` (B, C, T, H, W) and time ``t`` (B,) or scalar.

        Not named ``denoise``: Cosmos-style hosts own a ``denoise(x_t, sigma, condition)`` that
        their own samplers call, and a mixin must never shadow it.

        If ``condition`` has ground-truth frames (:class:`FrameConditioning`), they are pasted
        into the input at noise level ``conditional_sigma`` and into the output x0.
        """
        frames = condition if isinstance(condition, FrameConditioning) else None
        return self._denoise(lambda x, time: self.predict(net, x, time, condition), x_t, t, frames)

    def trigflow_denoise_causal(self, net: nn.Module, x_t: Tensor, t: Tensor, condition: Any) -> Denoised:
        """:meth:`trigflow_denoise` through the causal host's block-causal full-sequence forward
        (:class:`~distill_mixins.contract.CausalHost`); ``t`` per frame (B, T), or (B,) for every frame. ``x_t`` may be
        the first T frames of the clip ``condition`` belongs to (a prefix, as streaming without a cache runs)."""
        frames = None
        if isinstance(condition, FrameConditioning):
            window = slice(0, x_t.shape[2])
            frames = ChunkFrames(condition.gt_frames[:, :, window], condition.frame_mask[:, :, window])
        t = _per_frame(_f64(t), x_t)
        return self._denoise(lambda x, time: self.predict_causal(net, x, time, condition), x_t, t, frames)

    def trigflow_denoise_chunk(
        self, net: nn.Module, x_t: Tensor, t: Tensor, condition: Any, start_frame: int, store_kv: bool = False
    ) -> Denoised:
        """:meth:`trigflow_denoise` of one chunk ``x_t`` (B, C, n, H, W) (frames ``start_frame ..``) through the
        causal host's KV cache; ``t`` per frame (B, n) or (B,); ``condition`` is the whole clip's (its
        ground-truth frames are pasted where they fall in the chunk)."""
        frames = None
        if isinstance(condition, FrameConditioning):
            end = start_frame + x_t.shape[2]
            window = slice(start_frame, end)
            frames = ChunkFrames(condition.gt_frames[:, :, window], condition.frame_mask[:, :, window])
        t = _per_frame(_f64(t), x_t)

        def forward(x: Tensor, time: Tensor) -> Tensor:
            return self.predict_chunk(net, x, time, condition, start_frame, store_kv)

        return self._denoise(forward, x_t, t, frames)

    def _denoise(
        self, forward: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, frames: Any
    ) -> Denoised:
        """Native state and time, the ground-truth frames pasted in, ``forward(x, time)``, and back to TrigFlow."""
        t = _f64(t)
        if self.scaling == "edm" and t.device.type == "cpu" and bool((t > EDM_T_LIMIT).any()):
            raise ValueError(
                f"EDM hosts cannot be evaluated at t = {float(t.max()):.6f} (sigma = sigma_data tan t is infinite or "
                "beyond float precision): start at t = atan(sigma_max / sigma_data), e.g. max_time('edm', ...)."
            )
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        x = trigflow_to_native_state(x_t, t, self.scaling, self.sigma_data)
        time = trigflow_to_native_time(t, self.scaling, self.sigma_data)
        if frames is not None:
            x, time = self._paste_condition_input(x, time, frames)
        out = forward(x, time.to(torch.promote_types(x.dtype, torch.float32)))
        x0 = native_output_to_x0(out, x, t, self.scaling, self.prediction_type, self.sigma_data)
        if frames is not None:
            mask = frames.frame_mask.to(x0.dtype)
            x0 = mask * frames.gt_frames.to(x0.dtype) + (1 - mask) * x0
        return Denoised(x0=x0, F=x0_to_F(x0, x_t, t, self.sigma_data))

    def _paste_condition_input(self, x: Tensor, time: Tensor, frames: Any) -> tuple[Tensor, Tensor]:
        """Native input with ground-truth frames at the conditional noise level (B, C, T, H, W)."""
        t_c = native_to_trigflow_time(_f64(self.conditional_sigma), "edm", self.sigma_data).to(x.device)
        a_c, _ = native_coefficients(t_c, self.scaling, self.sigma_data)
        mask = frames.frame_mask.to(x.dtype)
        x = mask * (a_c.item() * frames.gt_frames.to(x.dtype)) + (1 - mask) * x
        if getattr(self, "supports_per_frame_time", False):  # optional host member, default False
            frame_mask = mask[:, 0, :, 0, 0].bool()  # (B, T)
            time_c = trigflow_to_native_time(t_c, self.scaling, self.sigma_data)
            time = time[:, None].expand_as(frame_mask) if time.ndim == 1 else time
            time = torch.where(frame_mask, time_c, time)
        return x, time
