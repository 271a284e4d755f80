"""Frechet distance on the features of a fixed, seeded 3D conv network (an FVD without downloaded weights).

The Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, "GANs trained by a two
time-scale update rule", FID; Unterthiner et al. 2018, "Towards accurate generative models of video", FVD):

    FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})

The features come from :class:`VideoFeatureNet`, a small random 3D conv network whose weights are drawn in code
from a fixed seed (uniform, float64 draws cast to float32), so they depend only on the seed and torch's CPU
Mersenne-Twister generator: every machine builds the same network and the same features up to float32 conv
rounding. FD is unconditional (it sees clips, not prompts): read direction errors off prompt adherence.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

FEATURE_SEED = 20240607
"""The default seed of :class:`VideoFeatureNet`'s weights."""


def check_clips(clips: Tensor, name: str = "clips") -> Tensor:
    """Return ``clips`` (N, 3, T, H, W) as float32 after checking the shape; raise ValueError naming ``name``."""
    if not isinstance(clips, Tensor):
        raise ValueError(f"{name} must be a Tensor (N, 3, T, H, W), got {type(clips).__name__}: pass ToyClips.video.")
    if clips.ndim != 5:
        raise ValueError(f"{name} must be 5-D (N, 3, T, H, W), got shape {tuple(clips.shape)}: add the missing "
                         "batch or time axis (a single clip is clips[None]).")
    if clips.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels on axis 1, got shape {tuple(clips.shape)}: decode "
                         "latents to RGB and put channels before time, (N, 3, T, H, W).")
    if clips.shape[0] < 1:
        raise ValueError(f"{name} is empty (shape {tuple(clips.shape)}): pass at least one clip.")
    return clips.float()


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    """``U(-bound, bound)`` float32 weights from float64 draws (bit-identical on every machine)."""
    return ((2.0 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1.0) * bound).float()


class VideoFeatureNet(nn.Module):
    """Fixed random 3D conv features of clips (N, 3, T, H, W) in [-1, 1] -> (N, D) float32, ``D = 2 * sum(widths)``
    (160 by default).

    Three ``Conv3d(k=3, pad=1)`` + ReLU layers of ``widths`` (16, 32, 32) channels and strides 1, 2, 2
    (8x32x32 -> 8x32x32 -> 4x16x16 -> 2x8x8). The first ``high_pass`` (12) kernels of layer 1 have zero mean, so
    they answer only to change in space or time (edges, motion, noise) and not to flat colour. Features: for every
    layer and channel, ``log(EPS + mean)`` and ``log(EPS + std)`` of the activation over (t, y, x); the log puts
    relative changes of every channel on one scale, so no single channel dominates the Frechet distance.
    Weights ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`` and biases ``U(-0.1, 0.1)`` are drawn from ``seed`` in float64
    on torch's CPU generator and never train. The features are nearly translation-invariant: where the shape is
    (and where it goes, given the prompt) is prompt adherence's job; how it moves (static, jumping) is seen here.
    """

    EPS = 1e-3

    def __init__(self, seed: int = FEATURE_SEED, widths: tuple[int, ...] = (16, 32, 32), high_pass: int = 12) -> None:
        super().__init__()
        if not 0 <= high_pass <= widths[0]:
            raise ValueError(f"VideoFeatureNet high_pass={high_pass} must be in [0, widths[0]={widths[0]}].")
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        cin = 3
        for i, cout in enumerate(widths):
            conv = nn.Conv3d(cin, cout, kernel_size=3, stride=1 if i == 0 else 2, padding=1)
            weight = _uniform(tuple(conv.weight.shape), math.sqrt(6.0 / (cin * 27)), g)
            if i == 0:
                weight[:high_pass] -= weight[:high_pass].mean(dim=(2, 3, 4), keepdim=True)
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias.copy_(_uniform((cout,), 0.1, g))
            conv.requires_grad_(False)
            self.convs.append(conv)
            cin = cout
        self.widths, self.seed, self.high_pass = tuple(widths), seed, high_pass

    @property
    def dim(self) -> int:
        """Feature dimension D = 2 * sum(widths)."""
        return 2 * sum(self.widths)

    def forward(self, clips: Tensor) -> Tensor:
        """Features (N, D) float32 of clips (N, 3, T, H, W)."""
        h, feats = clips, []
        for conv in self.convs:
            h = torch.relu(conv(h))
            flat = h.flatten(2)
            feats += [torch.log(self.EPS + flat.mean(2)), torch.log(self.EPS + flat.std(2, correction=0))]
        return torch.cat(feats, dim=1)


_DEFAULT_NET: dict[tuple[int, str], VideoFeatureNet] = {}


