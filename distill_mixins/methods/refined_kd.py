"""Refined KD: the one-step student regresses the teacher's multi-step solve of its own re-noised sample.

``G = G(eps)`` is the student's sample; it is re-noised to the TrigFlow time ``t_r``,
``x_{t_r} = cos t_r sg(G) + sin t_r sigma_d eps'`` (``eps' = eps`` by default), and the teacher solves the CFG ODE
from there to 0 in K DDIM steps (SDEdit, Meng et al. 2021, arXiv 2108.01073). The student follows that refined
sample: ``L = 0.5 mean (G - sg(x0_refined))^2`` -- the distillation loss of ADD (Sauer et al. 2023,
arXiv 2311.17042), whose target is the teacher's denoising of a re-noised student sample, here with a
K-step solve instead of one step.

Why: KD regresses the teacher's noise -> sample map, which a one-step network learns pair by pair; where it cannot
tell which of several futures the noise picks it outputs their average. The refined target is a sharp teacher
sample near the student's own output, so the student keeps its own (learnable) choice and learns to commit to it.
The catch, measured on the toy (docs/methods/refined_kd.md): nothing keeps that choice tied to the noise, and the
student learns to decide from the condition instead, which costs diversity and FD. Run it after KD: from the
teacher's weights the student's first samples are the blurred one-step mean. Batches are the host's (conditions;
their clean ``x0`` is not used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill_mixins.config import DistillConfig, OptimizerConfig, check_choice, check_positive
from distill_mixins.core import DistillationCoreMixin, DistillBatch
from distill_mixins.sampling import initial_state, ode_step

REFINE_NOISE = ("same", "fresh")


def check_refine(owner: str, time_name: str, refine_time: float, steps_name: str, steps: int) -> None:
    """Raise a ValueError naming ``owner.<field>`` unless the re-noise time is in (0, pi/2) and the steps are an
    int >= 1 (refined KD and DMD2's refine term)."""
    if not 0.0 < refine_time < math.pi / 2:
        raise ValueError(f"{owner}.{time_name}={refine_time} must be a TrigFlow time in (0, pi/2).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{owner}.{steps_name}={steps!r} must be an int >= 1.")


def refine_times(refine_time: float, steps: int) -> Tensor:
    """The teacher's grid ``t_r > ... > 0``, uniform in TrigFlow time (float64, (steps + 1,))."""
    return torch.linspace(refine_time, 0.0, steps + 1, dtype=torch.float64)


@torch.no_grad()
def refine_with_teacher(
    model: DistillationCoreMixin, data: DistillBatch, G: Tensor, noise: Tensor, ts: Tensor, guidance: float
) -> Tensor:
    """The teacher's CFG DDIM solve (B, C, T, H, W) over ``ts`` from ``cos ts[0] sg(G) + sin ts[0] sigma_d noise``
    (SDEdit); shared by refined KD and DMD2's optional refine term."""
    t_r = float(ts[0])
    x = math.cos(t_r) * G.detach() + math.sin(t_r) * model.sigma_data * noise
    uncondition = data.uncondition if guidance != 1.0 else None
    denoise = model.guided_denoiser(model.net_teacher, data.condition, uncondition, guidance)
    for t, s in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        x = ode_step(denoise, x, t, s, "ddim", sigma_data=model.sigma_data)
    return x


def _optimizer() -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0)


@dataclass
class RefinedKDConfig(DistillConfig):
    """Refined-KD settings (one-step students): re-noise halfway, 8 teacher steps; the toy demo uses rectified-flow
    tau 0.35 and 4 steps (docs/methods/refined_kd.md has the measured figures)."""

    student_optimizer: OptimizerConfig = field(default_factory=_optimizer)
    refine_time: float = math.pi / 4
    """TrigFlow time ``t_r`` in (0, pi/2) the student's sample is re-noised to (pi/4: rectified-flow tau 0.5 at
    sigma_d = 1, signal and noise of equal weight); lower keeps more of the student's sample."""
    teacher_steps: int = 8
    """DDIM steps of the teacher from ``t_r`` to 0, uniform in TrigFlow time (2 network evaluations each with CFG)."""
    guidance_scale: float = 3.0
    """Teacher CFG scale w (standard form ``x0_u + w (x0_c - x0_u)``); 1 runs the conditional branch only."""
    refine_noise: str = "same"
    """Re-noise with the student's own input noise (``same``) or with ``fresh`` noise."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_update_freq != 1:
            raise ValueError(
                f"RefinedKDConfig.student_update_freq={self.student_update_freq}: refined KD has no critic; use 1."
            )
        if not (isinstance(self.student_schedule, str) and self.student_schedule == "one_step") and not (
            isinstance(self.student_schedule, tuple) and len(self.student_schedule) == 1
        ):
            raise ValueError(
                f"RefinedKDConfig.student_schedule={self.student_schedule!r}: refined KD trains one-step students; "
                "use 'one_step' (or one TrigFlow time), or DMD2 for few-step students."
            )
        check_refine("RefinedKDConfig", "refine_time", self.refine_time, "teacher_steps", self.teacher_steps)
        check_positive("RefinedKDConfig", "guidance_scale", self.guidance_scale)
        check_choice("RefinedKDConfig", "refine_noise", self.refine_noise, REFINE_NOISE)


class RefinedKDMixin(DistillationCoreMixin):
    """The student follows the teacher's K-step solve of its re-noised sample (see the module docstring).

    Compose before the host: ``class MyRefined(RefinedKDMixin, MyVideo2WorldModel)``; construct with
    ``MyRefined(<host args>, distill=RefinedKDConfig())`` and load the KD student
    (``load_student_state_dict``). Generator phase only; no critic is built.
    """

    config_class = RefinedKDConfig
    uses_critic = False

    def refine_times(self) -> Tensor:
        """The teacher's grid ``t_r > ... > 0`` (float64, (K + 1,))."""
        config: RefinedKDConfig = self.distill_config  # type: ignore[assignment]
        return refine_times(config.refine_time, config.teacher_steps)

    def refine(self, data: DistillBatch, G: Tensor, noise: Tensor) -> Tensor:
        """The teacher's CFG ODE solve (B, C, T, H, W) from ``cos t_r G + sin t_r sigma_d noise`` down to 0."""
        config: RefinedKDConfig = self.distill_config  # type: ignore[assignment]
        return refine_with_teacher(self, data, G, noise, self.refine_times(), config.guidance_scale)

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """``0.5 mean (G - sg(refine(G)))^2`` for the student's one-step sample G of fresh unit noise."""
        config: RefinedKDConfig = self.distill_config  # type: ignore[assignment]
        eps = self.draws.randn_like(data.x0)
        t = self.student_times()[0]
        x_t = initial_state(eps, t, self.sigma_data)
        G = self.trigflow_denoise(self.net, x_t, t.expand(eps.shape[0]).to(eps.device), data.condition).x0
        eps_r = eps if config.refine_noise == "same" else self.draws.randn_like(eps)
        x0_refined = self.refine(data, G, eps_r)
        loss = 0.5 * (G.float() - x0_refined.float()).pow(2).mean()
        return {"loss_refined_kd": loss.detach()}, loss


__all__ = ["RefinedKDConfig", "RefinedKDMixin", "check_refine", "refine_times", "refine_with_teacher"]
