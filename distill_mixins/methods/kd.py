"""Knowledge distillation from teacher ODE pairs (Luhman & Luhman 2021, arXiv 2101.02388; MATH.md section 3).

Batches carry, besides what the host's ``get_data_and_condition`` reads, KD fields under the reserved prefix
``kd/`` (:data:`KD_PREFIX`), so they never collide with the host's own keys (``video``, ``noise``, ``path``, ...):

- ``kd/noise`` (B, C, T, H, W): the unit-normal noise the teacher started from;
- ``kd/teacher_x0`` (B, C, T, H, W): the teacher's multi-step (CFG) sample from that noise;
- ``kd/path`` (B, K, C, T, H, W), multi-step students with ``multistep_input="path"``: the teacher's
  ODE states (TrigFlow ``x_t``) at the K student times, ``path[:, 0]`` being the start state;
- ``kd/path_t`` (B, K), optional: the TrigFlow times of ``path`` (checked against the student's).

These names are defined here once (:data:`KD_KEYS`); ``generate_kd_data`` writes them. A hand-built batch with
no ``kd/`` key at all may use the plain names (``noise``, ``teacher_x0``, ``path``, ``path_t``) instead.

Multi-step inputs: ``"path"`` feeds the teacher's ODE state at ``t_k`` (MATH.md section 3, CausVid);
``"interpolated"`` feeds ``cos t_k x0_teacher + sin t_k sigma_d noise``, exactly the state the student
sampler with ``renoise="initial"`` visits when its predictions are right. The ODE path is not what the
student sees at inference (its re-noised states leave the teacher's curved trajectory), so even an exact
flow-map student sampled with ``renoise="ode"`` keeps a gap to the teacher's sample
(``benchmarks/kd_multistep_bound.py`` prints it); the interpolated input has no such gap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill_mixins.config import DistillConfig, OptimizerConfig, check_choice
from distill_mixins.core import DistillationCoreMixin, DistillBatch
from distill_mixins.sampling import initial_state
from distill_mixins.trigflow import add_noise

KD_PREFIX = "kd/"
"""Namespace of the fields KD data adds to a batch; a host batch key must not start with it."""
KD_SAMPLE_INDEX = KD_PREFIX + "sample_index"
KD_NOISE = KD_PREFIX + "noise"
KD_TEACHER_X0 = KD_PREFIX + "teacher_x0"
KD_PATH = KD_PREFIX + "path"
KD_PATH_T = KD_PREFIX + "path_t"
KD_VIDEO = KD_PREFIX + "video"
KD_KEYS = (KD_SAMPLE_INDEX, KD_NOISE, KD_TEACHER_X0, KD_PATH, KD_PATH_T, KD_VIDEO)
"""Every key ``generate_kd_data`` writes (docs/kd_data.md); ``plain_name(key)`` is its name before the prefix."""

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
        """One KD step on a batch with ``kd/noise``, ``kd/teacher_x0`` (and ``kd/path`` for multi-step students)."""
        x_t, t = self.kd_inputs(data.raw)
        x0_teacher = _batch_tensor(data.raw, KD_TEACHER_X0)
        x0 = self.trigflow_denoise(self.net, x_t, t, data.condition).x0
        loss = 0.5 * (x0.float() - x0_teacher.float()).pow(2).mean()
        return {"loss_kd": loss.detach(), "t_mean": t.mean().detach()}, loss

    def kd_inputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Student input state x_t (B, C, T, H, W) and TrigFlow times t (B,) float64 for a KD batch.

        One step: the start state from ``kd/noise`` at the largest time. Several steps: for each
        sample a uniformly drawn student time ``t_k`` and the teacher's ODE state ``kd/path[:, k]``
        (or the interpolated state ``cos t_k x0_teacher + sin t_k sigma_d noise``).
        """
        ts = self.student_times()
        noise = _batch_tensor(batch, KD_NOISE)
        if len(ts) == 1:
            t = ts[0].expand(noise.shape[0]).to(noise.device)
            return initial_state(noise, ts[0], self.sigma_data), t
        if self.distill_config.multistep_input == "interpolated":
            t = ts.to(noise.device)[self._draw_steps(noise.shape[0], len(ts), noise.device)]
            return add_noise(_batch_tensor(batch, KD_TEACHER_X0), noise, t, self.sigma_data), t
        path = self.checked_path(batch, ts, noise)
        k = self._draw_steps(noise.shape[0], len(ts), noise.device)
        return path[torch.arange(noise.shape[0], device=path.device), k.to(path.device)], ts.to(noise.device)[k]

    def checked_path(self, batch: Any, ts: Tensor, sample: Tensor) -> Tensor:
        """The batch's ``kd/path`` (B, K, C, T, H, W) after checking it against the student's K times ``ts`` (its
        shape against ``sample`` (B, C, T, H, W), and ``kd/path_t`` when present); an error says how to regenerate."""
        path = _batch_tensor(batch, KD_PATH, hint="multi-step KD needs the teacher's ODE states at the student times")
        expected = (sample.shape[0], len(ts), *sample.shape[1:])
        if tuple(path.shape) != expected:
            raise ValueError(
                f"KD batch '{KD_PATH}' has shape {tuple(path.shape)}; the {len(ts)}-step student needs "
                f"(B, {', '.join(map(str, expected[1:]))}) with B = {expected[0]}. "
                "Regenerate the data with the student's schedule (generate-ode-pairs, or "
                "generate_kd_data(..., path_times=model.student_times()))."
            )
        path_t = kd_field(batch, KD_PATH_T)
        if path_t is not None:
            self._check_path_times(path_t, ts)
        return path

    def _draw_steps(self, n: int, steps: int, device: torch.device) -> Tensor:
        """One student step index per sample, uniform on 0..steps-1 (the step's draws), (n,) long."""
        return self.draws.randint(0, steps, n).to(device)

    def _check_path_times(self, path_t: Tensor, ts: Tensor) -> None:
        gap = (path_t.double().cpu() - ts[None, :]).abs().max()
        if gap > self.distill_config.path_time_tolerance:
            raise ValueError(
                f"KD batch '{KD_PATH_T}' {path_t[0].tolist()} differs from the student's times {ts.tolist()} "
                f"(by {float(gap):.2e}): the data was generated for another schedule or host. Regenerate it, or "
                "set KDConfig.student_schedule to the data's times."
            )


def plain_name(key: str) -> str:
    """A KD key's name without the ``kd/`` prefix (``kd/noise`` -> ``noise``)."""
    return key.removeprefix(KD_PREFIX)


def kd_field(batch: Any, key: str) -> Any:
    """The KD field ``key`` (e.g. :data:`KD_NOISE`) of a batch, or None when absent. A hand-built batch with no
    ``kd/`` key at all may carry the field under its plain name (``noise``); a batch that has ``kd/`` keys is never
    read by plain names, so a host's own ``noise`` or ``path`` is never taken for the teacher's."""
    if not isinstance(batch, Mapping):
        return None
    if key in batch:
        return batch[key]
    if any(isinstance(k, str) and k.startswith(KD_PREFIX) for k in batch):
        return None
    return batch.get(plain_name(key))


def _batch_tensor(batch: Any, key: str, hint: str = "generate it with generate_kd_data") -> Tensor:
    value = kd_field(batch, key)
    if value is None:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(f"KD batch has no '{key}' (it has {keys}): {hint}.")
    return value
