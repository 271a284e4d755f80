"""Shape tracking on toy clips and the metrics built on it: prompt adherence, temporal consistency, diversity.

The prompt names the shape's colour, so every frame is segmented by colour: a pixel's membership is
``a = clamp(1 - |x - c| / |c - b|, 0, 1)`` (``c`` the prompt's colour, ``b`` the black background; ``a`` equals the
rendered coverage on clean clips), sharpened with a dead zone, ``w = clamp((a - 0.25) / 0.5, 0, 1)``, so that
noise of std up to ~0.2 and other colours count for (almost) nothing. The centre of a frame is the ``w``-weighted
centroid (pixel centres at ``i + 0.5``, as :func:`distill_mixins.toy.clips.render` draws them), refined once within
``2 * RADIUS + 1`` px of the first estimate; a frame with less than :data:`MIN_AREA` px of membership has no centre
(NaN) and fails every test that needs one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distill_mixins.eval.fd import check_clips
from distill_mixins.toy.clips import BACKGROUND, COLORS, DIRECTIONS, RADIUS, SPEEDS, parse_prompt, trajectory

DEAD_ZONE = 0.25
"""Membership below this (and above 1 - this) saturates to 0 (1)."""
MIN_AREA = 4.0
"""Frames whose total membership (px) is below this have no tracked shape."""
WINDOW = 2 * RADIUS + 1
"""Half-size (px) of the box around the first centroid estimate used by the refined centroid."""


@dataclass
class Tracks:
    """Tracked shape per frame: ``centers`` (N, T, 2) (x, y) px, NaN where no shape; ``areas`` (N, T) px;
    ``weights`` (N, T, H, W) membership in [0, 1]; ``masks`` (N, T, H, W) bool, ``weights > 0.5``."""

    centers: Tensor
    areas: Tensor
    weights: Tensor
    masks: Tensor


@dataclass
class Adherence:
    """Per-clip prompt adherence: ``ok`` (N,) bool; ``error`` (N,) float64, the largest per-axis deviation (px) over
    all frames from the best-speed bouncing trajectory (inf if a frame has no shape); ``speed`` (N,) that speed."""

    ok: Tensor
    error: Tensor
    speed: Tensor


def _prompts(prompts: Sequence[str], n: int, name: str = "prompts") -> list[tuple[str, str, str]]:
    if isinstance(prompts, str):
        raise ValueError(f"{name} must be a list of prompts (one per clip), got one string: wrap it in a list.")
    if len(prompts) != n:
        raise ValueError(f"{name} has {len(prompts)} prompts for {n} clips: pass exactly one prompt per clip.")
    return [parse_prompt(p) for p in prompts]


def membership(clips: Tensor, prompts: Sequence[str]) -> Tensor:
    """Membership (N, T, H, W) in [0, 1] of every pixel of clips (N, 3, T, H, W) in its prompt's colour."""
    clips = check_clips(clips)
    parsed = _prompts(prompts, clips.shape[0])
    color = torch.tensor([COLORS[c] for c, _, _ in parsed], dtype=clips.dtype, device=clips.device)
    span = (color - BACKGROUND).norm(dim=1)  # (N,)
    diff = clips.clamp(-1.0, 1.0) - color[:, :, None, None, None]
    dist = (diff[:, 0] ** 2 + diff[:, 1] ** 2 + diff[:, 2] ** 2).sqrt()  # (N, T, H, W); norm(dim=1) is slow on CPU
    a = torch.nan_to_num((1.0 - dist / span[:, None, None, None]).clamp(0.0, 1.0), nan=0.0)  # NaN pixel: not shape
    return ((a - DEAD_ZONE) / (1.0 - 2.0 * DEAD_ZONE)).clamp(0.0, 1.0)


