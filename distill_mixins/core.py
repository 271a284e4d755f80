"""DistillationCoreMixin: what every distillation method shares (ARCHITECTURE.md, "Core").

Networks after construction: ``net`` (student), ``net_teacher`` (frozen teacher),
``net_fake_score`` (critic, methods with ``uses_critic``), ``net_ema`` (EMA of the student).
Phases: a student phase trains ``net``; a critic phase trains the critic-phase networks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from distill_mixins.config import DistillConfig, NetworkSpec, OptimizerConfig, TimeSamplerConfig
from distill_mixins.contract import check_host_instance
from distill_mixins.draws import DrawContext, Draws
from distill_mixins.sampling import SAMPLERS, Denoiser, guided_x0, sample_student, time_grid
from distill_mixins.shared_ref import SharedRef
from distill_mixins.trigflow import (
    TrigFlowMixin,
    max_time,
    sample_time,
    student_schedule,
    time_from_variate,
    time_variate,
)

TEACHER_PREFIX = "net_teacher."
RESERVED_NETWORKS = ("net_teacher", "net_fake_score", "net_discriminator", "net_ema")


@dataclass
class DistillBatch:
    """A batch prepared once per step: x0 (B, C, T, H, W), both CFG conditions, and the raw batch."""

    x0: Tensor
    condition: Any
    uncondition: Any
    raw: Any


def _instantiate(spec: NetworkSpec, teacher: nn.Module, field_name: str) -> nn.Module:
    """A trainable network from a config spec: a copy of the teacher, a module, or a factory's result."""
    if spec is None:
        net = _drop_teacher_guard(copy.deepcopy(teacher))
    elif isinstance(spec, nn.Module):
        net = spec
    else:
        net = spec()
        if not isinstance(net, nn.Module):
            raise TypeError(f"{field_name} factory returned {type(net).__name__}, not an nn.Module.")
    if net is teacher:
        raise ValueError(f"{field_name} is the teacher network itself; pass a separate module or None.")
    if not any(True for _ in net.parameters()):
        raise ValueError(
            f"the {field_name.removesuffix('_net')} network has no parameters to train (the teacher has none, "
            f"e.g. an exact analytic teacher): set DistillConfig.{field_name} to a trainable architecture."
        )
    return net.train()


def trained_parameter_names(net: nn.Module) -> frozenset[str]:
    """Parameters a network trains: those with ``requires_grad`` as given, or all if none has it
    (a teacher frozen as a whole). Parts frozen on purpose (e.g. a LoRA base) stay frozen."""
    names = frozenset(n for n, p in net.named_parameters() if p.requires_grad)
    return names or frozenset(n for n, _ in net.named_parameters())


