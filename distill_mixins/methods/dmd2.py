"""DMD2: distribution matching distillation with a fake-score critic (Yin et al. 2024, arXiv 2405.14867).

As implemented by Cosmos-Predict2.5 / FastGen (MATH.md section 4): the student's sample ``G`` is
re-noised at a critic time ``t``; the teacher (with CFG) and the critic denoise it; the student
follows ``grad = (x0_fake - x0_teacher) / w``; the critic learns to denoise student samples with the
``1 / sin^2 t`` weighting. Optional GAN heads (:mod:`distill_mixins.discriminator`) read features
tapped by forward hooks from the teacher or the critic.

Memory: the teacher and the critic run under ``no_grad`` in the student phase unless a GAN term
needs their graph; the student sample runs under ``no_grad`` in the critic phase.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill_mixins.config import DistillConfig, OptimizerConfig, TimeSamplerConfig, check_choice, check_positive
from distill_mixins.core import DistillationCoreMixin, DistillBatch
from distill_mixins.discriminator import (
    DiscriminatorConfig,
    FeatureTaps,
    build_discriminator,
    find_blocks,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)
from distill_mixins.methods.energy import check_beta, energy_score
from distill_mixins.methods.refined_kd import check_refine, refine_times, refine_with_teacher
from distill_mixins.sampling import cosmos_guidance_to_w, guided_x0, initial_state, renoise_state
from distill_mixins.trigflow import add_noise

CRITIC_SAMPLES = ("final", "simulated")
DMD_REDUCTIONS = ("mean", "sum")


def _optimizer(lr: float, **kwargs: Any) -> OptimizerConfig:
    return OptimizerConfig(name="adamw", lr=lr, betas=(0.0, 0.999), weight_decay=0.01, grad_clip=1.0, **kwargs)


@dataclass
class DMD2Config(DistillConfig):
    """DMD2 settings. Defaults follow Cosmos-Predict2.5 (see :meth:`cosmos_predict2_5`), with one student step.

    Guidance is the standard form ``x0_u + w (x0_c - x0_u)`` (docs/guidance.md maps Cosmos and FastGen scales).
    """

    student_update_freq: int = 5
    student_optimizer: OptimizerConfig = field(default_factory=lambda: _optimizer(1e-6))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: _optimizer(2e-7))
    guidance_scale: float = 4.0
    """Teacher CFG scale w (standard form); Cosmos-Predict2.5's teacher_guidance 3 is w = 4."""
    use_negative_condition: bool = False
    """Use the batch's ``negative_condition`` (host condition format) instead of the uncondition for CFG."""
    critic_time: TimeSamplerConfig = field(default_factory=lambda: TimeSamplerConfig(kind="shifted_uniform", shift=5.0))
    """Times at which student samples are re-noised for the teacher and the critic."""
    backward_simulation: bool = True
    """Multi-step students: run n ~ U{1..K} student steps, gradient on the last only (else always K)."""
    critic_samples: str = "final"
    """Samples the critic fits in critic phases: the student's ``final`` K-step samples (the distribution
    sampled at inference), or ``simulated`` ones (n ~ U{1..K} steps, like the student phase)."""
    dmd_weight_min: float = 1e-5
    """Clamp of the per-sample normalizer ``w = mean |G - x0_teacher|``."""
    dmd_reduction: str = "mean"
    """Reduction of the DMD loss (:func:`dmd_loss`): ``mean``, ``0.5 mean (G - sg(G - grad))^2`` over every element
    (DMD2, Cosmos, FastGen: gradient ``grad / numel``), or ``sum``, ``(G - sg(G - grad))^2`` summed per sample and
    averaged over the batch (rCM: gradient ``2 grad / B``, which grows with the sample size beside sCM's normalised
    tangent)."""
    gan_loss_weight: float = 0.0
    """Weight of the generator GAN term; 0 turns the GAN (and the discriminator) off."""
    discriminator: DiscriminatorConfig | None = None
    """GAN heads and feature taps; required when ``gan_loss_weight > 0``."""
    discriminator_optimizer: OptimizerConfig = field(default_factory=lambda: _optimizer(2e-7))
    refine_weight: float = 0.0
    """Weight of the refine term ``0.5 mean (G - sg(refined G))^2`` (:mod:`distill_mixins.methods.refined_kd`: the
    teacher's ``refine_teacher_steps``-step CFG solve of G re-noised to ``refine_time`` with the student's noise);
    0 turns it off. On the toy it keeps the student committed to one mode while DMD keeps the spread."""
    refine_time: float = math.pi / 4
    """TrigFlow time in (0, pi/2) of the refine term's re-noising."""
    refine_teacher_steps: int = 4
    energy_weight: float = 0.0
    """Weight of the energy-score term (:mod:`distill_mixins.methods.energy`): ``energy_samples`` student samples of
    each condition (the DMD term's ``G`` and ``energy_samples - 1`` more from fresh noise) scored against the batch's
    clean ``x0`` (real clips); 0 turns it off. It keeps per-condition diversity where DMD2 and the refine term lose
    it (measured in docs/methods/dmd2.md); the batch must carry real clips of its conditions."""
    energy_samples: int = 2
    """Student samples per condition in the energy-score term (m >= 2; each extra one costs a student forward and
    backward)."""
    energy_beta: float = 1.0
    """The energy score's exponent on distances, in (0, 2): 1 as in Gneiting & Raftery's usual form; below 1 it
    scores a sample between two modes worse than one at a mode (:mod:`distill_mixins.methods.energy`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive(name, "energy_weight", self.energy_weight, allow_zero=True)
        self.energy_beta = check_beta(self.energy_beta, f"{name}.energy_beta")
        if isinstance(self.energy_samples, bool) or not isinstance(self.energy_samples, int) or self.energy_samples < 2:
            raise ValueError(f"{name}.energy_samples={self.energy_samples!r} must be an int >= 2 (the energy score "
                             "compares samples of one condition with each other).")
        check_choice(name, "critic_samples", self.critic_samples, CRITIC_SAMPLES)
        check_choice(name, "dmd_reduction", self.dmd_reduction, DMD_REDUCTIONS)
        check_positive(name, "guidance_scale", self.guidance_scale)
        check_positive(name, "dmd_weight_min", self.dmd_weight_min)
        check_positive(name, "gan_loss_weight", self.gan_loss_weight, allow_zero=True)
        check_positive(name, "refine_weight", self.refine_weight, allow_zero=True)
        check_refine(name, "refine_time", self.refine_time, "refine_teacher_steps", self.refine_teacher_steps)
        if not isinstance(self.critic_time, TimeSamplerConfig):
            raise TypeError(f"{name}.critic_time must be a TimeSamplerConfig, got {self.critic_time!r}.")
        if self.gan_loss_weight > 0 and self.discriminator is None:
            raise ValueError(
                f"{name}.gan_loss_weight={self.gan_loss_weight} needs {name}.discriminator="
                "DiscriminatorConfig(...) (the GAN heads and the feature taps); or set gan_loss_weight=0."
            )
        if self.discriminator is not None and not isinstance(self.discriminator, DiscriminatorConfig):
            raise TypeError(f"{name}.discriminator must be a DiscriminatorConfig, got {self.discriminator!r}.")
        if not isinstance(self.discriminator_optimizer, OptimizerConfig):
            raise TypeError(f"{name}.discriminator_optimizer must be an OptimizerConfig.")

    @classmethod
    def cosmos_predict2_5(cls, **overrides: Any) -> DMD2Config:
        """Cosmos-Predict2.5 DMD2: 4-step student, no GAN, teacher_guidance 3 (w = 4), shift 5,
        student lr 1e-6, critic lr 2e-7, grad clip 1.0, update freq 5."""
        values: dict[str, Any] = {
            "student_schedule": "cosmos_4step", "student_shift": 5.0, "student_update_freq": 5,
            "guidance_scale": cosmos_guidance_to_w(3.0), "student_optimizer": _optimizer(1e-6),
            "critic_optimizer": _optimizer(2e-7), "critic_time": TimeSamplerConfig(kind="shifted_uniform", shift=5.0),
            "gan_loss_weight": 0.0, "renoise": "initial",
        }
        return cls(**{**values, **overrides})

    @classmethod
    def cosmos_transfer1(cls, discriminator: DiscriminatorConfig, **overrides: Any) -> DMD2Config:
        """Cosmos-Transfer1 DMD2: 1 step, no CFG at inference, guidance 5 (Cosmos form: w = 6), GAN weight 1e-3
        on teacher features (conv3d heads), lr 5e-7, update freq 5; ``discriminator`` names the taps."""
        values: dict[str, Any] = {
            "student_schedule": "one_step", "student_update_freq": 5, "guidance_scale": cosmos_guidance_to_w(5.0),
            "student_optimizer": _optimizer(5e-7), "critic_optimizer": _optimizer(5e-7),
            "discriminator_optimizer": _optimizer(5e-7), "gan_loss_weight": 1e-3, "discriminator": discriminator,
        }
        return cls(**{**values, **overrides})


def dmd_loss(
    G: Tensor, x0_teacher: Tensor, x0_fake: Tensor, weight_min: float = 1e-5, reduction: str = "mean"
) -> Tensor:
    """``0.5 mean (G - sg(G - grad))^2`` with ``grad = (x0_fake - x0_teacher) / w``, ``w = mean|G - x0_teacher|``
    per sample (DMD2, Yin et al. 2024, eq. 2-3 as in Cosmos/FastGen); its gradient w.r.t. G is ``grad / numel``.
    ``reduction="sum"``: ``(G - sg(G - grad))^2`` summed per sample, averaged over the batch (rCM), gradient
    ``2 grad / B``."""
    G, x0_teacher, x0_fake = G.double(), x0_teacher.double(), x0_fake.double()
    dims = tuple(range(1, G.ndim))
    w = (G.detach() - x0_teacher).abs().mean(dim=dims, keepdim=True).clamp(min=weight_min)
    grad = (x0_fake - x0_teacher) / w
    if reduction == "sum":
        return (G - (G.detach() - grad)).pow(2).sum(dim=dims).mean()
    return 0.5 * (G - (G.detach() - grad)).pow(2).mean()


def fake_score_loss(G: Tensor, x0_fake: Tensor, t: Tensor) -> Tensor:
    """``mean (G - x0_fake(x_t))^2 / sin^2 t``: the critic's denoising loss (Cosmos-Predict2.5 weighting)."""
    per_sample = (G.float() - x0_fake.float()).pow(2).flatten(1).mean(1)
    return (per_sample / torch.sin(t.to(per_sample.device)).pow(2).to(per_sample.dtype)).mean()


