"""Video metrics for generated toy clips against held-out real clips, in one call (docs/evaluation.md).

FD and the FD floor live in :mod:`distill_mixins.eval.fd`; tracking, prompt adherence, temporal consistency and
diversity in :mod:`distill_mixins.eval.motion`. Latency and network evaluations per clip are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import Tensor

from distill_mixins.eval.fd import (
    VideoFeatureNet,
    check_clips,
    fd_floor,
    frechet_distance,
    frechet_video_distance,
    video_features,
)
from distill_mixins.eval.motion import (
    between_speeds,
    diversity,
    motion_diversity,
    prompt_adherence,
    temporal_consistency,
    track,
)

__all__ = ["VideoMetrics", "evaluate_clips", "fd_floor", "frechet_video_distance"]


@dataclass
class VideoMetrics:
    """Metrics of a generated set: ``fd`` against the real reference (lower is better, read against ``fd_floor``,
    the FD of two real sets, None unless ``real_again`` was given); ``prompt_adherence`` and
    ``temporal_consistency`` in [0, 1] (real clips: 1.0 and ~0.98); ``diversity`` (pixel RMS, [0, 2]) and
    ``motion_diversity`` (px) between two generations of the same conditions (None without ``generated_again``);
    ``num_clips`` N; ``between_speeds``: the share of clips that miss the prompt by moving at a constant speed
    between the data's speeds (:func:`~distill_mixins.eval.motion.between_speeds`; real clips: 0)."""

    fd: float
    prompt_adherence: float
    temporal_consistency: float
    diversity: float | None
    motion_diversity: float | None
    fd_floor: float | None
    num_clips: int
    between_speeds: float

    def to_dict(self) -> dict[str, float | int | None]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def evaluate_clips(
    generated: Tensor,
    real_reference: Tensor,
    prompts: Sequence[str],
    *,
    net: VideoFeatureNet | None = None,
    generated_again: Tensor | None = None,
    real_again: Tensor | None = None,
) -> VideoMetrics:
    """All video metrics of ``generated`` (N, 3, T, H, W) made from ``prompts`` (N strings) and the conditions.

    ``real_reference`` (M, 3, T, H, W): held-out real clips for the FD (use >= 1,000 for both sets);
    ``generated_again``: a second generation from the same conditions with other noise (for diversity);
    ``real_again``: a second real set of ``real_reference``'s size, independent of it (for ``fd_floor``).
    """
    generated = check_clips(generated, "generated")
    real_reference = check_clips(real_reference, "real_reference")
    feats_real = video_features(real_reference, net=net)
    fd = frechet_distance(video_features(generated, net=net), feats_real)
    floor = None
    if real_again is not None:
        floor = frechet_distance(video_features(check_clips(real_again, "real_again"), net=net), feats_real)
    div = mdiv = None
    if generated_again is not None:
        div = diversity(generated, generated_again)
        mdiv = motion_diversity(generated, generated_again, prompts)
    tracks = track(generated, prompts)
    return VideoMetrics(
        fd=fd,
        prompt_adherence=prompt_adherence(generated, prompts, tracks=tracks),
        temporal_consistency=temporal_consistency(generated, prompts, tracks=tracks),
        diversity=div,
        motion_diversity=mdiv,
        fd_floor=floor,
        num_clips=generated.shape[0],
        between_speeds=between_speeds(generated, prompts, tracks=tracks),
    )

