"""Self-Forcing: a causal student rolled out chunk by chunk as at inference, matched to the bidirectional teacher
with DMD on the whole clip (Huang et al. 2025, arXiv 2506.08009; MATH.md section 7, stage 3).

Built on DMD2 (:mod:`distill_mixins.methods.dmd2`): the critic, the CFG teacher, the DMD gradient, the GAN heads and
the critic phases are DMD2's; only the student's sample ``G`` differs. It is the autoregressive rollout of
:func:`~distill_mixins.causal.stream_causal` through the student's KV cache:

    exit = one step in 0..K-1 for the clip (or per chunk, or always K-1), identical on every rank
    for each chunk [s, e): K-step sampling from sigma_d sin(t_0) eps, stopping at the exit step, whose forward alone
        carries the gradient (for chunks at or after ``start_gradient_frame``); then the cache is refreshed without
        gradient with the finished chunk (or the chunk re-noised to ``context_noise``)
    G = cat(chunks) (B, C, T, H, W)

The teacher and the critic are bidirectional (the host's ``predict``) and see the whole clip once per phase, at one
critic time per sample. Cached keys and values are detached: a loss on a late chunk reaches earlier chunks only
through their own gradient-carrying call, never through the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill_mixins.causal import chunk_bounds, extend_condition, stream_causal, window_condition
from distill_mixins.config import EMAConfig, OptimizerConfig, TimeSamplerConfig, check_choice
from distill_mixins.contract import check_causal_host_instance
from distill_mixins.core import DistillBatch
from distill_mixins.methods.dmd2 import DMD2Config, DMD2Mixin

EXIT_MODES = ("shared", "per_chunk", "last")
"""``shared``: one exit step for every chunk of the clip (Self-Forcing's default); ``per_chunk``: one per chunk;
``last``: always K - 1 (the inference rollout)."""


def _optimizer(lr: float) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=lr, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=1.0)


@dataclass
class SelfForcingConfig(DMD2Config):
    """Self-Forcing settings; defaults from the published recipe (MATH.md section 7): K = 4 (the Cosmos 4-step
    list), student_update_freq 5, CFG 5 (FastGen form, standard w 5), critic time shifted-uniform shift 5, EMA from
    step 200, context noise 0, learning rates 2e-6 / 4e-7, AdamW betas (0, 0.999)."""

    student_schedule: str | tuple[float, ...] = "cosmos_4step"
    student_update_freq: int = 5
    guidance_scale: float = 5.0
    student_optimizer: OptimizerConfig = field(default_factory=lambda: _optimizer(2e-6))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: _optimizer(4e-7))
    critic_time: TimeSamplerConfig = field(default_factory=lambda: TimeSamplerConfig(kind="shifted_uniform", shift=5.0))
    ema: EMAConfig | None = field(default_factory=lambda: EMAConfig(halflife_steps=69.0, start_iter=200))
    exit_mode: str = "shared"
    """How the rollout's exit steps are drawn (:data:`EXIT_MODES`)."""
    start_gradient_frame: int = 0
    """Chunks starting before this frame run without gradient (their exit step too)."""
    context_noise: float = 0.0
    """TrigFlow time the cache is refreshed at (0: the clean chunk)."""
    student_weights: str | None = None
    """The CausalKD stage's extracted student (``extract-weights``), loaded as the student at construction."""
    rollout_frames: int | None = None
    """Longer training rollouts: roll the student out this many frames (more than the clip's T; past the network's
    cache capacity it needs a rolling cache window) and score the last T frames, on conditions whose given frames
    are that window's own first frames (:func:`~distill_mixins.causal.window_condition`). None: the clip's length."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("SelfForcingConfig", "exit_mode", self.exit_mode, EXIT_MODES)
        if isinstance(self.start_gradient_frame, bool) or not isinstance(self.start_gradient_frame, int) or (
            self.start_gradient_frame < 0
        ):
            raise ValueError(f"SelfForcingConfig.start_gradient_frame={self.start_gradient_frame!r}: give an int >= 0.")
        if not 0.0 <= float(self.context_noise) < 1.5707963267948966:
            raise ValueError(f"SelfForcingConfig.context_noise={self.context_noise!r}: give a TrigFlow time in "
                             "[0, pi/2) (0: the clean chunk).")
        if self.rollout_frames is not None and (
            isinstance(self.rollout_frames, bool) or not isinstance(self.rollout_frames, int) or self.rollout_frames < 2
        ):
            raise ValueError(f"SelfForcingConfig.rollout_frames={self.rollout_frames!r}: give an int longer than the "
                             "training clip, or None (the clip's length).")
        if self.rollout_frames is not None and self.refine_weight > 0:
            raise ValueError("SelfForcingConfig.rollout_frames with refine_weight > 0: the refine term regresses the "
                             "clip's own noise, which a longer rollout does not have; set one of them off.")
        if self.rollout_frames is not None and self.energy_weight > 0:
            raise ValueError("SelfForcingConfig.rollout_frames with energy_weight > 0: the energy-score term scores "
                             "the student's clip against the batch's real clip, and a longer rollout scores another "
                             "window; set one of them off.")
        if self.student_weights is not None and not Path(self.student_weights).is_file():
            raise ValueError(
                f"SelfForcingConfig.student_weights={self.student_weights!r} is not a file: extract the CausalKD "
                "stage's student with `distill-mixins extract-weights --input <causal-kd run> --output FILE`."
            )


class SelfForcingMixin(DMD2Mixin):
    """Self-Forcing on a causal host: ``class M(SelfForcingMixin, MyCausalHost)``; ``M(<host args>,
    distill=SelfForcingConfig(student_weights="causal_kd_student.safetensors"))``. The student is the causal
    network (initialised from ``student_weights``), the critic a copy of the (bidirectional) teacher."""

    config_class = SelfForcingConfig
    requires_causal_host = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_causal_host_instance(self)
        weights = self.distill_config.student_weights  # type: ignore[attr-defined]
        if weights is not None:
            from distill_mixins.checkpointer import load_student_weights

            load_student_weights(self, weights)

    def exit_steps(self, frames: int) -> list[int]:
        """The exit step of every chunk of a ``frames``-frame rollout, drawn alike on every rank (seeded by the
        iteration, not by the samples)."""
        config: SelfForcingConfig = self.distill_config  # type: ignore[assignment]
        n, k = len(chunk_bounds(frames, self.chunk_size)), len(self.student_times())
        if config.exit_mode == "last":
            return [k - 1] * n
        if config.exit_mode == "shared":
            return [self.draws.shared_randint(0, k)] * n
        return [self.draws.shared_randint(0, k) for _ in range(n)]

    def student_clip(
        self, data: DistillBatch, noise: Tensor, *, grad: bool, simulate: bool = True
    ) -> tuple[Tensor, DistillBatch]:
        """The rollout (the clip's T frames), or with ``rollout_frames`` L > T: a rollout of L frames (``noise``
        continued with fresh draws), its last T frames and the batch of that window (conditions from
        :func:`~distill_mixins.causal.window_condition`)."""
        length, frames = self.distill_config.rollout_frames, noise.shape[2]  # type: ignore[attr-defined]
        if length is None or length == frames:
            return super().student_clip(data, noise, grad=grad, simulate=simulate)
        if length < frames:
            raise ValueError(f"SelfForcingConfig.rollout_frames={length} is shorter than the clip's {frames} frames.")
        extra = self.draws.randn_like(noise.new_empty(*noise.shape[:2], length - frames, *noise.shape[3:]))
        long = DistillBatch(data.x0, extend_condition(data.condition, length),
                            extend_condition(data.uncondition, length), data.raw)
        G = self.student_sample(long, torch.cat([noise, extra], dim=2), grad=grad, simulate=simulate)[:, :, -frames:]
        window = DistillBatch(data.x0, window_condition(data.condition, G), window_condition(data.uncondition, G),
                              data.raw)
        return G, window

    def student_sample(self, data: DistillBatch, noise: Tensor, *, grad: bool, simulate: bool = True) -> Tensor:
        """The student's rollout ``G`` (B, C, T, H, W) from unit-normal ``noise`` (the module docstring); with
        ``simulate=False`` every chunk runs all K steps (the inference rollout)."""
        config: SelfForcingConfig = self.distill_config  # type: ignore[assignment]
        frames = noise.shape[2]
        exits = self.exit_steps(frames) if simulate else [len(self.student_times()) - 1] * len(
            chunk_bounds(frames, self.chunk_size))
        self.clear_kv_cache(self.net)
        chunks = stream_causal(
            self._rollout_denoiser(data, frames, exits, grad), noise, self.student_times(), chunk_size=self.chunk_size,
            sigma_data=self.sigma_data, renoise=config.renoise, context_time=config.context_noise, exits=exits,
            randn_like=self.draws.randn_like,
        )
        return torch.cat([chunk.x0 for chunk in chunks], dim=2)

    def _rollout_denoiser(
        self, data: DistillBatch, frames: int, exits: list[int], grad: bool
    ) -> Callable[[Tensor, Tensor, int, bool], Tensor]:
        """The student's chunk denoiser of one rollout: gradient only at a chunk's exit step (from
        ``start_gradient_frame`` on); the cache refresh never."""
        starts = [start for start, _ in chunk_bounds(frames, self.chunk_size)]
        steps = dict.fromkeys(starts, 0)
        first = self.distill_config.start_gradient_frame  # type: ignore[attr-defined]

        def denoise(x_t: Tensor, t: Tensor, start: int, store_kv: bool) -> Tensor:
            carries = False
            if not store_kv:
                carries = grad and steps[start] == exits[starts.index(start)] and start >= first
                steps[start] += 1
            with nullcontext() if carries else torch.no_grad():
                return self.trigflow_denoise_chunk(self.net, x_t, t, data.condition, start, store_kv).x0

        return denoise


__all__ = ["EXIT_MODES", "SelfForcingConfig", "SelfForcingMixin"]
