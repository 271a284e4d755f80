"""Train the toy Video2World teacher from scratch (the script behind the shipped weights).

Rectified flow with the clean clip as the network's target (velocity derived from it): per step, ``batch``
fresh procedural clips (:mod:`distill_mixins.toy.clips`), ``tau`` from a logit-normal / uniform mix,
``x = (1 - tau) x0 + tau eps`` with the first frame given (pasted at the conditional noise level, as the
distillation mixins paste it), prompts dropped to "" with probability ``p_uncond`` (classifier-free guidance),
and the velocity loss ``||(x0_hat - x0) / max(tau, tau_floor)||^2`` on the generated frames. AdamW, bf16
autocast where the CPU computes bf16 natively (``precision``: :mod:`distill_mixins.precision`), an EMA of the
weights (the EMA is what ships). The text encoder stays frozen at its seeded initialisation, as Cosmos keeps its
T5 frozen: trained jointly, its direction features learnt several times slower than the UNet could use them
(docs/toy.md has the measurements). Resumable: ``train_state.pt`` in the run directory is written atomically
every ``save_every`` iterations and picked up by a re-run.

Command: ``distill-mixins toy-teacher --out runs/toy-teacher`` (see ``--help``); the exact command that made
the shipped weights is stored in their metadata and in docs/toy.md.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from loguru import logger
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from distill_mixins.checkpointer.files import plain_tensors, save_safetensors, save_torch, write_atomic
from distill_mixins.config import EMAConfig
from distill_mixins.precision import PrecisionReport, autocast, check_precision
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.host import ToyVideo2World, first_frame_mask
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.unet import ToyUNet
from distill_mixins.trigflow import native_coefficients, native_to_trigflow_time

WEIGHTS = Path(__file__).parent / "weights" / "toy_teacher.safetensors"
"""The shipped teacher (EMA UNet + text encoder, bf16)."""
DIT_WEIGHTS = Path(__file__).parent / "weights" / "toy_dit_teacher.safetensors"
"""The shipped bidirectional transformer teacher (EMA :class:`~distill_mixins.toy.causal_dit.ToyCausalDiT` + text
encoder, bf16): the causal students' initialisation."""
ARCHS = ("unet", "dit")
"""``unet``: :class:`ToyUNet` (the main demo's teacher); ``dit``: :class:`~distill_mixins.toy.causal_dit.ToyCausalDiT`
run bidirectionally (the causal pipeline's teacher, whose weights the causal student starts from)."""

DEFAULT_LR = {"unet": 6e-4, "dit": 3e-3}
"""The learning rate of each arch when none is given (the transformer: 400-iteration probes at batch 16 in
docs/development.md)."""


def dit_teacher_file(teacher_weights: str | None, owner: str) -> Path:
    """The transformer teacher's weights file: ``teacher_weights``, or the shipped one when None; a ValueError naming
    ``owner`` (the config field) and the command that trains it when the file is missing."""
    path = Path(teacher_weights) if teacher_weights else DIT_WEIGHTS
    if not path.is_file():
        raise ValueError(
            f"{owner}: {path} is not a file: train the transformer teacher with `distill-mixins toy-teacher --arch dit "
            "--out runs/toy-dit-teacher` and pass runs/toy-dit-teacher/toy_dit_teacher.safetensors."
        )
    return path


def make_network(arch: str) -> torch.nn.Module:
    """A fresh teacher network of ``arch`` (:data:`ARCHS`)."""
    if arch == "unet":
        return ToyUNet()
    if arch == "dit":
        from distill_mixins.toy.causal_dit import ToyCausalDiT

        return ToyCausalDiT()
    raise ValueError(f"toy teacher arch={arch!r} is not known; use one of {', '.join(ARCHS)}.")