def default_feature_net(device: torch.device | str = "cpu") -> VideoFeatureNet:
    """The shared ``VideoFeatureNet()`` (default seed and widths) on ``device``, built once per device."""
    key = (FEATURE_SEED, str(torch.device(device)))
    if key not in _DEFAULT_NET:
        _DEFAULT_NET[key] = VideoFeatureNet().to(device)
    return _DEFAULT_NET[key]


def video_features(clips: Tensor, *, net: VideoFeatureNet | None = None, batch_size: int = 256) -> Tensor:
    """Features (N, D) float64 of clips (N, 3, T, H, W), computed under no_grad in batches of ``batch_size``.

    Values are clamped to [-1, 1] first (generated clips may overshoot); ``net`` defaults to
    :func:`default_feature_net` on the clips' device.
    """
    clips = check_clips(clips)
    if batch_size < 1:
        raise ValueError(f"video_features batch_size={batch_size} must be >= 1.")
    net = default_feature_net(clips.device) if net is None else net
    with torch.no_grad():
        out = [net(chunk.clamp(-1.0, 1.0)) for chunk in clips.split(batch_size)]
    return torch.cat(out).double()


def _check_feats(feats: Tensor, name: str) -> Tensor:
    if feats.ndim != 2:
        raise ValueError(f"{name} must be 2-D features (N, D), got shape {tuple(feats.shape)}: pass "
                         "video_features(clips), or frechet_video_distance for clips.")
    if feats.shape[0] < 2:
        raise ValueError(f"{name} has {feats.shape[0]} sample(s): a covariance needs at least 2 (use >= 1,000 "
                         "clips for a stable FD).")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} holds non-finite values (NaN/inf): check the clips for NaN before the metric.")
    return feats.double()


def _sqrtm_psd(mat: Tensor) -> Tensor:
    """Symmetric PSD square root via eigh (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * vals.clamp(min=0.0).sqrt()) @ vecs.T


def frechet_distance_gaussian(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Frechet (W2^2) distance between N(mu_a, cov_a) and N(mu_b, cov_b): means (D,), covariances (D, D).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` (Heusel et al. 2017),
    float64, eigh-based; tiny negative eigenvalues (rounding) are clamped to 0 and the result to >= 0.
    """
    mu_a, mu_b, cov_a, cov_b = (v.double() for v in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.shape[0],) * 2:
        raise ValueError(f"frechet_distance_gaussian needs means (D,) and covariances (D, D) of one D, got "
                         f"{tuple(mu_a.shape)}, {tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}.")
    cov_a, cov_b = 0.5 * (cov_a + cov_a.T), 0.5 * (cov_b + cov_b.T)
    root_a = _sqrtm_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp(min=0.0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross
    return max(float(fd), 0.0)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance (Heusel et al. 2017) between Gaussians fitted to features (N_a, D) and (N_b, D).

    Means and unbiased covariances in float64. Warns when N < D (rank-deficient covariance: the FD is then
    biased upwards and noisy; use more samples than feature dimensions, >= 1,000 clips for the default net).
    """
    fa, fb = _check_feats(feats_a, "feats_a"), _check_feats(feats_b, "feats_b")
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feats_a and feats_b have different feature dims {fa.shape[1]} and {fb.shape[1]}: "
                         "compute both with the same VideoFeatureNet.")
    n_min = min(fa.shape[0], fb.shape[0])
    if n_min <= fa.shape[1]:
        warnings.warn(f"frechet_distance: {n_min} samples <= {fa.shape[1]} feature dims, the covariance is "
                      "rank-deficient and the FD biased; use more samples (>= 1,000 clips).", stacklevel=2)
    return frechet_distance_gaussian(fa.mean(0), torch.cov(fa.T), fb.mean(0), torch.cov(fb.T))


def frechet_video_distance(
    clips_a: Tensor, clips_b: Tensor, net: VideoFeatureNet | None = None, *, batch_size: int = 256
) -> float:
    """FD (Unterthiner et al. 2018, FVD, with :class:`VideoFeatureNet` features) between clip sets (N, 3, T, H, W)."""
    fa = video_features(clips_a, net=net, batch_size=batch_size)
    fb = video_features(clips_b, net=net, batch_size=batch_size)
    return frechet_distance(fa, fb)


def fd_floor(real_a: Tensor, real_b: Tensor, net: VideoFeatureNet | None = None) -> float:
    """The FD between two independent real clip sets (N, 3, T, H, W) of the evaluation's size: the value a
    perfect generator would get (sampling noise); read a generated set's FD against it."""
    return frechet_video_distance(real_a, real_b, net)
