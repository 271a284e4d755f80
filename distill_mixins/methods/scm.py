"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song 2024, arXiv 2410.11081; MATH.md section 5).

The student's consistency function is ``f(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t, t)`` (the x0 of
:meth:`~distill_mixins.trigflow.TrigFlowMixin.trigflow_denoise`). Along the guided teacher's probability-flow ODE
``dx_t/dt = sigma_d F_T(x_t, t)`` an exact consistency function is constant, and the sCM gradient pushes
``F_theta`` along the tangent ``g = cos t df^-/dt``:

1. ``t`` lognormal on ``sigma = sigma_d tan t`` (``log sigma ~ N(p_mean, p_std^2)``, clamped to [sigma_min, sigma_max]);
2. ``x_t = cos t x0 + sin t sigma_d eps``; ``dx_t/dt = sigma_d F_T`` with CFG ``w`` (no gradient);
3. ``(F^-, dF) = jvp(F_theta, (x_t, t), (cos t sin t dx_t/dt, cos t sin t))`` without gradient (``dF = cos t sin t
   dF^-/dt``; attention through :mod:`~distill_mixins.parallel.explicit_attention`'s forward rule, SDPA's fused
   kernels having none), or a central difference along the same direction;
4. ``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d dF)``, ``r = min(1, iteration / warm-up)``
   (rCM's form ramps the first term as ``cos t sqrt(1 - r^2 sin^2 t)``); at ``r = 1``, ``g = cos t df^-/dt``;
5. ``g / (||g|| / sqrt(D) + c)`` (FastGen) or ``g / (||g||_2 + c)`` (rCM), per sample;
6. ``|| F_theta - sg(F_theta) - g ||^2`` through a second, ordinary forward, weighted by a learned ``exp(-u(t))`` with
   ``+ u(t)`` (adaptive weighting, FastGen / the sCM paper) or scaled by a constant (rCM: 100).

Samples whose tangent or student output is not finite are dropped from the loss and counted (``nan_dropped``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from loguru import logger
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill_mixins.config import DistillConfig, OptimizerConfig, TimeSamplerConfig, check_choice, check_positive
from distill_mixins.core import DistillationCoreMixin, DistillBatch
from distill_mixins.parallel.explicit_rules import ExplicitRules
from distill_mixins.trigflow import HALF_PI, add_noise, expand_time, x0_to_F

DERIVATIVES = ("auto", "jvp", "finite_difference")
NORMALIZATIONS = ("fastgen", "rcm")
WARMUP_FORMS = ("scm", "rcm")
LOSS_REDUCTIONS = ("mean", "sum")
RCM_INTERMEDIATE_TIMES = (1.5, 1.4, 1.0)
"""rCM's TrigFlow times after the first step of an N-step sampler: ``[1.5, 1.4, 1.0][:N - 1]`` (NVlabs/rcm)."""

Velocity = Callable[[Tensor, Tensor], Tensor]
"""``F(x_t, t)``: a network's TrigFlow velocity at state (B, C, T, H, W) and time (B,) float64."""


def _rcm_optimizer() -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01, grad_clip=None)


@dataclass
class SCMConfig(DistillConfig):
    """sCM settings. Defaults: the sCM part of rCM's Wan 2.1 T2V 1.3B recipe (NVlabs/rcm), the only published video
    sCM recipe; :meth:`fastgen` gives FastGen's sCM recipe (adaptive weighting). Guidance is the standard form
    ``x0_u + w (x0_c - x0_u)`` (docs/guidance.md)."""

    student_optimizer: OptimizerConfig = field(default_factory=_rcm_optimizer)
    """rCM Wan 1.3B: AdamW lr 2e-6, betas (0, 0.999), weight decay 0.01, no gradient clipping."""
    guidance_scale: float = 6.0
    """Teacher CFG ``w`` (standard form). rCM's code computes ``F_c + 5 (F_c - F_u)`` (teacher_guidance 5, the
    Cosmos form): ``w = 6``."""
    p_mean: float = 0.7
    """Mean of ``log sigma``, ``sigma = sigma_d tan t``. rCM Wan 1.3B: -0.8 with sigma scaled by sqrt(20 latent
    frames), i.e. 0.7; FastGen CIFAR-10: -1.0."""
    p_std: float = 1.6
    """Std of ``log sigma``. rCM: 1.6; FastGen: 1.4."""
    sigma_min: float = 0.002
    """Smallest training sigma (the clamp of MATH.md section 5; the largest is ``sigma_max``, 80)."""
    tangent_warmup: int = 1000
    """Iterations of the warm-up ratio ``r = min(1, iteration / tangent_warmup)`` (0: r = 1). rCM 1.3B: 1000;
    FastGen: 10000."""
    warmup_form: str = "rcm"
    """``scm``: ``g = -cos^2 t (sigma_d F^- - dx/dt) - r (...)`` (the paper, FastGen); ``rcm``: the first term's
    ``cos^2 t`` becomes ``cos t sqrt(1 - r^2 sin^2 t)`` (NVlabs/rcm). Both are the sCM tangent at r = 1."""
    normalization: str = "rcm"
    """Tangent normalisation: ``fastgen``: ``g / (||g|| / sqrt(D) + c)``; ``rcm``: ``g / (||g||_2 + c)``."""
    normalization_const: float = 0.1
    """``c`` of the normalisation (FastGen and rCM: 0.1)."""
    loss_reduction: str = "sum"
    """Per-sample reduction of ``(F - sg(F) - g)^2``: ``sum`` (rCM) or ``mean`` (the paper's ``||.||^2 / D``)."""
    loss_scale: float = 100.0
    """Constant loss scale when ``adaptive_weighting`` is off (rCM: 100)."""
    adaptive_weighting: bool = False
    """Learn ``u(t)`` (a tiny MLP, ``net_logvar``, trained with the student): loss ``exp(-u) L + u`` (sCM, FastGen)."""
    prior_weighting: bool = False
    """Multiply the per-sample loss by ``1 / (sigma_d tan t)`` (the sCM paper's prior weighting; FastGen: on)."""
    derivative: str = "auto"
    """``jvp`` (forward-mode AD; raises when the network cannot run it), ``finite_difference`` (central difference
    along the teacher's ODE), or ``auto`` (jvp, falling back to the difference with a logged reason)."""
    fd_step: float = 1e-4
    """Central-difference step in t (rCM's ``fd_size``), at most t / 2. FastGen steps 1e-3 t, which suits EDM
    networks embedding ``log sigma``; a network embedding ``1000 tau`` (Wan) turns ~1000 rad per unit t, where a
    1e-3 step is 6% off in float64 and 1e-4 is 0.07% off (tests/test_scm.py)."""

    has_critic: ClassVar[bool] = False
    """Whether the method has critic phases (rCM); plain sCM trains the student at every iteration."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if not self.has_critic and self.student_update_freq != 1:
            raise ValueError(f"{name}.student_update_freq={self.student_update_freq}: sCM has no critic; use 1.")
        check_choice(name, "derivative", self.derivative, DERIVATIVES)
        check_choice(name, "normalization", self.normalization, NORMALIZATIONS)
        check_choice(name, "warmup_form", self.warmup_form, WARMUP_FORMS)
        check_choice(name, "loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_positive(name, "guidance_scale", self.guidance_scale)
        check_positive(name, "p_std", self.p_std)
        check_positive(name, "sigma_min", self.sigma_min)
        check_positive(name, "normalization_const", self.normalization_const)
        check_positive(name, "loss_scale", self.loss_scale)
        if not math.isfinite(self.p_mean):
            raise ValueError(f"{name}.p_mean={self.p_mean!r} must be a finite number.")
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"{name}.sigma_min={self.sigma_min} must be < sigma_max={self.sigma_max}.")
        if not isinstance(self.tangent_warmup, int) or isinstance(self.tangent_warmup, bool) or self.tangent_warmup < 0:
            raise ValueError(f"{name}.tangent_warmup={self.tangent_warmup!r} must be an int >= 0.")
        if not (math.isfinite(self.fd_step) and 0 < self.fd_step <= 0.01):
            raise ValueError(f"{name}.fd_step={self.fd_step!r} must be in (0, 0.01] (a step in TrigFlow time).")

    @classmethod
    def rcm_wan2_1_1_3b(cls, **overrides: Any) -> SCMConfig:
        """The sCM part of rCM's Wan 2.1 T2V 1.3B recipe (the defaults): guidance 5 in rCM's (Cosmos) form (w = 6),
        lognormal (0.7, 1.6), tangent warm-up 1000 (rCM form), rCM normalisation, sum x 100, AdamW 2e-6."""
        return cls(**overrides)

    @classmethod
    def rcm_wan2_1_14b(cls, **overrides: Any) -> SCMConfig:
        """rCM's Wan 2.1 T2V 14B values for the sCM part: lr 1e-6, tangent warm-up 300 (NVlabs/rcm's config),
        sigma_max 200 (MATH.md section 5)."""
        values: dict[str, Any] = {
            "student_optimizer": OptimizerConfig(name="adamw", lr=1e-6, betas=(0.0, 0.999), weight_decay=0.01,
                                                 grad_clip=None),
            "tangent_warmup": 300, "sigma_max": 200.0,
        }
        return cls(**{**values, **overrides})

    @classmethod
    def fastgen(cls, **overrides: Any) -> SCMConfig:
        """FastGen's sCM (``configs/methods/config_scm.py``): lognormal (-1.0, 1.4), tangent warm-up 10000 (sCM form),
        FastGen normalisation (c = 0.1), adaptive weighting with the prior weighting, mean reduction, no CFG, Adam
        betas (0.9, 0.99) without weight decay (FastGen uses RAdam)."""
        values: dict[str, Any] = {
            "guidance_scale": 1.0, "p_mean": -1.0, "p_std": 1.4, "tangent_warmup": 10000, "warmup_form": "scm",
            "normalization": "fastgen", "loss_reduction": "mean", "adaptive_weighting": True, "prior_weighting": True,
            "student_optimizer": OptimizerConfig(name="adam", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                                                 grad_clip=None),
        }
        return cls(**{**values, **overrides})


# ------------------------------------------------------------------------------------------------- equations


def _cos_sin(t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    te = expand_time(t.double(), like).to(like.device)
    return torch.cos(te), torch.sin(te)


def warmup_ratio(iteration: int, tangent_warmup: int) -> float:
    """``r = min(1, iteration / tangent_warmup)`` (sCM tangent warm-up; 1 without warm-up)."""
    return 1.0 if tangent_warmup == 0 else min(1.0, iteration / tangent_warmup)


def scm_tangent(
    F_minus: Tensor, dF: Tensor, dxdt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float, r: float = 1.0,
    form: str = "scm",
) -> Tensor:
    """``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d dF)``, ``dF = cos t sin t dF^-/dt``
    (sCM tangent with warm-up, Lu & Song 2024 sec. 4; rCM form: ``cos^2 t -> cos t sqrt(1 - r^2 sin^2 t)``), float64."""
    cos, sin = _cos_sin(t, x_t)
    first = cos * cos if form == "scm" else cos * torch.sqrt(1.0 - r * r * sin * sin)
    F_minus, dF, dxdt, x_t = F_minus.double(), dF.double(), dxdt.double(), x_t.double()
    return -first * (sigma_data * F_minus - dxdt) - r * (cos * sin * x_t + sigma_data * dF)


def normalize_tangent(g: Tensor, kind: str = "fastgen", const: float = 0.1) -> Tensor:
    """``g / (||g|| / sqrt(D) + c)`` (FastGen) or ``g / (||g||_2 + c)`` (rCM), per sample (sCM tangent norm.)."""
    check_choice("normalize_tangent", "kind", kind, NORMALIZATIONS)
    norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)
    if kind == "fastgen":
        norm = norm / math.sqrt(g[0].numel())
    return g / (norm + const)


def scm_distance(F: Tensor, g: Tensor, reduction: str = "sum") -> Tensor:
    """Per-sample ``|| F_theta - sg(F_theta) - g ||^2`` (sum, or mean over the D elements) (sCM loss, Lu & Song 2024
    eq. 8); its gradient w.r.t. F is ``-2 g`` (sum). (B,) float64."""
    diff = F.double() - F.detach().double() - g.double()
    per_element = diff.pow(2).flatten(1)
    return per_element.sum(1) if reduction == "sum" else per_element.mean(1)


def adaptive_weighted(distance: Tensor, logvar: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """``weight exp(-u(t)) L + u(t)`` per sample (sCM adaptive weighting, Lu & Song 2024 sec. 4.3)."""
    logvar = logvar.double()
    return weight * torch.exp(-logvar) * distance + logvar


def prior_weight(t: Tensor, sigma_data: float) -> Tensor:
    """``1 / (sigma_d tan t)`` (sCM prior weighting), float64 (B,)."""
    return 1.0 / (sigma_data * torch.tan(t.double()))


class LogVarHead(nn.Module):
    """The adaptive-weighting head ``u(t)``: Fourier features of t (frequencies 1..8) -> MLP -> a scalar per sample;
    the last layer starts at zero (u = 0)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.arange(1, 9, dtype=torch.float32), persistent=False)
        self.body = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, t: Tensor) -> Tensor:
        """u(t) (B,) float32 for TrigFlow times t (B,)."""
        angles = t.to(device=self.frequencies.device, dtype=torch.float32)[:, None] * self.frequencies
        return self.body(torch.cat([angles.sin(), angles.cos()], dim=1))[:, 0]


