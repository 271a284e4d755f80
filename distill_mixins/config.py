"""Typed, validated configuration shared by every distillation method.

Every config is a dataclass checked in ``__post_init__``: a bad value raises a
``ValueError`` naming the field and the allowed values. Unknown strings never fall
back silently. ``to_dict`` gives the resolved config for the run directory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

NetworkSpec = nn.Module | Callable[[], nn.Module] | None
"""A network for the student or the critic: a module, a zero-argument factory, or
``None`` for a copy of the teacher."""

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_DECAYS = ("constant", "cosine", "linear")
EMA_KINDS = ("halflife", "power")
TIME_SAMPLERS = ("shifted_uniform", "lognormal", "logit_normal", "uniform")
STUDENT_SCHEDULES = ("one_step", "cosmos_4step")
RENOISE_MODES = ("fresh", "initial", "ode")


def check_choice(owner: str, name: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming ``owner.name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not known; choose one of {', '.join(choices)}.")


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``owner.name`` unless ``value`` is finite and > 0 (or >= 0)."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name}={value!r} must be a finite number {bound}.")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Resolved config as plain JSON-ready values (modules and factories by name)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, nn.Module):
            return f"<module {type(value).__qualname__}>"
        return f"<{getattr(value, '__qualname__', type(value).__qualname__)}>"

    return {"type": type(config).__name__, **plain(config)}


@dataclass
class OptimizerConfig:
    """Optimizer and learning-rate schedule of one network (warm-up, then constant or decayed)."""

    name: str = "adamw"
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    """Max gradient norm of this network; ``None`` measures the norm without clipping."""
    warmup_iters: int = 0
    """Linear learning-rate warm-up over this many steps of this network's optimizer."""
    decay: str = "constant"
    """After the warm-up: ``constant``, or a ``cosine`` / ``linear`` decay reaching ``min_lr_ratio * lr`` at step
    ``decay_iters`` of this network's optimizer (constant after it)."""
    decay_iters: int = 0
    """The optimizer step where the decay ends (> ``warmup_iters``; a student updated every k-th iteration makes
    ``iterations / k`` steps)."""
    min_lr_ratio: float = 0.0
    """The decay's final learning rate as a fraction of ``lr``, in [0, 1]."""

    def __post_init__(self) -> None:
        check_choice("OptimizerConfig", "name", self.name, OPTIMIZERS)
        check_positive("OptimizerConfig", "lr", self.lr)
        check_positive("OptimizerConfig", "weight_decay", self.weight_decay, allow_zero=True)
        check_positive("OptimizerConfig", "eps", self.eps)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas={self.betas!r} must be two numbers in [0, 1).")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.grad_clip is not None:
            check_positive("OptimizerConfig", "grad_clip", self.grad_clip)
        if self.warmup_iters < 0:
            raise ValueError(f"OptimizerConfig.warmup_iters={self.warmup_iters} must be >= 0.")
        check_choice("OptimizerConfig", "decay", self.decay, LR_DECAYS)
        if self.decay != "constant" and self.decay_iters <= self.warmup_iters:
            raise ValueError(f"OptimizerConfig.decay_iters={self.decay_iters} must be > warmup_iters="
                             f"{self.warmup_iters} with decay={self.decay!r}: set the optimizer step where the "
                             "decay ends.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")

    def lr_factor(self, step: int) -> float:
        """The learning rate at optimizer step ``step`` (0-based) as a fraction of ``lr``."""
        if step < self.warmup_iters:
            return (step + 1) / self.warmup_iters
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_iters) / (self.decay_iters - self.warmup_iters))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


@dataclass
class EMAConfig:
    """Exponential moving average of the student, updated in student phases only.

    ``halflife``: ``beta = 0.5 ** (1 / halflife_steps)`` (counting student updates).
    ``power``: ``beta_n = (1 - 1/n) ** (gamma + 1)`` after n student updates (Karras et al. 2024).
    """

    kind: str = "halflife"
    halflife_steps: float = 500.0
    gamma: float = 6.94
    start_iter: int = 0
    """Iterations before this copy the student instead of averaging."""

    def __post_init__(self) -> None:
        check_choice("EMAConfig", "kind", self.kind, EMA_KINDS)
        check_positive("EMAConfig", "halflife_steps", self.halflife_steps)
        check_positive("EMAConfig", "gamma", self.gamma)
        if self.start_iter < 0:
            raise ValueError(f"EMAConfig.start_iter={self.start_iter} must be >= 0.")

    def beta(self, num_updates: int) -> float:
        """Decay for the ``num_updates``-th update (1-based)."""
        if self.kind == "halflife":
            return 0.5 ** (1.0 / self.halflife_steps)
        return (1.0 - 1.0 / num_updates) ** (self.gamma + 1.0)


