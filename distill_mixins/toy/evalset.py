"""The demo's held-out evaluation set, and the shipped teacher samples of it.

The held-out conditions are the first ``n`` of :data:`EVAL_POOL` clips drawn from :data:`EVAL_SEED`; clip ``i`` is
sampled from the ``i``-th noise of :func:`eval_noise` whatever the batch size. Every sampler's clips are evaluated
as 8-bit video (:func:`as_8bit`), the form a clip takes in a video file.

Sampling the 36-step CFG teacher on 1,024 held-out conditions is 73,728 network evaluations: about 8 minutes in
float32 on 2 CPU cores, more than the rest of the demo. The package therefore ships those samples (:data:`SAMPLES`,
8-bit, made by ``distill-mixins toy-teacher-samples`` in float32); the demo uses them only when the teacher's weights
and the sampler settings match their metadata, re-samples the first ``spot_check`` conditions in every run, checks
them against the shipped clips (:func:`spot_check`) and times the teacher on them.
"""

from __future__ import annotations

import json
import lzma
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor
from tqdm import tqdm

from distill_mixins.checkpointer.files import sha256_file, write_atomic
from distill_mixins.precision import autocast
from distill_mixins.toy.clips import ToyClips, make_clips

EVAL_SEED, REFERENCE_SEED = 1_000_001, 2_000_002
"""Seeds of the held-out conditions and of the held-out real reference clips."""
NOISE_SEED, AGAIN_SEED = 7, 8
"""Seeds of the sampling noise of the held-out conditions, and of the second noise (diversity)."""
EVAL_POOL = 1024
"""Held-out conditions drawn from :data:`EVAL_SEED`; a run evaluates the first ``eval_clips`` (more: a larger pool)."""
SAMPLES = Path(__file__).parent / "weights" / "toy_teacher_eval.safetensors.xz"
"""The shipped teacher samples (8-bit clips in an xz-compressed safetensors file)."""

Sampler = Callable[[Any, Any, Tensor], Tensor]
"""``(condition, uncondition, noise) -> latent x0`` (B, C, T, H, W)."""


def held_out(n: int) -> ToyClips:
    """The first ``n`` held-out conditions (clips (n, 3, T, H, W) and prompts)."""
    return make_clips(max(n, EVAL_POOL), EVAL_SEED).head(n)