def build_optimizer(net: nn.Module, config: OptimizerConfig, names: frozenset[str]) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over ``net``'s parameters in ``names``."""
    params = [p for n, p in net.named_parameters() if n in names]
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.betas[0], weight_decay=config.weight_decay)
    klass = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return klass(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :meth:`OptimizerConfig.lr_factor`: linear warm-up, then constant or decayed."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config.lr_factor(step))


class DistillationCoreMixin(TrigFlowMixin):
    """Student/critic/EMA construction, phases, optimizers, EMA and sampling for every method.

    Compose a method mixin (which subclasses this) before the host:
    ``class MyDistill(KDMixin, MyHost)``; construct with ``MyDistill(<host args>, distill=KDConfig())``.
    """

    config_class: ClassVar[type[DistillConfig]] = DistillConfig
    uses_critic: ClassVar[bool] = False
    student_phase_networks: ClassVar[tuple[str, ...]] = ("net",)
    critic_phase_networks: ClassVar[tuple[str, ...]] = ("net_fake_score", "net_discriminator")

    def __init__(self, *args: Any, distill: DistillConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_host_instance(self)
        config = self.config_class() if distill is None else distill
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__}(distill=...) needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}."
            )
        if not self.uses_critic and config.student_update_freq != 1:
            raise ValueError(
                f"{type(config).__name__}.student_update_freq={config.student_update_freq}: this method has "
                "no critic phase, so every iteration is a student phase; use 1."
            )
        self.distill_config = config
        self.conditional_sigma = config.conditional_sigma
        self._build_networks(config)
        self._optimizers: dict[str, torch.optim.Optimizer] | None = None
        self._schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] | None = None
        self.nonfinite_grad_counts = dict.fromkeys(self.trainable_networks(), 0)
        self.data_parallel_rank, self.data_parallel_size = 0, 1
        self._context_parallel = SharedRef(None)  # the CP process group (parallelize), shared by deep copies
        self._draws: Draws | None = None
        self._micro = (-1, 0)  # (iteration, training steps run at it): the micro-batch index under accumulation

    # ------------------------------------------------------------------ networks

    def _build_networks(self, config: DistillConfig) -> None:
        taken = [name for name in RESERVED_NETWORKS if name in self._modules or name in self.__dict__]
        if taken:
            raise TypeError(
                f"{type(self).__name__}: the host already sets {', '.join(taken)}, which the distillation mixin "
                "builds itself (the student's EMA is DistillConfig.ema). Turn that part of the host off (e.g. its "
                "own EMA) before composing it."
            )
        if config.lora is not None:  # student and critic as adapters on the one frozen base (distill_mixins.lora)
            from distill_mixins.lora import build_lora_networks

            build_lora_networks(self, config)
            return
        teacher = self.net
        self.net = _instantiate(config.student_net, teacher, "student_net")
        if self.uses_critic:
            self.net_fake_score = _instantiate(config.critic_net, teacher, "critic_net")
        self._trained_names = {name: trained_parameter_names(net) for name, net in self.trainable_networks().items()}
        self.net_teacher = teacher.requires_grad_(False).eval()
        if not _has_teacher_guard(teacher):  # a teacher shared by several models (KD, then DMD2) has one already
            teacher.register_load_state_dict_pre_hook(_keep_teacher_on_load)
        if config.ema is not None:
            self.net_ema = copy.deepcopy(self.net).requires_grad_(False).eval()
            for p in self.net_ema.parameters():  # average in float32: a bf16 EMA would not move
                if p.dtype in (torch.bfloat16, torch.float16):
                    p.data = p.data.float()
            self.register_buffer("ema_num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def load_student_state_dict(self, state: dict[str, Tensor], *, strict: bool = True) -> None:
        """Start from a previous stage's student (e.g. KD -> DMD2): load ``net`` and reset the EMA to it.

        The critic and the discriminator keep their initialization (the critic a copy of the teacher,
        as DMD2 prescribes); optimizers are untouched.
        """
        self.net.load_state_dict(state, strict=strict)
        if "net_ema" in self._modules:
            for p_ema, p in zip(self.net_ema.parameters(), self.net.parameters(), strict=True):
                p_ema.copy_(p.to(p_ema.dtype))
            for b_ema, b in zip(self.net_ema.buffers(), self.net.buffers(), strict=True):
                b_ema.copy_(b)

    def trainable_networks(self) -> dict[str, nn.Module]:
        """Every network an optimizer trains, by attribute name (never the teacher or the EMA)."""
        names = self.student_phase_networks + self.critic_phase_networks
        return {name: self._modules[name] for name in names if name in self._modules}

    def phase_networks(self, student_phase: bool) -> dict[str, nn.Module]:
        """The networks trained in a student phase, or in a critic phase."""
        names = self.student_phase_networks if student_phase else self.critic_phase_networks
        return {name: net for name, net in self.trainable_networks().items() if name in names}

    def set_phase(self, student_phase: bool) -> None:
        """Per-phase freezing: the phase's networks get gradients and train mode, the others neither."""
        trained = self.phase_networks(student_phase)
        for name, net in self.trainable_networks().items():
            for param_name, p in net.named_parameters():
                p.requires_grad_(name in trained and param_name in self._trained_names[name])
            net.train(self.training and name in trained)

    def train(self, mode: bool = True) -> DistillationCoreMixin:
        """Like nn.Module.train, but the teacher and the EMA stay in eval mode."""
        super().train(mode)  # type: ignore[misc]
        for name in ("net_teacher", "net_ema"):  # absent while the host's __init__ runs
            if name in self._modules:
                self._modules[name].eval()
        return self

    # -------------------------------------------------------------------- phases

    def is_student_phase(self, iteration: int) -> bool:
        """Student phase when ``iteration < warmup_student_iters`` or ``iteration % student_update_freq == 0``."""
        config = self.distill_config
        return iteration < config.warmup_student_iters or iteration % config.student_update_freq == 0

    def optimizer_config(self, name: str) -> OptimizerConfig:
        """Optimizer settings of the network ``name`` (student or critic side)."""
        config = self.distill_config
        return config.student_optimizer if name in self.student_phase_networks else config.critic_optimizer

    def _ensure_optimizers(self) -> None:
        # Built on first use, so parallelism applied after construction (FSDP) is seen by the optimizers.
        if self._optimizers is None:
            nets = self.trainable_networks()
            self._optimizers = {
                name: build_optimizer(net, self.optimizer_config(name), self._trained_names[name])
                for name, net in nets.items()
            }
            self._schedulers = {
                name: build_scheduler(opt, self.optimizer_config(name)) for name, opt in self._optimizers.items()
            }

    @property
    def optimizers_built(self) -> bool:
        """Whether the optimizers exist yet (they are built on first use, after any parallelism is applied)."""
        return self._optimizers is not None

    def reset_optimizers(self) -> None:
        """Drop the optimizers and schedulers (before any step: e.g. after the parameters were replaced); the next
        use builds them again over the current parameters."""
        if self._optimizers is not None and any(opt.state for opt in self._optimizers.values()):
            raise RuntimeError("reset_optimizers after an optimizer step would lose the optimizer state.")
        self._optimizers, self._schedulers = None, None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by network name (for checkpointing)."""
        self._ensure_optimizers()
        assert self._optimizers is not None
        return self._optimizers

    def lr_schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Every learning-rate scheduler by network name (for checkpointing)."""
        self._ensure_optimizers()
        assert self._schedulers is not None
        return self._schedulers

    def get_optimizers(self, iteration: int) -> list[torch.optim.Optimizer]:
        """Only the optimizers of the networks trained at ``iteration``'s phase."""
        names = self.phase_networks(self.is_student_phase(iteration))
        return [opt for name, opt in self.optimizers().items() if name in names]

    def get_lr_schedulers(self, iteration: int) -> list[torch.optim.lr_scheduler.LRScheduler]:
        """Only the schedulers of the networks trained at ``iteration``'s phase."""
        names = self.phase_networks(self.is_student_phase(iteration))
        return [sched for name, sched in self.lr_schedulers().items() if name in names]

    # ------------------------------------------------------------ training step

    def prepare_data(self, batch: Any) -> DistillBatch:
        """Run the host's ``get_data_and_condition`` once per step."""
        x0, condition, uncondition = self.get_data_and_condition(batch)  # type: ignore[attr-defined]
        return DistillBatch(x0=x0, condition=condition, uncondition=uncondition, raw=batch)

    def set_data_parallel(self, rank: int, size: int) -> None:
        """This process's data-parallel rank and the number of them: the local batch of ``B`` samples holds the
        global samples ``rank * B ... rank * B + B - 1`` (every rank gets an equal share), which seeds their draws.
        Set by :func:`distill_mixins.parallel.parallelize`; call it yourself only with your own data parallelism."""
        if not (isinstance(rank, int) and isinstance(size, int) and 0 <= rank < size):
            raise ValueError(f"set_data_parallel(rank={rank!r}, size={size!r}): need ints with 0 <= rank < size.")
        self.data_parallel_rank, self.data_parallel_size = rank, size

    def set_context_parallel(self, group: Any) -> None:
        """The context-parallel process group the networks run over (``None``: off), set by
        :func:`distill_mixins.parallel.parallelize` after the host's ``enable_context_parallel``. The ranks of a
        group hold the same samples (one data-parallel rank) and the same draws; GAN feature taps gather over it."""
        self._context_parallel = SharedRef(group)

    @property
    def context_parallel_group(self) -> Any:
        """The context-parallel process group, ``None`` when context parallel is off."""
        return self._context_parallel.value

    @property
    def context_parallel_size(self) -> int:
        """The number of ranks that split each clip's tokens (1 when context parallel is off)."""
        group = self._context_parallel.value
        return 1 if group is None else torch.distributed.get_world_size(group)

    @property
    def draws(self) -> Draws:
        """The current training step's random draws (:mod:`distill_mixins.draws`); per-sample draws (the default)
        only inside a training step or ``with model.drawing(...)``, global draws (``draws="global"``) anywhere."""
        if self._draws is None:
            if not self._per_sample_draws:  # global draws need no step: they are the torch RNG's
                return Draws(DrawContext(self.distill_config.seed, 0, per_sample=False))
            raise RuntimeError(
                "model.draws is only available inside training_step (it is seeded by the iteration); to call a "
                "method's pieces yourself, wrap them in `with model.drawing(iteration, batch_size):`."
            )
        return self._draws

    @property
    def _per_sample_draws(self) -> bool:
        return self.distill_config.draws == "per_sample" or self.data_parallel_size > 1

    @contextmanager
    def drawing(self, iteration: int, local_batch: int, micro: int = 0) -> Iterator[Draws]:
        """Make ``self.draws`` the draws of ``iteration`` (micro-batch ``micro``) for a local batch of
        ``local_batch`` samples, as :meth:`training_step` does; e.g. to call a method's pieces (``student_sample``)
        outside a step."""
        first = self.data_parallel_rank * local_batch
        context = DrawContext(self.distill_config.seed, iteration, micro, first, self._per_sample_draws)
        previous, self._draws = self._draws, Draws(context)
        try:
            yield self._draws
        finally:
            self._draws = previous

    def training_step(self, batch: Any, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """One step of the phase of ``iteration``: ``(output_dict, loss)``, like the host's own step.

        Its random draws (``self.draws``) are seeded by ``DistillConfig.seed``, the iteration, the micro-batch
        (the number of steps already run at this iteration) and each sample's global index."""
        student_phase = self.is_student_phase(iteration)
        self.set_phase(student_phase)
        data = self.prepare_data(batch)
        micro = self._micro[1] + 1 if self._micro[0] == iteration else 0  # steps already run at this iteration
        self._micro = (iteration, micro)
        with self.drawing(iteration, data.x0.shape[0], micro):
            if student_phase:
                return self.training_step_generator(data, iteration)
            return self.training_step_critic(data, iteration)

    def training_step_generator(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """The method's student loss; method mixins implement it."""
        raise NotImplementedError(
            f"{type(self).__name__} composes DistillationCoreMixin without a method: use a method mixin "
            "(e.g. KDMixin, DMD2Mixin) that implements training_step_generator."
        )

    def training_step_critic(self, data: DistillBatch, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        """The method's critic loss; methods with ``uses_critic`` implement it."""
        raise NotImplementedError(f"{type(self).__name__}'s method has no critic phase.")

    # ---------------------------------------------------------- optimizer step

    def clip_gradients(self, iteration: int) -> dict[str, float]:
        """Per-network gradient norm clipping of the current phase; non-finite gradients are zeroed
        and counted in ``nonfinite_grad_counts``. Returns each network's norm before clipping
        (non-finite for a network whose gradients were zeroed)."""
        norms = {}
        for name, net in self.phase_networks(self.is_student_phase(iteration)).items():
            grads = [p for p in net.parameters() if p.grad is not None]
            if not grads:
                continue
            max_norm = self.optimizer_config(name).grad_clip
            norm = full_value(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else math.inf))
            if not torch.isfinite(norm):
                for p in grads:
                    p.grad.zero_()
                self.nonfinite_grad_counts[name] += 1
            norms[name] = float(norm)
        return norms

    def optimizer_step(self, iteration: int) -> dict[str, float]:
        """Clip, step and zero this phase's optimizers, step their schedulers, update the EMA.

        A network whose gradients were non-finite, or that has none, is not stepped (no weight decay,
        momentum, scheduler step or EMA update either). Returns the gradient norms of :meth:`clip_gradients`.
        """
        norms = self.clip_gradients(iteration)
        stepped = [name for name, norm in norms.items() if math.isfinite(norm)]
        for name in self.phase_networks(self.is_student_phase(iteration)):
            if name in stepped:
                self.optimizers()[name].step()
                self.lr_schedulers()[name].step()
            self.optimizers()[name].zero_grad(set_to_none=True)
        if "net" in stepped:
            self.update_ema(iteration)
        return norms

    @torch.no_grad()
    def update_ema(self, iteration: int) -> None:
        """Move ``net_ema`` toward the student; a no-op without EMA or outside student phases."""
        config = self.distill_config.ema
        if config is None or not self.is_student_phase(iteration):
            return
        self.ema_num_updates += 1
        beta = 0.0 if iteration < config.start_iter else config.beta(int(self.ema_num_updates))
        for p_ema, p in zip(self.net_ema.parameters(), self.net.parameters(), strict=True):
            local(p_ema).lerp_(local(p).detach().to(p_ema.dtype), 1.0 - beta)  # shard by shard, no communication
        for b_ema, b in zip(self.net_ema.buffers(), self.net.buffers(), strict=True):
            local(b_ema).copy_(local(b))

    # ------------------------------------------------------------------ sampling

    def sample_t(
        self, n: int, config: TimeSamplerConfig, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` training times (float64, (n,)) from ``config``, capped at the host's largest usable time.

        Inside a training step without ``generator``: one time per sample from the step's draws."""
        t_max = max_time(self.scaling, self.sigma_data, self.distill_config.sigma_max)
        if generator is None and self._draws is not None:
            v = self._draws.rand(n) if time_variate(config) == "uniform" else self._draws.randn(n)
            t = time_from_variate(v, config, self.sigma_data)
        else:
            t = sample_time(n, config, self.sigma_data, generator=generator)
        return t.clamp(max=t_max)

    def student_times(self) -> Tensor:
        """Descending TrigFlow times of the student's sampler (float64, (steps,))."""
        config = self.distill_config
        return student_schedule(
            config.student_schedule, self.scaling, self.sigma_data, shift=config.student_shift,
            sigma_max=config.sigma_max,
        )

    def guided_denoiser(self, net: nn.Module, condition: Any, uncondition: Any = None, w: float = 1.0) -> Denoiser:
        """``(x_t, t) -> x0`` of ``net`` with CFG ``x0_u + w (x0_c - x0_u)``; w = 1 runs only the conditional."""

        def denoise(x_t: Tensor, t: Tensor) -> Tensor:
            x0_c = self.trigflow_denoise(net, x_t, t, condition).x0
            if w == 1.0:
                return x0_c
            if uncondition is None:
                raise ValueError(f"guidance w={w} needs an uncondition (or a negative condition).")
            return guided_x0(x0_c, self.trigflow_denoise(net, x_t, t, uncondition).x0, w)

        return denoise

    @torch.no_grad()
    def generate(
        self, condition: Any, noise: Tensor, *, schedule: str | tuple[float, ...] | None = None,
        use_ema: bool = False, generator: torch.Generator | None = None,
    ) -> Tensor:
        """Few-step student samples x0 (B, C, T, H, W) from unit-normal ``noise`` (B, C, T, H, W).

        ``schedule`` overrides the config's student schedule; ``use_ema`` samples ``net_ema``.
        """
        if use_ema and self.distill_config.ema is None:
            raise ValueError("generate(use_ema=True) needs EMA: set DistillConfig.ema=EMAConfig(...).")
        net = self.net_ema if use_ema else self.net
        config = self.distill_config
        ts = self.student_times() if schedule is None else student_schedule(
            schedule, self.scaling, self.sigma_data, shift=config.student_shift, sigma_max=config.sigma_max
        )
        return sample_student(
            self.guided_denoiser(net, condition), noise, ts, sigma_data=self.sigma_data, generator=generator,
            renoise=config.renoise,
        )

    @torch.no_grad()
    def generate_teacher(
        self, condition: Any, noise: Tensor, *, uncondition: Any = None, guidance: float = 1.0,
        steps: int = 36, sampler: str = "heun", grid: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Teacher ODE samples x0 (B, C, T, H, W): ``steps`` Euler, Heun or DDIM steps, CFG ``w = guidance``.

        The default grid is EDM's Karras grid for EDM hosts, uniform rectified-flow time otherwise.
        Pass a negative condition as ``uncondition``.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not known; choose one of {', '.join(SAMPLERS)}.")
        if grid is None:
            kind = "karras" if self.scaling == "edm" else "shifted_rf"
            t_max = max_time(self.scaling, self.sigma_data, self.distill_config.sigma_max)
            grid = time_grid(steps, kind, self.sigma_data, sigma_max=self.distill_config.sigma_max, t_max=t_max)
        denoise = self.guided_denoiser(self.net_teacher, condition, uncondition, guidance)
        return SAMPLERS[sampler](denoise, noise, grid, sigma_data=self.sigma_data, generator=generator)

    # --------------------------------------------------------------- state dict

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """nn.Module.state_dict without the teacher (it is never saved). Loading refuses teacher keys
        and keeps the teacher, also through wrappers such as DDP (a load pre-hook on the teacher)."""
        state = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "") + TEACHER_PREFIX
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        return state


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard (or replica) of a DTensor, the tensor itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_value(tensor: Tensor) -> Tensor:
    """A DTensor's whole value (a gradient norm reduced over every shard), a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _keep_teacher_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook of the teacher: refuse teacher weights, and keep the current ones."""
    leaked = [key for key in state_dict if key.startswith(prefix)]
    if leaked:
        raise ValueError(
            f"state dict holds teacher weights ({leaked[0]}, ...): the teacher comes from the host, never from a "
            f"distillation checkpoint. Drop the '{prefix}' keys."
        )
    state_dict.update(module.state_dict(prefix=prefix))


def _has_teacher_guard(net: nn.Module) -> bool:
    return any(getattr(h, "hook", h) is _keep_teacher_on_load for h in net._load_state_dict_pre_hooks.values())


def _drop_teacher_guard(net: nn.Module) -> nn.Module:
    """A copy of a teacher that already served another model carries its load guard (deepcopy copies hooks): a
    student or critic built from it must load its own weights, so the guard is removed from the copy."""
    hooks = net._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _keep_teacher_on_load]:
        del hooks[key]
    return net