# --------------------------------------------------------------------------------------- derivative of F


def velocity_jvp(F: Velocity, x_t: Tensor, t: Tensor, dxdt: Tensor) -> tuple[Tensor, Tensor]:
    """``(F^-, dF) = jvp(F, (x_t, t), (cos t sin t dx_t/dt, cos t sin t))`` without gradient (sCM step 3).

    SDPA's fused kernels have no forward derivative: the library's attention dispatch takes its explicit attention
    by itself, and PyTorch SDPA called by the network directly (diffusers' processors) is sent to the same rule, or
    to SDPA's math backend for a call the rule does not take; ``F.linear`` and ``F.layer_norm`` run rules that skip
    the weights' absent tangents (:class:`~distill_mixins.parallel.explicit_rules.ExplicitRules`, one function mode
    for all three)."""
    cos, sin = _cos_sin(t, x_t)
    tangent_x = (cos * sin * dxdt.double()).to(x_t.dtype)
    tangent_t = (torch.cos(t.double()) * torch.sin(t.double())).to(t.dtype)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), ExplicitRules():
        return torch.func.jvp(F, (x_t, t), (tangent_x, tangent_t))


def velocity_central_difference(F: Velocity, x_t: Tensor, t: Tensor, dxdt: Tensor, step: float = 1e-4) -> Tensor:
    """``dF ~ cos t sin t (F(x_t + h v, t + h) - F(x_t - h v, t - h)) / 2h``, ``v = dx_t/dt``, ``h = step`` (at most
    t / 2 and (pi/2 - t) / 2): the central difference along the teacher's ODE (sCM step 7), differences in float64;
    (B, C, T, H, W) float64."""
    t = t.double()
    h = torch.minimum(torch.full_like(t, step), torch.minimum(0.5 * t, 0.5 * (HALF_PI - t))).clamp(min=1e-12)
    he = expand_time(h, x_t).to(x_t.device)
    with torch.no_grad():
        F_plus = F((x_t.double() + he * dxdt.double()).to(x_t.dtype), t + h).double()
        F_minus = F((x_t.double() - he * dxdt.double()).to(x_t.dtype), t - h).double()
    cos, sin = _cos_sin(t, x_t)
    return cos * sin * (F_plus - F_minus) / (2.0 * he)