def eval_noise(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """Noise (n, *shape) of the held-out conditions: row ``i`` is the same for every ``n > i``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(1, *shape, generator=generator) for _ in range(n)])


def as_8bit(clips: Tensor) -> Tensor:
    """RGB clips in [-1, 1] (N, 3, T, H, W) -> uint8 (clamped, rounded): the clip as a video file holds it."""
    return ((clips.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_8bit(clips: Tensor) -> Tensor:
    """uint8 clips -> float32 RGB in [-1, 1]."""
    return clips.float() / 127.5 - 1.0


@dataclass
class HeldOutSet:
    """What every sampler is scored on: the first ``n`` held-out conditions (``clips``), ``n`` held-out real clips
    (``reference``), the FD feature network and the real-vs-real FD floor, each condition's sampling noise (n, C, T,
    H, W) and the second noise of the first ``again`` (diversity)."""

    clips: ToyClips
    reference: Tensor
    feature_net: Any
    fd_floor: float
    noise: Tensor
    again_noise: Tensor


def held_out_set(n: int, again: int) -> HeldOutSet:
    """The :class:`HeldOutSet` of ``n`` conditions, ``again`` of them with a second noise."""
    from distill_mixins.eval.video import VideoFeatureNet, frechet_video_distance

    held = held_out(n)
    reference = make_clips(n, REFERENCE_SEED)
    net = VideoFeatureNet()
    floor = frechet_video_distance(held.video, reference.video, net=net)
    shape = tuple(held.video.shape[1:])
    return HeldOutSet(held, reference.video, net, floor, eval_noise(n, shape, NOISE_SEED),
                      eval_noise(again, shape, AGAIN_SEED))


@dataclass
class SamplerRun:
    """8-bit clips (N, 3, T, H, W) of one sampler, as floats in [-1, 1], and its sampling seconds per clip."""

    clips: Tensor
    latency_s_per_clip: float


@torch.no_grad()
def run_sampler(
    model: Any, sampler: Sampler, clips: ToyClips, noise: Tensor, *, batch: int, precision: str, desc: str
) -> SamplerRun:
    """Sample every condition (first frame + prompt) of ``clips`` from ``noise`` (N, C, T, H, W) in batches of
    ``batch`` under ``precision``; the clock counts the sampler only (conditions are prepared before it starts)."""
    outs, seconds = [], 0.0
    for start in tqdm(range(0, len(clips), batch), desc=desc, unit="batch", leave=False):
        stop = start + batch
        _, condition, uncondition = model.get_data_and_condition(
            {"clip": clips.video[start:stop], "prompt": clips.prompts[start:stop]}
        )
        tic = time.perf_counter()
        with autocast(precision):
            latent = sampler(condition, uncondition, noise[start:stop])
        seconds += time.perf_counter() - tic
        outs.append(from_8bit(as_8bit(model.decode(latent.float()))))
    return SamplerRun(torch.cat(outs), seconds / len(clips))


def teacher_sampler(model: Any, steps: int, guidance: float) -> Sampler:
    """The teacher's DDIM sampler with ``steps`` steps and CFG scale ``guidance`` (2 evaluations a step)."""
    return lambda c, u, noise: model.generate_teacher(
        c, noise, uncondition=u, guidance=guidance, steps=steps, sampler="ddim"
    )


# ------------------------------------------------------------------------------ the shipped teacher samples


@dataclass(frozen=True)
class SampleSettings:
    """What the shipped samples depend on besides the clips: the teacher's weights file and the sampler."""

    teacher_sha256: str
    steps: int
    guidance: float
    sampler: str = "ddim"
    eval_seed: int = EVAL_SEED
    noise_seed: int = NOISE_SEED
    again_seed: int = AGAIN_SEED


@dataclass
class TeacherSamples:
    """The teacher's clips of the first ``N`` held-out conditions (N, 3, T, H, W) and of the first ``K`` with the
    second noise (K, ...), as floats in [-1, 1] from 8 bits, and the settings that made them."""

    clips: Tensor
    again: Tensor
    settings: SampleSettings
    metadata: dict[str, str]