@dataclass
class TimeSamplerConfig:
    """Distribution of TrigFlow training times ``t in (0, pi/2]`` (MATH.md section 1).

    ``shifted_uniform``: ``u ~ U(0,1)``, ``tau = shift u / (1 + (shift-1) u)`` (rectified flow).
    ``lognormal``: ``log sigma ~ N(p_mean, p_std^2)`` (EDM). ``logit_normal``:
    ``logit tau ~ N(p_mean, p_std^2)``. ``uniform``: ``t ~ U(t_min, t_max)``.
    Every sample is clamped to ``[t_min, t_max]``.
    """

    kind: str = "shifted_uniform"
    shift: float = 5.0
    p_mean: float = -1.2
    p_std: float = 1.2
    t_min: float = 1e-4
    t_max: float = math.pi / 2

    def __post_init__(self) -> None:
        check_choice("TimeSamplerConfig", "kind", self.kind, TIME_SAMPLERS)
        check_positive("TimeSamplerConfig", "shift", self.shift)
        check_positive("TimeSamplerConfig", "p_std", self.p_std)
        if not 0.0 < self.t_min < self.t_max <= math.pi / 2:
            raise ValueError(
                f"TimeSamplerConfig.t_min={self.t_min}, t_max={self.t_max}: need 0 < t_min < t_max <= pi/2."
            )