_FORWARD_AD_HINTS = ("forward ad", "forward-mode", "forward mode", "forward_ad", "jvp", "dual", "functorch")


def is_forward_ad_error(error: BaseException) -> bool:
    """Whether an exception raised inside ``torch.func.jvp`` says that forward-mode AD cannot run (an op without a
    forward derivative, a module that cannot run under the transform)."""
    return isinstance(error, (RuntimeError, NotImplementedError)) and any(
        hint in str(error).lower() for hint in _FORWARD_AD_HINTS
    )


def forward_ad_blocker(net: nn.Module) -> str | None:
    """Why ``torch.func.jvp`` cannot run through ``net``, known before trying (None when nothing is known): FSDP-wrapped
    modules (pytorch#182641)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return None
    for name, module in net.named_modules():
        if isinstance(module, (FSDPModule, FullyShardedDataParallel)):
            where = f"'{name}'" if name else "the network itself"
            return (f"{where} is FSDP-wrapped ({type(module).__name__}): torch.func.jvp does not run through FSDP "
                    "modules (pytorch#182641)")
    return None


def consistency_times(
    steps: int, t_max: float, intermediate: tuple[float, ...] = RCM_INTERMEDIATE_TIMES
) -> tuple[float, ...]:
    """Times of an N-step consistency sampler: ``t_max`` then ``intermediate[:N - 1]`` (rCM: ``[1.5, 1.4, 1.0]``;
    the alternative ``[1.3, 1.0, 0.6]``). Consistency students are trained on continuous t, so any descending times
    below ``t_max`` work."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"consistency_times steps={steps!r} must be an int >= 1.")
    if steps - 1 > len(intermediate):
        raise ValueError(
            f"consistency_times: {steps} steps need {steps - 1} intermediate times, {len(intermediate)} given "
            f"({intermediate}); pass intermediate= with more."
        )
    times = (float(t_max), *(float(t) for t in intermediate[: steps - 1]))
    if any(a <= b for a, b in zip(times, times[1:], strict=False)) or times[-1] <= 0:
        raise ValueError(f"consistency_times {times}: need strictly descending times in (0, t_max = {t_max:.6f}].")
    return times


