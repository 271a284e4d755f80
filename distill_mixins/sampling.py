"""Samplers in TrigFlow time, all with one signature (k-diffusion style).

``sampler(denoise, noise, ts, *, sigma_data, generator=None) -> x0``

- ``denoise(x_t, t) -> x0``: x_t (B, C, T, H, W), t (B,) float64 TrigFlow time.
- ``noise``: unit normal (B, C, T, H, W); the start state is ``sigma_d sin(ts[0]) noise``
  (pure noise ``z`` at ``t = pi/2``; ``sigma_max eps`` in EDM units below it).
- ``ts``: descending TrigFlow times (float64). ODE samplers integrate
  ``dx_t/dt = (cos t x_t - x0) / sin t = sigma_d F`` (Lu & Song 2024) to ``ts[-1]``
  (use a grid ending at 0); the student sampler denoises at each time.
- ``generator``: the only source of randomness (used by the student's re-noising).

Classifier-free guidance uses one form everywhere (MATH.md section 2):
``x0_cfg = x0_u + w (x0_c - x0_u)``; ``w = 1`` is the conditional model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from distill_mixins.config import RENOISE_MODES, check_choice
from distill_mixins.trigflow import add_noise, native_to_trigflow_time

Denoiser = Callable[[Tensor, Tensor], Tensor]
GRIDS = ("karras", "shifted_rf", "uniform")


def guided_x0(x0_cond: Tensor, x0_uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance in the standard form ``x0_u + w (x0_c - x0_u)``."""
    return x0_uncond + w * (x0_cond - x0_uncond)


def cosmos_guidance_to_w(teacher_guidance: float) -> float:
    """Cosmos ``teacher_guidance = g`` computes ``x0_c + g (x0_c - x0_u)``: ``w = g + 1``."""
    return teacher_guidance + 1.0


def fastgen_guidance_to_w(guidance_scale: float) -> float:
    """FastGen / DMD2 ``guidance_scale = g`` computes ``x0_c + (g - 1)(x0_c - x0_u)``: ``w = g``."""
    return float(guidance_scale)


def time_grid(
    steps: int, kind: str, sigma_data: float, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
    rho: float = 7.0, shift: float = 1.0, t_max: float = math.pi / 2,
) -> Tensor:
    """``steps + 1`` descending TrigFlow times ending at 0 (float64).

    ``karras``: EDM's rho-spaced sigmas from sigma_max to sigma_min (Karras et al. 2022);
    ``shifted_rf``: rectified-flow tau uniform on (1, 0], shifted; ``uniform``: uniform in t.
    """
    check_choice("time_grid", "kind", kind, GRIDS)
    if steps < 1:
        raise ValueError(f"time_grid steps={steps} must be >= 1.")
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    if kind == "karras":
        inv = sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
        t = native_to_trigflow_time(inv**rho, "edm", sigma_data)
    elif kind == "shifted_rf":
        u = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
        tau = shift * u / (1.0 + (shift - 1.0) * u)
        t = native_to_trigflow_time(tau, "rectified_flow", sigma_data)
    else:
        t = t_max * (1.0 - torch.arange(steps, dtype=torch.float64) / steps)
    return torch.cat([t.clamp(max=t_max), torch.zeros(1, dtype=torch.float64)])


def initial_state(noise: Tensor, t0: Tensor, sigma_data: float) -> Tensor:
    """Start state ``sigma_d sin(t0) noise`` (B, ...)."""
    return (sigma_data * math.sin(float(t0)) * noise.double()).to(noise.dtype)


def _velocity(denoise: Denoiser, x: Tensor, t: float) -> Tensor:
    """``dx_t/dt = (cos t x_t - x0) / sin t``."""
    tb = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    x0 = denoise(x, tb)
    return (math.cos(t) * x - x0) / math.sin(t)


def ode_step(denoise: Denoiser, x: Tensor, t: float, s: float, sampler: str, *, sigma_data: float) -> Tensor:
    """One step of ``sampler`` from TrigFlow time ``t`` (state x, (B, C, T, H, W)) to ``s < t``.

    ``euler``/``heun``: Euler or Heun (2nd order; Euler on the step to ``s = 0``, as EDM's sampler) on
    ``dx_t/dt = (cos t x_t - x0) / sin t``. ``ddim``: denoise, then re-noise to ``s`` with the noise the state
    implies (Song et al. 2021); the same arithmetic as Euler in a rectified-flow host's own time (diffusers'
    FlowMatchEulerDiscreteScheduler) or in EDM's ``(x / cos t, sigma)``, and exact in one step to ``s = 0``
    (it returns the x0 prediction there), so a one-step DDIM teacher is the teacher's denoiser at ``t``.
    """
    if sampler == "ddim":
        x0 = denoise(x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device))
        # "ode" re-noises with the noise the state implies; the noise argument is unused in that mode
        return renoise_state(x, x0, t, s, x0, "ode", sigma_data=sigma_data).to(x.dtype)
    d = _velocity(denoise, x, t)
    x_next = x + (s - t) * d
    if sampler == "heun" and s > 0:
        x_next = x + (s - t) * 0.5 * (d + _velocity(denoise, x_next, s))
    return x_next