@dataclass
class TeacherTrainConfig:
    """Settings of :func:`train_toy_teacher` (the defaults, with ``precision="bf16"``, made the shipped weights)."""

    iterations: int = 3000
    batch_size: int = 48
    lr: float | None = None
    """AdamW learning rate; None: the arch's (:data:`DEFAULT_LR`: 6e-4 for the UNet, 3e-3 for the transformer)."""
    warmup: int = 200
    weight_decay: float = 0.0
    ema_halflife: float = 300.0
    """EMA half-life in iterations."""
    p_uncond: float = 0.1
    tau_floor: float = 0.05
    uniform_fraction: float = 0.3
    """Share of the batch with tau ~ U(0, 1); the rest is logit-normal(``logit_mean``, 1)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal times: > 0 puts more of the batch at high noise, where a sample's layout and motion
    are decided."""
    init_weights: str | None = None
    """A toy teacher weights file of the same arch to start from (fine-tuning; its EMA starts there too). None: a
    fresh network. A resumed run ignores it (the run's state wins)."""
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    """``auto`` (bf16 autocast only where the CPU computes bf16 natively: :func:`~distill_mixins.precision.
    resolve_precision`), ``bf16`` or ``fp32``. The shipped weights were trained under bf16 autocast."""
    save_every: int = 250
    conditional_sigma: float = 1e-4
    arch: str = "unet"
    """The network (:data:`ARCHS`): ``unet`` (the main demo's teacher) or ``dit`` (the causal pipeline's)."""
    target_teacher: str | None = None
    """A toy teacher weights file whose denoiser to regress instead of the clean clip (denoiser distillation: at the
    same noisy input, time and prompt, its x0 prediction is the target): a target without the data's spread (the
    conditional mean the data loss converges to), so a new network learns from an existing teacher in fewer
    iterations. None: the data (how the shipped UNet trained)."""

    def __post_init__(self) -> None:
        check_precision(self.precision, "TeacherTrainConfig.precision")
        if self.target_teacher is not None and not Path(self.target_teacher).is_file():
            raise ValueError(f"TeacherTrainConfig.target_teacher={self.target_teacher!r} is not a file: give a toy "
                             "teacher safetensors file (e.g. the shipped distill_mixins/toy/weights/"
                             "toy_teacher.safetensors), or leave it unset to train on the data.")
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise ValueError(f"TeacherTrainConfig.init_weights={self.init_weights!r} is not a file: give a toy teacher "
                             "safetensors file of the same arch, or leave it unset to start from scratch.")
        if self.arch not in ARCHS:
            raise ValueError(f"TeacherTrainConfig.arch={self.arch!r} is not known; use one of {', '.join(ARCHS)}.")
        for name in ("iterations", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TeacherTrainConfig.{name}={getattr(self, name)} must be >= 1.")
        if not 0 <= self.p_uncond < 1 or not 0 <= self.uniform_fraction <= 1:
            raise ValueError("TeacherTrainConfig.p_uncond must be in [0, 1) and uniform_fraction in [0, 1].")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.arch]
        if not self.lr > 0 or not self.tau_floor > 0 or not self.ema_halflife > 0:
            raise ValueError("TeacherTrainConfig.lr, tau_floor and ema_halflife must be > 0.")


def sample_tau(n: int, uniform_fraction: float, generator: torch.Generator, logit_mean: float = 0.0) -> Tensor:
    """Training times tau (n,): a uniform share, the rest logit-normal(logit_mean, 1) (Esser et al. 2024)."""
    uniform = torch.rand(n, generator=generator)
    logit = torch.sigmoid(torch.randn(n, generator=generator) + logit_mean)
    pick = torch.rand(n, generator=generator) < uniform_fraction
    return torch.where(pick, uniform, logit).clamp(1e-4, 1.0)


def conditional_scale(conditional_sigma: float) -> float:
    """Native rectified-flow scale ``1 - tau_c`` of a given frame at the conditional EDM sigma (as the mixins)."""
    t_c = native_to_trigflow_time(torch.tensor(conditional_sigma, dtype=torch.float64), "edm", 1.0)
    return float(native_coefficients(t_c, "rectified_flow", 1.0)[0])


def noised_clip(x0: Tensor, eps: Tensor, tau: Tensor, mask: Tensor, conditional_sigma: float) -> Tensor:
    """The teacher's training input (B, C, T, H, W): ``(1 - tau) x0 + tau eps`` on the generated frames at tau (B,),
    the given frames (``mask`` (B, 1, T, 1, 1) = 1) clean at the conditional scale, as the mixins paste them."""
    tb = tau[:, None, None, None, None]
    return mask * conditional_scale(conditional_sigma) * x0 + (1 - mask) * ((1 - tb) * x0 + tb * eps)


