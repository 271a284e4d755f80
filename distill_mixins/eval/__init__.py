"""Evaluation: distribution metrics, the visual sample grid and the toy-video metrics (docs/evaluation.md)."""

from distill_mixins.eval.fd import (
    VideoFeatureNet,
    default_feature_net,
    fd_floor,
    frechet_distance,
    frechet_distance_gaussian,
    frechet_video_distance,
    video_features,
)
from distill_mixins.eval.metrics import sliced_wasserstein2
from distill_mixins.eval.motion import (
    Adherence,
    DiversityStats,
    Tracks,
    between_speeds,
    diversity,
    diversity_stats,
    motion_diversity,
    prompt_adherence,
    prompt_adherence_per_clip,
    temporal_consistency,
    temporal_consistency_per_clip,
    track,
)
from distill_mixins.eval.video import VideoMetrics, evaluate_clips
from distill_mixins.eval.visual import VisualPaths, clip_animation, sample_grid, write_gif, write_training_visual

__all__ = ["sliced_wasserstein2"]
__all__ += ["VisualPaths", "clip_animation", "sample_grid", "write_gif", "write_training_visual"]
__all__ += ["VideoFeatureNet", "default_feature_net", "fd_floor", "frechet_distance", "frechet_distance_gaussian",
            "frechet_video_distance", "video_features"]
__all__ += ["Adherence", "DiversityStats", "Tracks", "between_speeds", "diversity", "diversity_stats",
            "motion_diversity", "prompt_adherence", "prompt_adherence_per_clip",
            "temporal_consistency", "temporal_consistency_per_clip", "track"]
__all__ += ["VideoMetrics", "evaluate_clips"]