def _centroid(w: Tensor, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted centroids (N, T, 2) float64 and total weights (N, T) of maps w (N, T, H, W), from the marginals."""
    col, row = w.sum(dim=2).double(), w.sum(dim=3).double()  # (N, T, W), (N, T, H)
    area = col.sum(dim=-1)
    safe = area.clamp(min=1e-12)
    return torch.stack([(col @ xs) / safe, (row @ ys) / safe], dim=-1), area


def track(clips: Tensor, prompts: Sequence[str]) -> Tracks:
    """Track the prompt-coloured shape in every frame of clips (N, 3, T, H, W) given prompts (N strings)."""
    w = membership(clips, prompts)
    h, wd = w.shape[-2:]
    xs = torch.arange(wd, dtype=torch.float64, device=w.device) + 0.5
    ys = torch.arange(h, dtype=torch.float64, device=w.device) + 0.5
    first, area = _centroid(w, xs, ys)
    near_x = ((xs - first[..., 0, None]).abs() <= WINDOW).to(w.dtype)  # (N, T, W)
    near_y = ((ys - first[..., 1, None]).abs() <= WINDOW).to(w.dtype)  # (N, T, H)
    centers, near_area = _centroid(w * near_y[..., :, None] * near_x[..., None, :], xs, ys)
    centers = torch.where((near_area >= MIN_AREA)[..., None], centers, torch.full_like(centers, float("nan")))
    return Tracks(centers=centers, areas=area, weights=w, masks=w > 0.5)


def speed_errors(
    clips: Tensor, prompts: Sequence[str], speeds: Sequence[float], tracks: Tracks | None = None
) -> Tensor:
    """(len(speeds), N) float64: per speed and clip, the largest per-axis deviation (px, inf where a frame has no
    shape) of the tracked centres from the bouncing trajectory at that speed in the prompt's direction that starts at
    frame 0's tracked centre."""
    clips = check_clips(clips)
    n, _, t, h, wd = clips.shape
    if h != wd:
        raise ValueError(f"prompt adherence needs square frames (the toy trajectory bounces in a square), got "
                         f"H={h}, W={wd}: pass toy clips (N, 3, T, S, S).")
    step = torch.tensor([DIRECTIONS[d] for _, _, d in _prompts(prompts, n)], dtype=torch.float64)
    centers = (track(clips, prompts) if tracks is None else tracks).centers.cpu()
    start = centers[:, 0].clamp(RADIUS, wd - RADIUS)  # NaN stays NaN
    errors = []
    for speed in speeds:
        expected = trajectory(start, step, torch.full((n,), float(speed), dtype=torch.float64), t, wd, RADIUS)
        err = (centers - expected).abs().amax(dim=(1, 2))
        errors.append(torch.nan_to_num(err, nan=float("inf")))
    return torch.stack(errors)


def prompt_adherence_per_clip(
    clips: Tensor, prompts: Sequence[str], *, tolerance: float = 1.5, tracks: Tracks | None = None
) -> Adherence:
    """Per clip: do the tracked centres (all T frames) stay within ``tolerance`` px, on both axes, of the bouncing
    trajectory (:func:`distill_mixins.toy.clips.trajectory`) that starts at frame 0's tracked centre and moves in
    the prompt's direction at the best speed in :data:`SPEEDS`? Clips (N, 3, T, H, W) with square frames;
    ``tracks``: ``track(clips, prompts)`` if already computed."""
    error, best = speed_errors(clips, prompts, SPEEDS, tracks).min(dim=0)
    speed = torch.tensor(SPEEDS, dtype=torch.float64)[best]
    return Adherence(ok=error <= tolerance, error=error, speed=speed)


def between_speeds(
    clips: Tensor, prompts: Sequence[str], *, tolerance: float = 1.5, tracks: Tracks | None = None,
    resolution: float = 0.05,
) -> float:
    """Fraction in [0, 1] of clips (N, 3, T, H, W) that miss prompt adherence (no speed of :data:`SPEEDS` fits
    within ``tolerance`` px) but follow the prompt's direction at a constant speed strictly between the slowest and
    the fastest of them (one on a grid of ``resolution`` px/frame fits): the blend of two speeds a one-step
    generator draws where its noise -> speed map is smooth. Real toy clips score 0."""
    low, high = min(SPEEDS), max(SPEEDS)
    steps = round((high - low) / resolution)
    grid = [low + k * (high - low) / steps for k in range(1, steps)]
    if not grid:
        raise ValueError(f"between_speeds: resolution={resolution} leaves no speed strictly between {low} and {high}.")
    errors = speed_errors(clips, prompts, [*SPEEDS, *grid], tracks)
    adheres = errors[: len(SPEEDS)].min(dim=0).values <= tolerance  # prompt_adherence_per_clip's test
    between = errors[len(SPEEDS) :].min(dim=0).values <= tolerance
    return float((between & ~adheres).double().mean())


def prompt_adherence(
    clips: Tensor, prompts: Sequence[str], *, tolerance: float = 1.5, tracks: Tracks | None = None
) -> float:
    """Fraction in [0, 1] of clips (N, 3, T, H, W) whose tracked motion matches the prompt
    (:func:`prompt_adherence_per_clip`); real toy clips score 1.0."""
    return float(prompt_adherence_per_clip(clips, prompts, tolerance=tolerance, tracks=tracks).ok.double().mean())


def _shift(maps: Tensor, offset: Tensor) -> Tensor:
    """Maps (M, H, W) translated by ``offset`` (M, 2) px (x, y), bilinear, zero outside."""
    m, h, w = maps.shape
    xs = torch.arange(w, dtype=offset.dtype, device=maps.device) + 0.5
    ys = torch.arange(h, dtype=offset.dtype, device=maps.device) + 0.5
    gx = 2.0 * (xs[None, None, :] - offset[:, 0, None, None]) / w - 1.0  # (M, 1, W)
    gy = 2.0 * (ys[None, :, None] - offset[:, 1, None, None]) / h - 1.0  # (M, H, 1)
    grid = torch.stack([gx.expand(m, h, w), gy.expand(m, h, w)], dim=-1).to(maps.dtype)
    return torch.nn.functional.grid_sample(maps[:, None], grid, mode="bilinear", align_corners=False)[:, 0]


def temporal_consistency_per_clip(clips: Tensor, prompts: Sequence[str], *, tracks: Tracks | None = None) -> Tensor:
    """Per-clip shape consistency (N,) float64 in [0, 1] of clips (N, 3, T, H, W), T >= 2.

    The mean over frames t >= 1 of the soft IoU ``sum min(w_t, s_t) / sum max(w_t, s_t)`` between frame t's
    membership ``w_t`` and frame 0's membership ``s_t`` translated (bilinear) from frame 0's centre to frame t's;
    a frame without a shape (or a clip whose frame 0 has none) scores 0 there. ``tracks``: ``track(clips, prompts)``
    if already computed.
    """
    clips = check_clips(clips)
    n, _, t, h, w = clips.shape
    if t < 2:
        raise ValueError(f"temporal consistency needs clips with T >= 2 frames, got shape {tuple(clips.shape)}.")
    tr = track(clips, prompts) if tracks is None else tracks
    offset = (tr.centers[:, 1:] - tr.centers[:, :1]).reshape(-1, 2)  # (N * (T - 1), 2)
    valid = torch.isfinite(offset).all(dim=1)
    ref = tr.weights[:, :1].expand(n, t - 1, h, w).reshape(-1, h, w)
    moved = _shift(ref, torch.nan_to_num(offset, nan=0.0)).double()
    cur = tr.weights[:, 1:].reshape(-1, h, w).double()
    inter = torch.minimum(cur, moved).sum(dim=(1, 2))
    union = torch.maximum(cur, moved).sum(dim=(1, 2)).clamp(min=1e-12)
    iou = torch.where(valid, inter / union, torch.zeros_like(inter))
    return iou.view(n, t - 1).mean(dim=1)


def temporal_consistency(clips: Tensor, prompts: Sequence[str], *, tracks: Tracks | None = None) -> float:
    """Mean over clips (N, 3, T, H, W) of :func:`temporal_consistency_per_clip`, in [0, 1]; real clips ~0.98."""
    return float(temporal_consistency_per_clip(clips, prompts, tracks=tracks).mean())


def _check_pair(clips_a: Tensor, clips_b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = check_clips(clips_a, "clips_a"), check_clips(clips_b, "clips_b")
    if a.shape != b.shape:
        raise ValueError(f"clips_a and clips_b must have one shape (two samples per condition, paired by index), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[2] < 2:
        raise ValueError(f"diversity needs clips with T >= 2 frames, got shape {tuple(a.shape)}.")
    return a, b


def _per_condition_rms(a: Tensor, b: Tensor) -> Tensor:
    """(N,) float64 RMS pixel difference over frames t >= 1 of checked pairs (N, 3, T, H, W), clamped to [-1, 1]."""
    diff = a[:, :, 1:].clamp(-1.0, 1.0) - b[:, :, 1:].clamp(-1.0, 1.0)
    return diff.pow(2).flatten(1).mean(dim=1).double().sqrt()


def diversity(clips_a: Tensor, clips_b: Tensor) -> float:
    """Mean over clips of the RMS pixel difference over frames t >= 1 between two sample sets (N, 3, T, H, W)
    generated from the same conditions (clip i of both from condition i) with different noise.

    ``mean_i sqrt(mean_{c, t>=1, y, x} (a_i - b_i)^2)`` on values clamped to [-1, 1]; 0 for a deterministic
    generator. Noise raises it too: read it next to FD and temporal consistency.
    """
    return float(_per_condition_rms(*_check_pair(clips_a, clips_b)).mean())


@dataclass
class DiversityStats:
    """Diversity of two samples per condition, with its uncertainty: ``mean`` and ``stderr`` (standard error over
    the ``conditions``) of the per-condition RMS pixel difference (:func:`diversity`); ``speed_split``: the share of
    the ``speed_conditions`` conditions where both samples follow the prompt (:func:`prompt_adherence_per_clip`)
    whose two samples move at different speeds (the speed is not in the prompt: a generator that keeps the data's
    spread splits about half of them, a collapsed one none; NaN when no condition qualifies)."""

    mean: float
    stderr: float
    conditions: int
    speed_split: float
    speed_conditions: int


def diversity_stats(clips_a: Tensor, clips_b: Tensor, prompts: Sequence[str]) -> DiversityStats:
    """:class:`DiversityStats` of two sample sets (N, 3, T, H, W) of the same N conditions (clip i of both from
    condition i, with ``prompts[i]``) drawn with different noise."""
    a, b = _check_pair(clips_a, clips_b)
    per_condition = _per_condition_rms(a, b)
    n = per_condition.numel()
    stderr = float(per_condition.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
    first, second = prompt_adherence_per_clip(a, prompts), prompt_adherence_per_clip(b, prompts)
    both = first.ok & second.ok
    split = (first.speed != second.speed)[both]
    return DiversityStats(
        mean=float(per_condition.mean()), stderr=stderr, conditions=n,
        speed_split=float(split.double().mean()) if split.numel() else float("nan"), speed_conditions=int(both.sum()),
    )


def motion_diversity(clips_a: Tensor, clips_b: Tensor, prompts: Sequence[str]) -> float:
    """Mean over clips of the RMS distance (px) over frames t >= 1 between the tracked centres of two sample sets
    (N, 3, T, H, W) from the same conditions (``prompts``, N strings); insensitive to pixel noise. Clips where a
    frame has no shape are left out (NaN if none is left)."""
    a, b = _check_pair(clips_a, clips_b)
    ca, cb = track(a, prompts).centers[:, 1:], track(b, prompts).centers[:, 1:]
    rms = (ca - cb).pow(2).sum(dim=-1).mean(dim=1).sqrt()
    rms = rms[torch.isfinite(rms)]
    return float(rms.mean()) if rms.numel() else float("nan")