def frame_times(net: torch.nn.Module, tau: Tensor, mask: Tensor, conditional_sigma: float) -> Tensor:
    """The network's time input: tau (B,) for the UNet; per frame (B, T) for the transformer, the given frames at the
    conditional time, as the causal host (``supports_per_frame_time``) runs it."""
    from distill_mixins.toy.causal_dit import ToyCausalDiT

    if not isinstance(net, ToyCausalDiT):
        return tau
    given = mask[:, 0, :, 0, 0] > 0  # (B, T)
    tau_c = 1.0 - conditional_scale(conditional_sigma)
    return torch.where(given, torch.full_like(given, tau_c, dtype=tau.dtype), tau[:, None].expand_as(given))


def teacher_loss(
    host: ToyVideo2World, clip: Tensor, prompts: list[str], config: TeacherTrainConfig, generator: torch.Generator,
    target: ToyVideo2World | None = None,
) -> Tensor:
    """Velocity loss ``mean ||(x0_hat - x0) / max(tau, tau_floor)||^2`` over the generated frames; with a ``target``
    teacher, its x0 prediction at the same input replaces the clean clip ``x0``."""
    x0 = host.encode(clip)
    b, _, frames = x0.shape[:3]
    keep = torch.rand(b, generator=generator) >= config.p_uncond
    used = [p if k else "" for p, k in zip(prompts, keep.tolist(), strict=True)]
    with torch.no_grad():  # the text encoder is frozen
        text = host.embed_prompts(used)
    tau = sample_tau(b, config.uniform_fraction, generator, config.logit_mean)
    eps = torch.randn(x0.shape, generator=generator)
    tb = tau[:, None, None, None, None]
    mask = first_frame_mask(b, frames)
    x = noised_clip(x0, eps, tau, mask, config.conditional_sigma)
    time = frame_times(host.net, tau, mask, config.conditional_sigma)
    with autocast(config.precision, "cpu"):
        x0_hat = host.net(x, time, mask, text)
    if target is not None:
        with torch.no_grad(), autocast(config.precision, "cpu"):  # the target reads the prompt with its own encoder
            t_target = frame_times(target.net, tau, mask, config.conditional_sigma)
            x0 = target.net(x, t_target, mask, target.embed_prompts(used)).float()
    err = (x0_hat.float() - x0) / tb.clamp(min=config.tau_floor)
    return err.pow(2)[:, :, 1:].mean()