# ------------------------------------------------------------------------------------------------- the mixin


class SCMMixin(DistillationCoreMixin):
    """sCM (Lu & Song 2024): the student's consistency function follows the CFG teacher's probability-flow ODE.

    Compose before the host: ``class MySCM(SCMMixin, MyVideo2WorldModel)``; construct with
    ``MySCM(<host args>, distill=SCMConfig())``. Student phase only; with ``adaptive_weighting`` the weighting head
    ``net_logvar`` is trained with the student (by the student's optimizer settings). Sample with
    ``model.generate(condition, noise, schedule=model.consistency_times(steps))``.
    """

    config_class = SCMConfig
    uses_critic = False
    student_phase_networks = ("net", "net_logvar")

    def __init__(self, *args: Any, distill: SCMConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, distill=distill, **kwargs)
        config: SCMConfig = self.distill_config  # type: ignore[assignment]
        self.derivative_fallback_reason: str | None = None
        """Why ``derivative="auto"`` runs the finite difference (None while it runs the JVP)."""
        if config.adaptive_weighting:
            device = next(self.net.parameters()).device
            self.net_logvar = LogVarHead().to(device).train()
            self._trained_names["net_logvar"] = frozenset(n for n, _ in self.net_logvar.named_parameters())
            self.nonfinite_grad_counts["net_logvar"] = 0

    # ------------------------------------------------------------------ pieces

    def scm_time_config(self) -> TimeSamplerConfig:
        """The lognormal training-time distribution on ``sigma = sigma_d tan t``, clamped to [sigma_min, sigma_max]."""
        config: SCMConfig = self.distill_config  # type: ignore[assignment]
        sd = self.sigma_data
        return TimeSamplerConfig(
            kind="lognormal", p_mean=config.p_mean, p_std=config.p_std, t_min=math.atan2(config.sigma_min, sd),
            t_max=math.atan2(config.sigma_max, sd),
        )

    def consistency_times(
        self, steps: int, intermediate: tuple[float, ...] = RCM_INTERMEDIATE_TIMES
    ) -> tuple[float, ...]:
        """N-step sampling times: the largest training time ``atan(sigma_max / sigma_d)``, then ``intermediate``
        (see :func:`consistency_times`); pass them to ``generate(..., schedule=...)``."""
        return consistency_times(steps, math.atan2(self.distill_config.sigma_max, self.sigma_data), intermediate)

    def student_times(self) -> Tensor:
        """The student sampler's times (float64, (steps,)): ``student_schedule="one_step"`` is the consistency sampler's
        single step from the largest training time ``atan(sigma_max / sigma_d)`` (a rectified-flow host's own one step,
        pi/2, lies outside what sCM trains); a tuple of times (e.g. :meth:`consistency_times`) is used as given."""
        if self.distill_config.student_schedule == "one_step":
            return torch.tensor(self.consistency_times(1), dtype=torch.float64)
        return super().student_times()

    def teacher_velocity(self, data: DistillBatch, x_t: Tensor, t: Tensor) -> Tensor:
        """``dx_t/dt = sigma_d F_T`` of the teacher with CFG ``x0_u + w (x0_c - x0_u)`` (no gradient)."""
        w = self.distill_config.guidance_scale  # type: ignore[attr-defined]
        with torch.no_grad():
            x0 = self.guided_denoiser(self.net_teacher, data.condition, data.uncondition, w)(x_t, t)
            return self.sigma_data * x0_to_F(x0, x_t, t, self.sigma_data)

    def student_velocity(self, data: DistillBatch) -> Velocity:
        """The student's ``F_theta(x_t, t)`` for this batch's condition."""
        return lambda x, t: self.trigflow_denoise(self.net, x, t, data.condition).F

    def velocity_derivative(
        self, F: Velocity, x_t: Tensor, t: Tensor, dxdt: Tensor, net: nn.Module
    ) -> tuple[Tensor, bool]:
        """``dF = cos t sin t dF/dt`` along the teacher's ODE by ``SCMConfig.derivative``; and whether the finite
        difference ran. ``net``: the network ``F`` runs (checked for FSDP)."""
        config: SCMConfig = self.distill_config  # type: ignore[assignment]
        if config.derivative == "finite_difference":
            return velocity_central_difference(F, x_t, t, dxdt, config.fd_step), True
        if config.derivative == "auto" and self.derivative_fallback_reason is not None:
            return velocity_central_difference(F, x_t, t, dxdt, config.fd_step), True
        blocker = forward_ad_blocker(net)
        if blocker is None:
            try:
                return velocity_jvp(F, x_t, t, dxdt)[1], False
            except (RuntimeError, NotImplementedError) as error:
                if not is_forward_ad_error(error):
                    raise
                blocker = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                cause: BaseException | None = error
        else:
            cause = None
        if config.derivative == "jvp":
            raise RuntimeError(
                f"SCMConfig.derivative='jvp': the student cannot run forward-mode AD ({blocker}). Use "
                "derivative='auto' (falls back to a central finite difference along the teacher's ODE) or "
                "'finite_difference'."
            ) from cause
        self.derivative_fallback_reason = blocker
        logger.warning("sCM derivative='auto': finite difference instead of torch.func.jvp: {}", blocker)
        return velocity_central_difference(F, x_t, t, dxdt, config.fd_step), True

    # ----------------------------------------------------------------- phase

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """One sCM step: tangent of the student along the CFG teacher's ODE, loss through a second forward."""
        config: SCMConfig = self.distill_config  # type: ignore[assignment]
        x0 = data.x0
        t = self.sample_t(x0.shape[0], self.scm_time_config()).to(x0.device)
        x_t = add_noise(x0, self.draws.randn_like(x0), t, self.sigma_data)
        dxdt = self.teacher_velocity(data, x_t, t)
        F_student = self.student_velocity(data)
        dF, used_fd = self.velocity_derivative(F_student, x_t, t, dxdt, self.net)
        F = F_student(x_t, t)  # the ordinary forward that carries the gradient
        r = warmup_ratio(iteration, config.tangent_warmup)
        g_raw = scm_tangent(F.detach(), dF, dxdt, x_t, t, self.sigma_data, r, config.warmup_form)
        keep = torch.isfinite(g_raw).flatten(1).all(1) & torch.isfinite(F.detach()).flatten(1).all(1)
        keep_e = expand_time(keep, F)
        g_raw = torch.where(keep_e, g_raw, torch.zeros_like(g_raw))
        g = normalize_tangent(g_raw, config.normalization, config.normalization_const)
        F_kept = torch.where(keep_e, F, torch.zeros_like(F))
        distance = scm_distance(F_kept, g, config.loss_reduction)
        weight = prior_weight(t, self.sigma_data) if config.prior_weighting else torch.ones_like(distance)
        output: dict[str, Tensor] = {}
        if config.adaptive_weighting:
            logvar = self.net_logvar(t)
            per_sample = adaptive_weighted(distance, logvar, weight.to(distance.device))
            output["logvar_mean"] = logvar.detach().mean()
        else:
            per_sample = config.loss_scale * weight.to(distance.device) * distance
        per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
        loss = (per_sample.sum() / x0.shape[0]).float()  # dropped samples count as zero: split-invariant
        kept = keep.sum().clamp(min=1)
        output.update({
            "loss_scm": loss.detach(),
            "loss_scm_unweighted": (torch.where(keep, distance, 0.0).sum() / kept).detach().float(),
            "tangent_norm": (torch.linalg.vector_norm(g_raw.flatten(1), dim=1).sum() / kept).detach().float(),
            "warmup_ratio": torch.tensor(r),
            "nan_dropped": (~keep).sum().detach(),
            "finite_difference": torch.tensor(float(used_fd)),
            "t_mean": t.mean().detach(),
        })
        return output, loss


__all__ = [
    "DERIVATIVES",
    "LogVarHead",
    "RCM_INTERMEDIATE_TIMES",
    "SCMConfig",
    "SCMMixin",
    "adaptive_weighted",
    "consistency_times",
    "forward_ad_blocker",
    "is_forward_ad_error",
    "normalize_tangent",
    "prior_weight",
    "scm_distance",
    "scm_tangent",
    "velocity_central_difference",
    "velocity_jvp",
    "warmup_ratio",
]