class DMD2Mixin(DistillationCoreMixin):
    """DMD2 (Yin et al. 2024): student phases follow the teacher-minus-critic score; critic phases fit student samples.

    Compose before the host: ``class MyDMD2(DMD2Mixin, MyVideo2WorldModel)``, construct with
    ``MyDMD2(<host args>, distill=DMD2Config())``. Networks: ``net`` (student), ``net_fake_score`` (critic,
    a copy of the teacher unless ``critic_net`` is set), ``net_discriminator`` (GAN heads, when enabled).
    An optional host method ``feature_blocks(net) -> Sequence[nn.Module]`` names the blocks feature taps index;
    otherwise ``DiscriminatorConfig.block_path`` (or the longest ``nn.ModuleList``) does.
    """

    config_class = DMD2Config
    uses_critic = True

    def __init__(self, *args: Any, distill: DMD2Config | None = None, **kwargs: Any) -> None:
        super().__init__(*args, distill=distill, **kwargs)
        config: DMD2Config = self.distill_config  # type: ignore[assignment]
        if config.gan_loss_weight > 0:
            assert config.discriminator is not None
            self.net_discriminator = build_discriminator(config.discriminator).train()
            names = frozenset(n for n, _ in self.net_discriminator.named_parameters())
            self._trained_names["net_discriminator"] = names
            self.nonfinite_grad_counts["net_discriminator"] = 0
            self.feature_taps()  # bad block paths or tap indices fail now, not in the first step

    def optimizer_config(self, name: str) -> OptimizerConfig:
        """Student, critic, or discriminator optimizer settings."""
        if name == "net_discriminator":
            return self.distill_config.discriminator_optimizer  # type: ignore[attr-defined]
        return super().optimizer_config(name)

    # ------------------------------------------------------------------ pieces

    def student_sample(self, data: DistillBatch, noise: Tensor, *, grad: bool, simulate: bool = True) -> Tensor:
        """Student x0 ``G`` (B, C, T, H, W) from unit-normal ``noise``: one step, or a backward simulation of
        n ~ U{1..K} steps (``simulate`` and ``backward_simulation``; else all K), the first n-1 without gradient."""
        config: DMD2Config = self.distill_config  # type: ignore[assignment]
        ts = self.student_times()
        n = len(ts)
        if n > 1 and config.backward_simulation and simulate:
            n = self.draws.shared_randint(1, len(ts) + 1)  # the same on every rank
        x_t = initial_state(noise, ts[0], self.sigma_data)
        with torch.no_grad():
            for k in range(n - 1):
                x0 = self.trigflow_denoise(self.net, x_t, ts[k], data.condition).x0
                x_t = self._renoise(x_t, x0, float(ts[k]), float(ts[k + 1]), noise)
        with nullcontext() if grad else torch.no_grad():
            return self.trigflow_denoise(self.net, x_t, ts[n - 1], data.condition).x0

    def student_clip(
        self, data: DistillBatch, noise: Tensor, *, grad: bool, simulate: bool = True
    ) -> tuple[Tensor, DistillBatch]:
        """The student's clip ``G`` (B, C, T, H, W) the phase scores, and the batch it is scored on (the teacher's
        and critic's conditions): :meth:`student_sample` on ``data`` (Self-Forcing's longer rollouts return their
        last T frames and the window's conditions)."""
        return self.student_sample(data, noise, grad=grad, simulate=simulate), data

    def _renoise(self, x_t: Tensor, x0: Tensor, t: float, s: float, noise: Tensor) -> Tensor:
        """:func:`renoise_state` with fresh noise from the step's draws (so it does not depend on the batch split)."""
        mode = self.distill_config.renoise
        if mode == "fresh":
            noise, mode = self.draws.randn_like(noise), "initial"  # fresh noise, given explicitly
        return renoise_state(x_t, x0, t, s, noise, mode, sigma_data=self.sigma_data)

    def teacher_x0(self, data: DistillBatch, x_t: Tensor, t: Tensor, x0_cond: Tensor | None = None) -> Tensor:
        """Teacher x0 with CFG ``x0_u + w (x0_c - x0_u)`` (the negative condition if configured), no gradient.

        ``x0_cond``: the conditional branch when already computed (e.g. by the tapped teacher forward)."""
        config: DMD2Config = self.distill_config  # type: ignore[assignment]
        with torch.no_grad():
            x0_c = x0_cond.detach() if x0_cond is not None else None
            if x0_c is None:
                x0_c = self.trigflow_denoise(self.net_teacher, x_t, t, data.condition).x0
            if config.guidance_scale == 1.0:
                return x0_c
            x0_u = self.trigflow_denoise(self.net_teacher, x_t, t, self.negative_condition(data)).x0
            return guided_x0(x0_c, x0_u, config.guidance_scale)

    def negative_condition(self, data: DistillBatch) -> Any:
        """The CFG branch subtracted by guidance: the uncondition, or the batch's ``negative_condition``."""
        if not self.distill_config.use_negative_condition:  # type: ignore[attr-defined]
            return data.uncondition
        if not isinstance(data.raw, dict) or "negative_condition" not in data.raw:
            raise KeyError(
                "DMD2Config.use_negative_condition=True needs batch['negative_condition'] (in the host's condition "
                "format, e.g. the embedding of the negative prompt)."
            )
        return data.raw["negative_condition"]

    def _tap_network(self, source: str) -> nn.Module:
        return self.net_teacher if source == "teacher" else self.net_fake_score

    def feature_taps(self) -> FeatureTaps:
        """Forward hooks on the configured blocks of the tapped network (teacher or critic)."""
        config: DiscriminatorConfig = self.distill_config.discriminator  # type: ignore[attr-defined]
        net = self._tap_network(config.source)
        host_blocks = getattr(self, "feature_blocks", None)  # optional host member
        blocks = host_blocks(net) if callable(host_blocks) else find_blocks(net, config.block_path)
        return FeatureTaps(blocks, config.taps, self.context_parallel_group)

    def _discriminate(self, data: DistillBatch, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Discriminator logits (B,) of ``x_t`` from tapped features, and the tapped network's x0."""
        source = self.distill_config.discriminator.source  # type: ignore[attr-defined]
        with self.feature_taps() as taps:
            x0 = self.trigflow_denoise(self._tap_network(source), x_t, t, data.condition).x0
        return self.net_discriminator(taps.features), x0

    @property
    def gan_enabled(self) -> bool:
        """Whether the GAN terms run (``gan_loss_weight > 0``)."""
        return self.distill_config.gan_loss_weight > 0  # type: ignore[attr-defined]

    @property
    def gan_shares_critic_time(self) -> bool:
        """Whether the GAN terms run on the DMD term's re-noised sample (``DiscriminatorConfig.time`` is None)."""
        return self.gan_enabled and self.distill_config.discriminator.time is None  # type: ignore[attr-defined]

    def _gan_noised(self, G: Tensor, x0_real: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        """``G`` (and ``x0_real``, with the same noise) re-noised at the GAN's own times; and those times (B,)."""
        t = self.sample_t(G.shape[0], self.distill_config.discriminator.time).to(G.device)  # type: ignore[attr-defined]
        eps = self.draws.randn_like(G)
        real = None if x0_real is None else add_noise(x0_real, eps, t, self.sigma_data)
        return add_noise(G, eps, t, self.sigma_data), real, t

    # ----------------------------------------------------------------- phases

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """Student phase: DMD gradient of the re-noised student sample (+ the generator GAN term)."""
        config: DMD2Config = self.distill_config  # type: ignore[assignment]
        noise = self.draws.randn_like(data.x0)
        batch = data
        G, data = self.student_clip(data, noise, grad=True)
        t = self.sample_t(G.shape[0], config.critic_time).to(G.device)
        x_t = add_noise(G, self.draws.randn_like(G), t, self.sigma_data)
        shared = self.gan_shares_critic_time
        logits, x0_tapped = self._discriminate(data, x_t, t) if shared else (None, None)
        source = config.discriminator.source if shared else None  # type: ignore[union-attr]
        x0_teacher = self.teacher_x0(data, x_t.detach(), t, x0_tapped if source == "teacher" else None)
        if source == "critic":
            x0_fake = x0_tapped.detach()  # type: ignore[union-attr]
        else:
            with torch.no_grad():
                x0_fake = self.trigflow_denoise(self.net_fake_score, x_t.detach(), t, data.condition).x0
        output: dict[str, Tensor] = {}
        loss = dmd_loss(G, x0_teacher, x0_fake, config.dmd_weight_min, config.dmd_reduction).float()
        output["loss_dmd"] = loss.detach()
        if self.gan_enabled and not shared:
            x_gan, _, t_gan = self._gan_noised(G)
            logits = self._discriminate(data, x_gan, t_gan)[0]
        if logits is not None:
            loss_gan = gan_generator_loss(logits)
            output["loss_gan_generator"] = loss_gan.detach()
            loss = loss + config.gan_loss_weight * loss_gan
        if config.refine_weight > 0:
            ts = refine_times(config.refine_time, config.refine_teacher_steps)
            x0_refined = refine_with_teacher(self, data, G, noise, ts, config.guidance_scale)
            loss_refine = 0.5 * (G.float() - x0_refined.float()).pow(2).mean()
            output["loss_refine"] = loss_refine.detach()
            loss = loss + config.refine_weight * loss_refine
        if config.energy_weight > 0:
            loss_energy = self.energy_loss(batch, data, G, noise)
            output["loss_energy"] = loss_energy.detach()
            loss = loss + config.energy_weight * loss_energy
        return output, loss

    def energy_loss(self, batch: DistillBatch, scored: DistillBatch, G: Tensor, noise: Tensor) -> Tensor:
        """The energy score (:func:`~distill_mixins.methods.energy.energy_score`, mean over conditions) of ``G`` and
        ``energy_samples - 1`` more student clips of the same conditions (fresh noise) against ``batch.x0``."""
        if scored is not batch:
            raise ValueError(
                f"{type(self.distill_config).__name__}.energy_weight > 0 scores the student's clip against the "
                "batch's real clip, but this method scores another window (e.g. Self-Forcing with rollout_frames "
                "longer than the clip): set energy_weight=0 or rollout_frames=None."
            )
        m = self.distill_config.energy_samples  # type: ignore[attr-defined]
        extra = [self.student_clip(batch, self.draws.randn_like(noise), grad=True)[0] for _ in range(m - 1)]
        return energy_score([G, *extra], batch.x0, beta=self.distill_config.energy_beta).mean()  # type: ignore[attr-defined]

    def training_step_critic(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """Critic phase: fake-score denoising loss on student samples (+ discriminator loss and R1)."""
        config: DMD2Config = self.distill_config  # type: ignore[assignment]
        simulate = config.critic_samples == "simulated"
        G, data = self.student_clip(data, self.draws.randn_like(data.x0), grad=False, simulate=simulate)
        t = self.sample_t(G.shape[0], config.critic_time).to(G.device)
        eps = self.draws.randn_like(G)
        x_t = add_noise(G, eps, t, self.sigma_data)
        output: dict[str, Tensor] = {}
        disc: DiscriminatorConfig | None = config.discriminator
        if not self.gan_shares_critic_time:  # no GAN, or the GAN at its own times
            loss = fake_score_loss(G, self.trigflow_denoise(self.net_fake_score, x_t, t, data.condition).x0, t)
            output["loss_fake_score"] = loss.detach()
            if not self.gan_enabled:
                return output, loss
            x_fake, x_real, t = self._gan_noised(G, data.x0)
            logits_fake = self._discriminate(data, x_fake, t)[0]
        else:
            if disc.source == "critic":  # type: ignore[union-attr]
                logits_fake, x0_fake = self._discriminate(data, x_t, t)
            else:
                x0_fake = self.trigflow_denoise(self.net_fake_score, x_t, t, data.condition).x0
                logits_fake = self._discriminate(data, x_t, t)[0]
            loss = fake_score_loss(G, x0_fake, t)
            output["loss_fake_score"] = loss.detach()
            x_real = add_noise(data.x0, eps, t, self.sigma_data)
        r1_weight = disc.r1_weight  # type: ignore[union-attr]
        x_real = x_real.detach().requires_grad_(r1_weight > 0)  # type: ignore[union-attr]
        logits_real = self._discriminate(data, x_real, t)[0]
        loss_d = gan_discriminator_loss(logits_fake, logits_real)
        output["loss_gan_discriminator"] = loss_d.detach()
        loss = loss + loss_d
        if r1_weight > 0:
            r1 = r1_penalty(logits_real, x_real)
            output["loss_r1"] = r1.detach()
            loss = loss + r1_weight * r1
        return output, loss


__all__ = ["DMD_REDUCTIONS", "DMD2Config", "DMD2Mixin", "dmd_loss", "fake_score_loss"]