def _lr_factor(iteration: int, config: TeacherTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if iteration < config.warmup:
        return (iteration + 1) / config.warmup
    progress = (iteration - config.warmup) / max(1, config.iterations - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_teacher(path: Path, ema: ToyVideo2World, metadata: dict[str, str]) -> None:
    """EMA network and text encoder as one bf16 safetensors file (``net.*``, ``text_encoder.*``), atomically."""
    state = {f"net.{k}": v.to(torch.bfloat16) for k, v in ema.net.state_dict().items()}
    state |= {f"text_encoder.{k}": v.to(torch.bfloat16) for k, v in ema.text_encoder.state_dict().items()}
    write_atomic(path, lambda tmp: save_safetensors(plain_tensors(state, "toy teacher"), tmp, metadata))


def teacher_arch(path: str | Path) -> str:
    """The network of a teacher weights file (its metadata's config; files from before the option: ``unet``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    return config.get("arch", "unet")


def load_toy_teacher(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> ToyVideo2World:
    """The toy teacher host (its network, UNet or DiT as the file says, + text encoder, frozen conditioner) from
    ``path`` (default: the shipped UNet teacher; :data:`DIT_WEIGHTS` is the transformer teacher)."""
    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"toy teacher weights {path} not found: train them with `distill-mixins toy-teacher --out DIR` and pass "
            "DIR/toy_teacher.safetensors, or reinstall distill-mixins (the package ships them)."
        )
    state = load_file(str(path))
    arch = teacher_arch(path)
    if arch == "dit":  # the transformer takes per-frame times, as it trained: its causal host
        from distill_mixins.toy.causal_dit import ToyCausalVideo2World

        host: ToyVideo2World = ToyCausalVideo2World(make_network(arch), ToyTextEncoder())
    else:
        host = ToyVideo2World(make_network(arch), ToyTextEncoder())
    for prefix, module in (("net.", host.net), ("text_encoder.", host.text_encoder)):
        part = {k[len(prefix) :]: v.to(dtype) for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    host.text_encoder.requires_grad_(False).eval()
    return host.to(dtype)


def _start_from(host: ToyVideo2World, path: str, arch: str) -> None:
    """Load the teacher weights file ``path`` (network and text encoder) into ``host``; a ValueError when its arch is
    not ``arch``."""
    if teacher_arch(path) != arch:
        raise ValueError(f"TeacherTrainConfig.init_weights={path!r} holds a {teacher_arch(path)!r} teacher, not the "
                         f"arch={arch!r} being trained: pass --arch {teacher_arch(path)} or another file.")
    start = load_toy_teacher(path)
    host.net.load_state_dict(start.net.state_dict())
    host.text_encoder.load_state_dict(start.text_encoder.state_dict())
    logger.info("toy teacher: starting from {}", path)


@torch.no_grad()
def _update_ema(ema: ToyVideo2World, host: ToyVideo2World, beta: float) -> None:
    for p_ema, p in zip(ema.net.parameters(), host.net.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - beta)


def train_toy_teacher(out_dir: str | Path, config: TeacherTrainConfig, *, command: str = "") -> Path:
    """Train from scratch (or resume ``out_dir/train_state.pt``); writes ``out_dir/toy_teacher.safetensors``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ran = PrecisionReport.of(config.precision, "cpu")
    recorded = {**asdict(config), "precision_resolved": ran.resolved}  # what ran: auto resolved on this machine
    (out / "teacher_config.json").write_text(json.dumps(recorded, indent=2))
    torch.manual_seed(config.seed)
    host = ToyVideo2World(make_network(config.arch), ToyTextEncoder())
    if config.init_weights is not None:
        _start_from(host, config.init_weights, config.arch)
    host.text_encoder.requires_grad_(False)
    ema = copy.deepcopy(host).requires_grad_(False)
    opt = torch.optim.AdamW(host.net.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, config))
    start, elapsed = 0, 0.0
    state_path = out / "train_state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        host.load_state_dict(state["host"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, elapsed = int(state["iteration"]), float(state["elapsed_s"])
        logger.info("resuming the toy teacher at iteration {} ({:.0f} s so far)", start, elapsed)
        if state.get("precision", ran.resolved) != ran.resolved:
            logger.warning("resuming the toy teacher in {} but it trained in {} so far (no bit-exact resume); pass "
                           "--precision {} to keep it", ran.resolved, state["precision"], state["precision"])
    logger.info("toy teacher precision: {} (asked {}; {})", ran.resolved, ran.requested, ran.reason)
    beta = EMAConfig(halflife_steps=config.ema_halflife).beta(1)
    target = None
    if config.target_teacher is not None:
        target = load_toy_teacher(config.target_teacher).requires_grad_(False).eval()
        logger.info("toy teacher: regressing the denoiser of {} (denoiser distillation)", config.target_teacher)
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(start, config.iterations), desc="toy teacher", unit="it", initial=start, total=config.iterations)
    for iteration in bar:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
        clips = make_clips(config.batch_size, seed=int(torch.randint(2**62, (), generator=generator)))
        loss = teacher_loss(host, clips.video, clips.prompts, config, generator, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(host.net.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        _update_ema(ema, host, 0.0 if iteration < config.warmup else beta)
        if iteration % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = iteration + 1
        if done % config.save_every == 0 or done == config.iterations:
            state = {"host": host.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "iteration": done, "elapsed_s": time.perf_counter() - t0,
                     "precision": ran.resolved}
            write_atomic(state_path, partial(save_torch, state))
    seconds = time.perf_counter() - t0
    metadata = {"config": json.dumps(recorded), "command": command, "train_seconds": f"{seconds:.0f}"}
    path = out / ("toy_teacher.safetensors" if config.arch == "unet" else "toy_dit_teacher.safetensors")
    save_teacher(path, ema, metadata)
    logger.info("toy teacher written to {} after {} iterations, {:.0f} s of training", path, config.iterations, seconds)
    return path