def make_teacher_samples(
    model: Any, settings: SampleSettings, *, clips: int = EVAL_POOL, again: int = 256, batch: int = 64
) -> TeacherSamples:
    """Sample the teacher of ``model`` (a composed toy model) on the held-out conditions in float32."""
    conditions = held_out(clips)
    shape = tuple(conditions.video.shape[1:])
    sampler = teacher_sampler(model, settings.steps, settings.guidance)
    tic = time.perf_counter()
    first = run_sampler(model, sampler, conditions, eval_noise(clips, shape, settings.noise_seed), batch=batch,
                        precision="fp32", desc="teacher samples")
    second = run_sampler(model, sampler, conditions.head(again), eval_noise(again, shape, settings.again_seed),
                         batch=batch, precision="fp32", desc="teacher samples (2nd noise)")
    seconds = time.perf_counter() - tic
    metadata = {"settings": json.dumps(asdict(settings)), "precision": "fp32", "seconds": f"{seconds:.0f}",
                "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}
    return TeacherSamples(first.clips, second.clips, settings, metadata)


def write_teacher_samples(path: str | Path, samples: TeacherSamples) -> Path:
    """``path``: the 8-bit clips in a safetensors file, xz-compressed, written atomically."""
    path = Path(path)
    tensors = {"clips": as_8bit(samples.clips).contiguous(), "again": as_8bit(samples.again).contiguous()}
    data = lzma.compress(save_safetensors_bytes(tensors, metadata=samples.metadata), preset=9)
    write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


def load_teacher_samples(path: str | Path = SAMPLES) -> TeacherSamples:
    """The samples written by :func:`write_teacher_samples`."""
    raw = lzma.decompress(Path(path).read_bytes())
    tensors = load_safetensors_bytes(raw)
    header_len = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    settings = SampleSettings(**json.loads(metadata["settings"]))
    return TeacherSamples(from_8bit(tensors["clips"]), from_8bit(tensors["again"]), settings, metadata)


def teacher_samples_file(weights: str | Path) -> Path:
    """The samples file of a teacher weights file: ``<stem>_eval.safetensors.xz`` beside it (the shipped UNet
    teacher's is :data:`SAMPLES`)."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}_eval.safetensors.xz")


def usable_samples(
    settings: SampleSettings, clips: int, again: int, path: str | Path = SAMPLES
) -> TeacherSamples | None:
    """The shipped samples when they match ``settings`` and hold at least ``clips`` and ``again`` clips; else None
    (logged with the reason: the demo then samples the teacher itself, which is slow)."""
    path = Path(path)
    if not path.is_file():
        logger.warning("no shipped teacher samples at {}: sampling the teacher on every held-out condition", path)
        return None
    samples = load_teacher_samples(path)
    if samples.settings != settings:
        logger.warning("the shipped teacher samples were made with {}, this run uses {}: sampling the teacher on every "
                       "held-out condition (slow)", samples.settings, settings)
        return None
    if len(samples.clips) < clips or len(samples.again) < again:
        logger.warning("the shipped teacher samples hold {} + {} clips, this run evaluates {} + {}: sampling the "
                       "teacher on every held-out condition", len(samples.clips), len(samples.again), clips, again)
        return None
    return samples


@dataclass
class SpotCheck:
    """Fresh teacher clips against the shipped ones on the first ``clips`` conditions: the mean and the largest
    per-clip mean absolute difference (RGB in [-1, 1]; one 8-bit level is 0.0078), and the share of clips whose
    difference is under ``tolerance``."""

    clips: int
    mean_abs: float
    max_abs: float
    share_within: float
    tolerance: float

    @property
    def ok(self) -> bool:
        """At least 90% of the re-sampled clips within the tolerance."""
        return self.share_within >= 0.9


def spot_check(fresh: Tensor, shipped: Tensor, tolerance: float = 0.02) -> SpotCheck:
    """Compare freshly sampled clips with the shipped ones (both (K, 3, T, H, W))."""
    per_clip = (fresh - shipped).abs().flatten(1).mean(1)
    return SpotCheck(len(fresh), float(per_clip.mean()), float(per_clip.max()),
                     float((per_clip <= tolerance).float().mean()), tolerance)


def spot_checked(
    model: Any, sampler: Sampler, shipped: TeacherSamples, held: HeldOutSet, *, spot: int, batch: int, precision: str,
    remedy: str,
) -> tuple[SamplerRun, SpotCheck]:
    """Re-sample the first ``spot`` held-out conditions with the teacher's ``sampler`` (which also times it) and
    compare them with the shipped clips; raises a RuntimeError ending with ``remedy`` when they disagree."""
    s = min(spot, len(held.clips))
    fresh = run_sampler(model, sampler, held.clips.head(s), held.noise[:s], batch=batch, precision=precision,
                        desc="teacher (spot check)")
    check = spot_check(fresh.clips, shipped.clips[:s])
    logger.info("teacher spot check: {}", check)
    if not check.ok:
        raise RuntimeError(f"the shipped teacher samples disagree with this teacher's fresh samples ({check}): "
                           f"{remedy}")
    return fresh, check


def teacher_settings(weights: str | Path, steps: int, guidance: float) -> SampleSettings:
    """The settings of a teacher loaded from ``weights`` sampled with ``steps`` DDIM steps at CFG ``guidance``."""
    return SampleSettings(teacher_sha256=sha256_file(Path(weights)), steps=steps, guidance=float(guidance))
