"""Knowledge distillation from teacher ODE pairs (Luhman & Luhman 2021, arXiv 2101.02388; MATH.md section 3).

Batches carry, besides what the host's ``get_data_and_condition`` reads:

- ``noise`` (B, C, T, H, W): the unit-normal noise the teacher started from;
- ``teacher_x0`` (B, C, T, H, W): the teacher's multi-step (CFG) sample from that noise;
- ``path`` (B, K, C, T, H, W), multi-step students with ``multistep_input="path"``: the teacher's
  ODE states (TrigFlow ``x_t``) at the K student times, ``path[:, 0]`` being the start state;
- ``path_t`` (B, K), optional: the TrigFlow times of ``path`` (checked against the student's).

Multi-step inputs: ``"path"`` feeds the teacher's ODE state at ``t_k`` (MATH.md section 3, CausVid);
``"interpolated"`` feeds ``cos t_k x0_teacher + sin t_k sigma_d noise``, exactly the state the student
sampler with ``renoise="initial"`` visits when its predictions are right. The ODE path is not what the
student sees at inference (its re-noised states leave the teacher's curved trajectory), so even an exact
flow-map student sampled with ``renoise="ode"`` keeps a gap to the teacher's sample
(``benchmarks/kd_multistep_bound.py`` prints it); the interpolated input has no such gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill_mixins.config import DistillConfig, OptimizerConfig, check_choice
from distill_mixins.core import DistillationCoreMixin, DistillBatch
from distill_mixins.sampling import initial_state
from distill_mixins.trigflow import add_noise

MULTISTEP_INPUTS = ("path", "interpolated")
RENOISE_FOR_INPUT = {"path": "ode", "interpolated": "initial"}


def _kd_optimizer() -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=1e-5, weight_decay=0.0, grad_clip=1.0)


@dataclass
class KDConfig(DistillConfig):
    """KD settings. Defaults follow Cosmos-Transfer1's KD stage (lr 1e-5; batch 64 is the trainer's).

    ``student_schedule="one_step"`` regresses from the stored noise at the largest time; a
    multi-step schedule (e.g. ``"cosmos_4step"``) regresses from the stored ODE ``path``.
    """

    student_optimizer: OptimizerConfig = field(default_factory=_kd_optimizer)
    multistep_input: str = "path"
    """Multi-step input at ``t_k``: the teacher's ODE state (``path``) or the ``interpolated`` state."""
    renoise: str | None = None  # type: ignore[assignment]
    """Student sampling re-noise; ``None`` matches ``multistep_input`` (path: 'ode', interpolated: 'initial')."""
    path_time_tolerance: float = 1e-6
    """Largest allowed difference between a batch's ``path_t`` and the student's times."""

    def __post_init__(self) -> None:
        check_choice("KDConfig", "multistep_input", self.multistep_input, MULTISTEP_INPUTS)
        if self.renoise is None:
            self.renoise = RENOISE_FOR_INPUT[self.multistep_input]
        super().__post_init__()
        if self.student_update_freq != 1:
            raise ValueError(f"KDConfig.student_update_freq={self.student_update_freq}: KD has no critic; use 1.")
        if not self.path_time_tolerance > 0:
            raise ValueError(f"KDConfig.path_time_tolerance={self.path_time_tolerance} must be > 0.")


class KDMixin(DistillationCoreMixin):
    """Student regresses the teacher's sample: ``L = 0.5 ||x0_student(x_{t_k}, t_k) - x0_teacher||^2``.

    Compose before the host: ``class MyKD(KDMixin, MyVideo2WorldModel)``; construct with
    ``MyKD(<host args>, distill=KDConfig())``. Generator phase only; no critic is built.
    """

    config_class = KDConfig
    uses_critic = False

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """One KD step on a batch with ``noise``, ``teacher_x0`` (and ``path`` for multi-step students)."""
        x_t, t = self.kd_inputs(data.raw)
        x0_teacher = _batch_tensor(data.raw, "teacher_x0")
        x0 = self.trigflow_denoise(self.net, x_t, t, data.condition).x0
        loss = 0.5 * (x0.float() - x0_teacher.float()).pow(2).mean()
        return {"loss_kd": loss.detach(), "t_mean": t.mean().detach()}, loss

    def kd_inputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Student input state x_t (B, C, T, H, W) and TrigFlow times t (B,) float64 for a KD batch.

        One step: the start state from ``noise`` at the largest time. Several steps: for each
        sample a uniformly drawn student time ``t_k`` and the teacher's ODE state ``path[:, k]``
        (or the interpolated state ``cos t_k x0_teacher + sin t_k sigma_d noise``).
        """
        ts = self.student_times()
        noise = _batch_tensor(batch, "noise")
        if len(ts) == 1:
            t = ts[0].expand(noise.shape[0]).to(noise.device)
            return initial_state(noise, ts[0], self.sigma_data), t
        k = torch.randint(0, len(ts), (noise.shape[0],), device=noise.device)
        t = ts.to(noise.device)[k]
        if self.distill_config.multistep_input == "interpolated":
            return add_noise(_batch_tensor(batch, "teacher_x0"), noise, t, self.sigma_data), t
        path = _batch_tensor(batch, "path", hint="multi-step KD needs the teacher's ODE states at the student times")
        if path.ndim != noise.ndim + 1 or path.shape[1] != len(ts) or path.shape[2:] != noise.shape[1:]:
            raise ValueError(
                f"KD batch 'path' has shape {tuple(path.shape)}; the {len(ts)}-step student needs "
                f"(B, {len(ts)}, {', '.join(map(str, noise.shape[1:]))}). Regenerate the KD data with the "
                "student's schedule (generate_kd_data(..., path_times=model.student_times()))."
            )
        if isinstance(batch, dict) and "path_t" in batch:
            self._check_path_times(batch["path_t"], ts)
        return path[torch.arange(noise.shape[0], device=path.device), k.to(path.device)], t

    def _check_path_times(self, path_t: Tensor, ts: Tensor) -> None:
        gap = (path_t.double().cpu() - ts[None, :]).abs().max()
        if gap > self.distill_config.path_time_tolerance:
            raise ValueError(
                f"KD batch 'path_t' {path_t[0].tolist()} differs from the student's times {ts.tolist()} "
                f"(by {float(gap):.2e}): the data was generated for another schedule or host. Regenerate it, or "
                "set KDConfig.student_schedule to the data's times."
            )


def _batch_tensor(batch: Any, key: str, hint: str = "generate it with generate_kd_data") -> Tensor:
    if not isinstance(batch, dict) or key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(f"KD batch has no '{key}' (it has {keys}): {hint}.")
    return batch[key]