def _integrate(denoise: Denoiser, noise: Tensor, ts: Tensor, sampler: str, sigma_data: float) -> Tensor:
    x = initial_state(noise, ts[0], sigma_data)
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        x = ode_step(denoise, x, t, s, sampler, sigma_data=sigma_data)
    return x


def sample_euler(
    denoise: Denoiser, noise: Tensor, ts: Tensor, *, sigma_data: float, generator: torch.Generator | None = None
) -> Tensor:
    """Euler steps of the probability-flow ODE in TrigFlow time; returns the state at ``ts[-1]``."""
    return _integrate(denoise, noise, ts, "euler", sigma_data)


def sample_heun(
    denoise: Denoiser, noise: Tensor, ts: Tensor, *, sigma_data: float, generator: torch.Generator | None = None
) -> Tensor:
    """Heun (2nd order) steps in TrigFlow time; the step to ``t = 0`` is Euler (as EDM's sampler)."""
    return _integrate(denoise, noise, ts, "heun", sigma_data)


def sample_ddim(
    denoise: Denoiser, noise: Tensor, ts: Tensor, *, sigma_data: float, generator: torch.Generator | None = None
) -> Tensor:
    """Deterministic DDIM steps (see :func:`ode_step`): one network evaluation a step; returns the state at ``ts[-1]``
    (the x0 prediction when the grid ends at 0). The usual sampler of rectified-flow teachers (flow-matching Euler)."""
    return _integrate(denoise, noise, ts, "ddim", sigma_data)


def sample_student(
    denoise: Denoiser, noise: Tensor, ts: Tensor, *, sigma_data: float,
    generator: torch.Generator | None = None, renoise: str = "fresh",
) -> Tensor:
    """Few-step student sampling: denoise at each ``t_k``, re-noise to ``t_{k+1}``; returns x0.

    ``renoise="fresh"`` draws new noise each step (FastGen 'sde', the default, matching DMD2's
    backward simulation); ``"initial"`` reuses ``noise`` (Cosmos); ``"ode"`` re-noises with the noise
    implied by the current state, ``(x_t - cos t x0) / (sigma_d sin t)`` (deterministic DDIM), the
    natural choice for a multi-step KD student trained on the teacher's ODE path.
    """
    check_choice("sample_student", "renoise", renoise, RENOISE_MODES)
    x = initial_state(noise, ts[0], sigma_data)
    x0 = x
    times = ts.tolist()
    for k, t in enumerate(times):
        x0 = denoise(x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device))
        if k + 1 < len(times):
            x = renoise_state(x, x0, t, times[k + 1], noise, renoise, sigma_data=sigma_data, generator=generator)
    return x0


def renoise_state(
    x_t: Tensor, x0: Tensor, t: float, s: float, noise: Tensor, renoise: str, *, sigma_data: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Few-step re-noising of the prediction ``x0`` from time ``t`` (state ``x_t``) to ``s``: ``cos s x0 + sin s sigma_d
    eps`` with fresh ``eps`` (``"fresh"``), the initial ``noise`` (``"initial"``), or the noise implied by the
    current state, ``(x_t - cos t x0) / (sigma_d sin t)`` (``"ode"``, DDIM, Song et al. 2021). (B, C, T, H, W)."""
    if renoise == "ode":
        eps = (x_t.double() - math.cos(t) * x0.double()) / (sigma_data * math.sin(t))
    else:
        eps = noise if renoise == "initial" else _randn_like(noise, generator)
    return add_noise(x0, eps, torch.tensor(s, dtype=torch.float64), sigma_data)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": sample_euler, "heun": sample_heun, "ddim": sample_ddim}


def sample_ode_states(
    denoise: Denoiser, noise: Tensor, ts: Tensor, *, sigma_data: float, record: tuple[int, ...] = (),
    sampler: str = "heun",
) -> tuple[Tensor, Tensor]:
    """ODE sampling as :func:`sample_euler`/:func:`sample_heun`/:func:`sample_ddim` (same arithmetic), also returning
    the states at ``ts[i]`` for ``i`` in ``record`` (ascending grid indices): ``(x0, states (B, K, C, T, H, W))``."""
    check_choice("sample_ode_states", "sampler", sampler, tuple(SAMPLERS))
    if list(record) != sorted(set(record)) or any(not 0 <= i < len(ts) for i in record):
        raise ValueError(
            f"sample_ode_states record={record}: give ascending, distinct indices into ts (0..{len(ts) - 1})."
        )
    x = initial_state(noise, ts[0], sigma_data)
    states = [x] if 0 in record else []
    for i, (t, s) in enumerate(zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True), start=1):
        x = ode_step(denoise, x, t, s, sampler, sigma_data=sigma_data)
        if i in record:
            states.append(x)
    path = torch.stack(states, dim=1) if states else x.new_empty((x.shape[0], 0, *x.shape[1:]))
    return x, path