@dataclass
class LoraSpec:
    """LoRA distillation (:mod:`distill_mixins.lora`, needs ``pip install 'distill-mixins[lora]'``): the student (and
    the critic) are peft LoRA adapters on the teacher's own network, which stays frozen and is never copied.

    ``target_modules``: module names (or name suffixes, peft's rule) of the linear layers that get adapters, e.g.
    ``("to_q", "to_k", "to_v", "to_out.0")``; a single string is a regular expression matched against the full
    module name. ``alpha / rank`` scales the adapters' output. ``critic``: the critic is an adapter too (else a copy
    of the teacher, or ``critic_net``).
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str
    dropout: float = 0.0
    critic: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank={self.rank!r} must be an int >= 1.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"LoraSpec.alpha={self.alpha!r} must be a finite number > 0.")
        check_positive("LoraSpec", "alpha", self.alpha)
        self.alpha = float(self.alpha)
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("LoraSpec.target_modules='' is empty; name the linear layers to adapt.")
        else:
            names = tuple(self.target_modules) if isinstance(self.target_modules, (list, tuple)) else None
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"LoraSpec.target_modules={self.target_modules!r} must be a non-empty list of module names "
                    "(e.g. ('to_q', 'to_k', 'to_v', 'to_out.0')) or one regular expression."
                )
            self.target_modules = names
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"LoraSpec.dropout={self.dropout!r} must be a number in [0, 1).")
        self.dropout = float(self.dropout)
        if not isinstance(self.critic, bool):
            raise ValueError(f"LoraSpec.critic={self.critic!r} must be True or False.")


DRAWS = ("global", "per_sample")


@dataclass
class DistillConfig:
    """Settings every method shares; each method subclasses it (``KDConfig``, ``DMD2Config``).

    Phases: iteration ``i`` is a student phase when ``i < warmup_student_iters`` or
    ``i % student_update_freq == 0``, else a critic phase (MATH.md section 4).
    """

    student_update_freq: int = 1
    warmup_student_iters: int = 0
    student_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema: EMAConfig | None = None
    student_net: NetworkSpec = None
    """Student architecture (size distillation); ``None`` copies the teacher."""
    critic_net: NetworkSpec = None
    """Critic (fake score) architecture; ``None`` copies the teacher."""
    student_schedule: str | tuple[float, ...] = "one_step"
    """``one_step``, ``cosmos_4step`` or explicit descending TrigFlow times in (0, pi/2]."""
    student_shift: float = 5.0
    """Rectified-flow shift of the ``cosmos_4step`` schedule."""
    sigma_max: float = 80.0
    """Largest sigma of an EDM host: its one-step student starts at ``t = atan(sigma_max / sigma_data)``."""
    renoise: str = "fresh"
    """Few-step student sampling: re-noise with fresh noise (FastGen 'sde'), the initial noise (Cosmos), or
    the noise implied by the current state ('ode', deterministic DDIM; for multi-step KD students)."""
    conditional_sigma: float = 1e-4
    """Noise level given to ground-truth frames of a Video2World condition."""
    draws: str = "per_sample"
    """Random draws of training steps (:mod:`distill_mixins.draws`): ``per_sample`` (each sample's noise and time
    hashed from (``seed``, iteration, its global index): the same however the batch is split, so one process trains
    exactly as N do, and a resume needs no RNG state) or ``global`` (the torch RNG, as the code before issue 16 did;
    one process only: data parallelism always uses ``per_sample``)."""
    seed: int = 0
    """Seed of the ``per_sample`` draws (``global`` draws follow the torch RNG, e.g. the trainer's seed)."""
    lora: LoraSpec | None = None
    """LoRA distillation: the student (and the critic) as adapters on the one frozen teacher network
    (:mod:`distill_mixins.lora`); ``None`` trains full copies."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_choice(name, "draws", self.draws, DRAWS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"{name}.seed={self.seed!r} must be an int >= 0.")
        if not isinstance(self.student_update_freq, int) or self.student_update_freq < 1:
            raise ValueError(f"{name}.student_update_freq={self.student_update_freq!r} must be an int >= 1.")
        if not isinstance(self.warmup_student_iters, int) or self.warmup_student_iters < 0:
            raise ValueError(f"{name}.warmup_student_iters={self.warmup_student_iters} must be an int >= 0.")
        for attr in ("student_optimizer", "critic_optimizer"):
            if not isinstance(getattr(self, attr), OptimizerConfig):
                raise TypeError(f"{name}.{attr} must be an OptimizerConfig, got {getattr(self, attr)!r}.")
        if self.ema is not None and not isinstance(self.ema, EMAConfig):
            raise TypeError(f"{name}.ema must be an EMAConfig or None, got {self.ema!r}.")
        for attr in ("student_net", "critic_net"):
            spec = getattr(self, attr)
            if spec is not None and not (isinstance(spec, nn.Module) or callable(spec)):
                raise TypeError(f"{name}.{attr} must be an nn.Module, a zero-argument factory or None.")
        if isinstance(self.student_schedule, str):
            check_choice(name, "student_schedule", self.student_schedule, STUDENT_SCHEDULES)
        else:
            ts = tuple(float(t) for t in self.student_schedule)
            ok = len(ts) > 0 and all(0 < t <= math.pi / 2 for t in ts) and all(
                a > b for a, b in zip(ts, ts[1:], strict=False)
            )
            if not ok:
                raise ValueError(
                    f"{name}.student_schedule={self.student_schedule!r}: give 'one_step', 'cosmos_4step' "
                    "or strictly descending TrigFlow times in (0, pi/2]."
                )
            self.student_schedule = ts
        check_positive(name, "student_shift", self.student_shift)
        check_positive(name, "sigma_max", self.sigma_max)
        check_positive(name, "conditional_sigma", self.conditional_sigma)
        check_choice(name, "renoise", self.renoise, RENOISE_MODES)
        if self.lora is not None:
            if not isinstance(self.lora, LoraSpec):
                raise TypeError(f"{name}.lora must be a LoraSpec or None, got {self.lora!r}.")
            if self.student_net is not None:
                raise ValueError(
                    f"{name}.student_net must be None with {name}.lora: the LoRA student is an adapter on the "
                    "teacher's network (set lora=None to train a separate student architecture)."
                )
            if self.lora.critic and self.critic_net is not None:
                raise ValueError(
                    f"{name}.critic_net must be None with {name}.lora.critic=True (the critic is an adapter on the "
                    "teacher's network); set LoraSpec(critic=False) to train a separate critic."
                )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-ready values."""
        return config_to_dict(self)
