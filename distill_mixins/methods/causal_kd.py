"""CausalKD: a causal (chunk-by-chunk) student regresses the teacher's ODE pairs (CausVid, Yin et al. 2024, arXiv
2412.07772; Self-Forcing's initialisation, Huang et al. 2025, arXiv 2506.08009; MATH.md section 7, stage 2).

Per sample and chunk a step index ``k ~ U{0..K}`` (``K``: clean, :func:`~distill_mixins.causal.chunk_step_indices`);
each frame's input is ``cat(path, latent)[k]`` at time ``t_k`` (``t_K = 0``); one block-causal full-sequence forward
with per-frame times (the host's :meth:`~distill_mixins.contract.CausalHost.predict_causal`); loss
``0.5 mean (x0_hat - latent)^2`` over the frames that were not clean (CausVid and Self-Forcing leave t = 0 frames
out; ``clean_frames_in_loss=True`` keeps them). Context noise: clean frames re-noised to ``context_noise`` (a
TrigFlow time) so the student learns to read slightly noisy history.

Batches are ODE pairs, the KD data layout (:mod:`distill_mixins.methods.kd`): ``kd/teacher_x0`` the clean latent
(B, C, T, H, W), ``kd/path`` the teacher's states at the student's K times (B, K, C, T, H, W), optionally
``kd/path_t`` (B, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill_mixins.causal import chunk_step_indices, step_times
from distill_mixins.contract import check_causal_host_instance
from distill_mixins.core import DistillBatch
from distill_mixins.methods.kd import KD_TEACHER_X0, KDConfig, KDMixin, _batch_tensor
from distill_mixins.trigflow import add_noise


@dataclass
class CausalKDConfig(KDConfig):
    """CausalKD settings; defaults from the published recipe (MATH.md section 7): K = 4 on the Self-Forcing grid
    (``cosmos_4step``: RF times 1, 0.9375, 0.8333, 0.625), the chunk size is the host's (published: 3)."""

    student_schedule: str | tuple[float, ...] = "cosmos_4step"
    clean_frames_in_loss: bool = False
    """Keep the frames given clean (step K, t = 0) in the loss (CausVid and Self-Forcing leave them out)."""
    context_noise: float = 0.0
    """TrigFlow time ``t_ctx`` to which clean frames are re-noised (0: none), in [0, pi/2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multistep_input != "path":
            raise ValueError(
                f"CausalKDConfig.multistep_input={self.multistep_input!r}: CausalKD reads the teacher's ODE path."
            )
        if not isinstance(self.clean_frames_in_loss, bool):
            raise ValueError(f"CausalKDConfig.clean_frames_in_loss={self.clean_frames_in_loss!r}: give True/False.")
        if not 0.0 <= float(self.context_noise) < 1.5707963267948966:
            raise ValueError(
                f"CausalKDConfig.context_noise={self.context_noise!r}: give a TrigFlow time in [0, pi/2) (0: none; "
                "a small value such as 0.05 re-noises the clean context slightly)."
            )


class CausalKDMixin(KDMixin):
    """A causal student regresses the clean latent from per-chunk ODE states: ``class M(CausalKDMixin, Host)``
    with a :class:`~distill_mixins.contract.CausalHost` host; ``M(<host args>, distill=CausalKDConfig())``."""

    config_class = CausalKDConfig
    requires_causal_host = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_causal_host_instance(self)

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """One CausalKD step on a batch of ODE pairs (``kd/teacher_x0``, ``kd/path``)."""
        x_in, t, clean = self.causal_kd_inputs(data.raw)
        latent = _batch_tensor(data.raw, KD_TEACHER_X0)
        x0 = self.trigflow_denoise_causal(self.net, x_in, t, data.condition).x0
        weight = torch.ones_like(t) if self.distill_config.clean_frames_in_loss else (~clean).to(t.dtype)
        loss = causal_kd_loss(x0, latent, weight)
        return {"loss_causal_kd": loss.detach(), "clean_fraction": clean.float().mean()}, loss

    def causal_kd_inputs(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Student input (B, C, T, H, W), per-frame TrigFlow times (B, T) float64, and which frames are given clean
        (B, T) bool, for a batch of ODE pairs: per chunk a step ``k``, each frame's state ``cat(path, latent)[k]``."""
        ts = self.student_times()
        latent = _batch_tensor(batch, KD_TEACHER_X0)
        path = self.checked_path(batch, ts, latent)
        b, c, frames, h, w = latent.shape
        k = chunk_step_indices(self.draws, b, frames, self.chunk_size, len(ts), device=latent.device)  # (B, T)
        states = torch.cat([path, latent[:, None]], dim=1)  # (B, K + 1, C, T, H, W)
        index = k[:, None, None, :, None, None].expand(b, 1, c, frames, h, w)
        x_in = states.gather(1, index)[:, 0]
        t = step_times(k, ts, device=latent.device)
        clean = k == len(ts)
        t_ctx = float(self.distill_config.context_noise)
        if t_ctx > 0:
            t = torch.where(clean, torch.full_like(t, t_ctx), t)
            noisy = add_noise(latent, self.draws.randn_like(latent), t, self.sigma_data)
            x_in = torch.where(clean[:, None, :, None, None], noisy, x_in)
        return x_in, t, clean


def causal_kd_loss(x0: Tensor, latent: Tensor, weight: Tensor) -> Tensor:
    """``0.5 mean (x0 - latent)^2`` over the frames with ``weight`` (B, T) 1 (CausVid; MATH.md section 7)."""
    w = weight.to(torch.float32)[:, None, :, None, None]
    per_frame = x0[0, :, 0].numel()  # C * H * W
    return 0.5 * ((x0.float() - latent.float()).pow(2) * w).sum() / (w.sum() * per_frame).clamp(min=1.0)


__all__ = ["CausalKDConfig", "CausalKDMixin", "causal_kd_loss"]
