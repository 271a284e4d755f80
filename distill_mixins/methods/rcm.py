"""rCM: sCM regularised by DMD (Zheng et al. 2025, "Large Scale Diffusion Distillation via Score-Regularized
Continuous-Time Consistency", arXiv 2510.08431; MATH.md section 5).

The student loss is ``L_sCM + lambda_DMD L_DMD``: the sCM loss of :mod:`distill_mixins.methods.scm` on data states,
plus the DMD2 student loss of :mod:`distill_mixins.methods.dmd2` (backward-simulated 1-N step student sample,
re-noised at a critic time, CFG teacher minus critic) on the student's own samples; critic phases are DMD2's. No
piece is copied: :class:`RCMMixin` composes :class:`~distill_mixins.methods.dmd2.DMD2Mixin` and
:class:`~distill_mixins.methods.scm.SCMMixin` and adds their student losses.

The student is a consistency model: its N-step sampler (also the one DMD backward-simulates) is the consistency
sampler, ``student_schedule=model.consistency_times(N)`` with fresh noise at each re-noising (``renoise="fresh"``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from distill_mixins.config import OptimizerConfig, TimeSamplerConfig, check_choice, check_positive
from distill_mixins.core import DistillBatch
from distill_mixins.methods.dmd2 import DMD2Config, DMD2Mixin
from distill_mixins.methods.scm import SCMConfig, SCMMixin
from distill_mixins.sampling import initial_state
from distill_mixins.trigflow import add_noise

SIMULATIONS = ("random", "schedule")


def _adamw(lr: float) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=lr, betas=(0.0, 0.999), weight_decay=0.01, grad_clip=None)


@dataclass
class RCMConfig(DMD2Config, SCMConfig):
    """rCM settings: every :class:`SCMConfig` and :class:`DMD2Config` field, plus the DMD term's weight and the
    sCM-only warm-up. Defaults: rCM's Wan 2.1 T2V 1.3B recipe (:meth:`wan2_1_1_3b`, NVlabs/rcm, MATH.md section 5)."""

    has_critic: ClassVar[bool] = True

    student_update_freq: int = 5
    """One student phase per ``student_update_freq`` iterations, critic phases between (rCM 1.3B: 5; 14B: 10)."""
    student_optimizer: OptimizerConfig = field(default_factory=lambda: _adamw(2e-6))
    """rCM 1.3B: AdamW lr 2e-6, betas (0, 0.999)."""
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: _adamw(4e-7))
    """rCM 1.3B: AdamW lr 4e-7, betas (0, 0.999)."""
    guidance_scale: float = 6.0
    """Teacher CFG ``w`` (standard form) of both terms: rCM's ``F_c + 5 (F_c - F_u)`` is ``w = 6``."""
    critic_time: TimeSamplerConfig = field(default_factory=lambda: TimeSamplerConfig(kind="shifted_uniform", shift=5.0))
    """Critic / DMD re-noising times: shifted uniform, shift 5 (rCM)."""
    dmd_loss_weight: float = 1.0
    """``lambda_DMD``: weight of the DMD2 student loss (with its optional GAN and refine terms) beside sCM's (rCM: 1,
    with the sCM loss scaled by ``loss_scale`` = 100)."""
    dmd_reduction: str = "sum"
    """rCM sums the DMD term per sample as it sums sCM's (DMD2's default is the mean): with sCM's tangent normalised
    to norm < 1, the DMD term's share grows with the sample's size D (its gradient norm ~ sqrt(D)), so the weight
    1 means what it means in rCM only with this reduction (docs/methods/rcm.md)."""
    simulation: str = "random"
    """The student samples of the DMD term and the critic: ``random`` (NVlabs/rcm's backward simulation: n ~
    U{1..simulation_steps} consistency steps from ``atan(sigma_max / sigma_d)``, each later time drawn per sample from
    ``critic_time`` and capped by the one before, fresh noise, the gradient on the last step; it trains every 1-N
    step sampler at free times) or ``schedule`` (DMD2's backward simulation over ``student_schedule``)."""
    simulation_steps: int = 4
    """Largest n of the ``random`` simulation (rCM's ``max_simulation_steps_fake``: 4)."""
    critic_samples: str = "simulated"
    """The critic fits the same simulated samples the DMD term scores (rCM); ``final``: n = the largest n."""
    scm_only_iterations: int | None = None
    """Student phases at iterations below this train the sCM loss alone (critic phases run as usual); None: until
    ``tangent_warmup`` ends, as NVlabs/rcm starts its DMD term."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(name, "dmd_loss_weight", self.dmd_loss_weight, allow_zero=True)
        check_choice(name, "simulation", self.simulation, SIMULATIONS)
        if not isinstance(self.simulation_steps, int) or isinstance(self.simulation_steps, bool) or (
            self.simulation_steps < 1
        ):
            raise ValueError(f"{name}.simulation_steps={self.simulation_steps!r} must be an int >= 1.")
        if self.simulation == "random" and (self.student_schedule != "one_step" or not self.backward_simulation):
            raise ValueError(
                f"{name}.student_schedule={self.student_schedule!r} / backward_simulation={self.backward_simulation} "
                f"apply only with {name}.simulation='schedule'; with 'random' (rCM) the DMD term draws its 1-"
                f"{self.simulation_steps} steps and times. Sample an N-step student with "
                "model.generate(..., schedule=model.consistency_times(N))."
            )
        value = self.scm_only_iterations
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name}.scm_only_iterations={value!r} must be an int >= 0, or None (= tangent_warmup).")

    @property
    def dmd_start(self) -> int:
        """The first iteration whose student phase has the DMD term: ``scm_only_iterations``, or ``tangent_warmup``."""
        return self.tangent_warmup if self.scm_only_iterations is None else self.scm_only_iterations

    @classmethod
    def wan2_1_1_3b(cls, **overrides: Any) -> RCMConfig:
        """rCM, Wan 2.1 T2V 1.3B: student lr 2e-6, critic lr 4e-7 (AdamW, betas (0, 0.999)), CFG 5 in rCM's form
        (w = 6), sCM x 100 + DMD x 1 (both summed per sample), DMD from the end of the tangent warm-up, critic time
        shifted uniform (shift 5), student update every 5 iterations, tangent warm-up 1000, sigma_max 80 (the
        defaults)."""
        return cls(**overrides)

    @classmethod
    def wan2_1_14b(cls, **overrides: Any) -> RCMConfig:
        """rCM, Wan 2.1 T2V 14B: student lr 1e-6, critic lr 1e-7, student update every 10 iterations, tangent
        warm-up 300 (NVlabs/rcm's public config; MATH.md says 0), sigma_max 200; the rest as 1.3B."""
        values: dict[str, Any] = {
            "student_optimizer": _adamw(1e-6), "critic_optimizer": _adamw(1e-7), "student_update_freq": 10,
            "tangent_warmup": 300, "sigma_max": 200.0,
        }
        return cls(**{**values, **overrides})


class RCMMixin(DMD2Mixin, SCMMixin):
    """rCM: the sCM student loss plus ``dmd_loss_weight`` times the DMD2 student loss; DMD2's critic phases.

    Compose before the host: ``class MyRCM(RCMMixin, MyVideo2WorldModel)``; construct with
    ``MyRCM(<host args>, distill=RCMConfig(student_schedule=...))``. Networks: ``net`` (student), ``net_fake_score``
    (critic), ``net_logvar`` (with ``adaptive_weighting``), ``net_discriminator`` (with a GAN term). Sample with
    ``model.generate(condition, noise, schedule=model.consistency_times(steps))``.
    """

    config_class = RCMConfig
    uses_critic = True
    student_phase_networks = SCMMixin.student_phase_networks

    def student_sample(self, data: DistillBatch, noise: Tensor, *, grad: bool, simulate: bool = True) -> Tensor:
        """Student x0 ``G`` (B, C, T, H, W) for the DMD term and the critic. ``simulation="random"`` (rCM): n ~
        U{1..simulation_steps} consistency steps (all of them without ``simulate``) from ``t_max``, the time after
        each drawn per sample from ``critic_time`` and capped by the one before, fresh noise; the gradient (``grad``)
        on the last step only. ``"schedule"``: :meth:`DMD2Mixin.student_sample`."""
        config: RCMConfig = self.distill_config  # type: ignore[assignment]
        if config.simulation == "schedule":
            return DMD2Mixin.student_sample(self, data, noise, grad=grad, simulate=simulate)
        n = self.draws.shared_randint(1, config.simulation_steps + 1) if simulate else config.simulation_steps
        t_max = self.consistency_times(1)[0]
        t = torch.full((noise.shape[0],), t_max, dtype=torch.float64)
        x_t = initial_state(noise, t[0], self.sigma_data)
        with torch.no_grad():
            for _ in range(n - 1):
                x0 = self.trigflow_denoise(self.net, x_t, t, data.condition).x0
                t = torch.minimum(self.sample_t(noise.shape[0], config.critic_time), t)
                x_t = add_noise(x0, self.draws.randn_like(noise), t, self.sigma_data)
        with nullcontext() if grad else torch.no_grad():
            return self.trigflow_denoise(self.net, x_t, t, data.condition).x0

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """``L_sCM + lambda_DMD L_DMD`` (rCM, Zheng et al. 2025, eq. 9); sCM alone before ``scm_only_iterations``."""
        config: RCMConfig = self.distill_config  # type: ignore[assignment]
        output, loss = SCMMixin.training_step_generator(self, data, iteration)
        if iteration >= config.dmd_start and config.dmd_loss_weight > 0:
            output_dmd, loss_dmd = DMD2Mixin.training_step_generator(self, data, iteration)
            output.update(output_dmd)
            loss = loss + config.dmd_loss_weight * loss_dmd
        output["loss_rcm"] = loss.detach()
        return output, loss


__all__ = ["SIMULATIONS", "RCMConfig", "RCMMixin"]
