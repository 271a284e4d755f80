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

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from distill_mixins.config import OptimizerConfig, TimeSamplerConfig, check_positive
from distill_mixins.core import DistillBatch
from distill_mixins.methods.dmd2 import DMD2Config, DMD2Mixin
from distill_mixins.methods.scm import SCMConfig, SCMMixin


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
    scm_only_iterations: int = 0
    """Student phases at iterations below this train the sCM loss alone (critic phases run as usual)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(name, "dmd_loss_weight", self.dmd_loss_weight, allow_zero=True)
        if not isinstance(self.scm_only_iterations, int) or isinstance(self.scm_only_iterations, bool) or (
            self.scm_only_iterations < 0
        ):
            raise ValueError(f"{name}.scm_only_iterations={self.scm_only_iterations!r} must be an int >= 0.")

    @classmethod
    def wan2_1_1_3b(cls, **overrides: Any) -> RCMConfig:
        """rCM, Wan 2.1 T2V 1.3B: student lr 2e-6, critic lr 4e-7 (AdamW, betas (0, 0.999)), CFG 5 in rCM's form
        (w = 6), sCM x 100 + DMD x 1, critic time shifted uniform (shift 5), student update every 5 iterations,
        tangent warm-up 1000, sigma_max 80 (the defaults)."""
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

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """``L_sCM + lambda_DMD L_DMD`` (rCM, Zheng et al. 2025, eq. 9); sCM alone before ``scm_only_iterations``."""
        config: RCMConfig = self.distill_config  # type: ignore[assignment]
        output, loss = SCMMixin.training_step_generator(self, data, iteration)
        if iteration >= config.scm_only_iterations and config.dmd_loss_weight > 0:
            output_dmd, loss_dmd = DMD2Mixin.training_step_generator(self, data, iteration)
            output.update(output_dmd)
            loss = loss + config.dmd_loss_weight * loss_dmd
        output["loss_rcm"] = loss.detach()
        return output, loss


__all__ = ["RCMConfig", "RCMMixin"]
