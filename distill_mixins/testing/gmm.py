"""A Gaussian-mixture data distribution with a closed-form denoiser.

Data: ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in ``D = C*T*H*W`` dimensions, shaped as tiny
videos (B, C, T, H, W). For a noisy state ``x = a x0 + b eps`` the exact posterior mean is

    E[x0 | x] = sum_k r_k(x) (mu_k + a s_k^2 / (a^2 s_k^2 + b^2) (x - a mu_k)),
    r_k(x) ∝ pi_k N(x; a mu_k, (a^2 s_k^2 + b^2) I).

The conditional variant has one weight vector per label; label -1 is unconditional
(the weights averaged over labels), so classifier-free guidance is testable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GaussianMixture:
    """Means (K, D), per-component stds (K,), weights (L, K) per label, and the video shape (C, T, H, W)."""

    means: Tensor
    stds: Tensor
    weights: Tensor
    shape: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        self.means = self.means.double()
        self.stds = self.stds.double()
        self.weights = self.weights.double()
        if self.weights.ndim == 1:
            self.weights = self.weights[None]
        self.weights = self.weights / self.weights.sum(dim=1, keepdim=True)
        k, d = self.means.shape
        if math.prod(self.shape) != d or self.stds.shape != (k,) or self.weights.shape[1] != k:
            raise ValueError(
                f"GaussianMixture: means {tuple(self.means.shape)}, stds {tuple(self.stds.shape)}, weights "
                f"{tuple(self.weights.shape)} and shape {self.shape} disagree."
            )

    @property
    def num_labels(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def label_weights(self, labels: Tensor) -> Tensor:
        """Mixture weights (B, K) for labels (B,); label -1 is the unconditional (label-averaged) mixture."""
        table = torch.cat([self.weights, self.weights.mean(dim=0, keepdim=True)])
        index = torch.where(labels < 0, torch.full_like(labels, self.num_labels), labels)
        return table.to(labels.device)[index]

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples (B, C, T, H, W) in float64 for labels (B,)."""
        w = self.label_weights(labels)
        k = torch.multinomial(w, 1, generator=generator).squeeze(1)
        eps = torch.randn(labels.shape[0], self.dim, dtype=torch.float64, generator=generator)
        x = self.means[k] + self.stds[k, None] * eps
        return x.reshape(-1, *self.shape)

    def posterior_mean(self, x: Tensor, a: Tensor, b: Tensor, labels: Tensor) -> Tensor:
        """E[x0 | a x0 + b eps = x] (B, C, T, H, W), float64; a, b of shape (B,)."""
        xf = x.double().reshape(x.shape[0], -1)
        a, b = a.double()[:, None], b.double()[:, None]
        var = a**2 * self.stds[None] ** 2 + b**2  # (B, K)
        diff = xf[:, None, :] - a[:, :, None] * self.means[None]  # (B, K, D)
        log_p = -0.5 * diff.pow(2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        r = torch.softmax(torch.log(self.label_weights(labels)) + log_p, dim=1)
        gain = a * self.stds[None] ** 2 / var  # (B, K)
        means = self.means[None] + gain[:, :, None] * diff
        return (r[:, :, None] * means).sum(1).reshape(x.shape)

    def nearest_mode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Index (B,) of the nearest mean and the Euclidean distance to it in units of that component's std."""
        d = torch.cdist(x.double().reshape(x.shape[0], -1), self.means)
        dist, k = d.min(dim=1)
        return k, dist / self.stds[k]


def ring_mixture(
    num_modes: int = 8, num_labels: int = 2, shape: tuple[int, int, int, int] = (2, 2, 1, 1),
    radius: float = 1.0, std: float = 0.1, favored: float = 4.0, seed: int = 0,
) -> GaussianMixture:
    """``num_modes`` modes on a circle in a random 2D plane of R^D; label y favors modes k with
    ``k % num_labels == y`` by a factor ``favored``."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    basis, _ = torch.linalg.qr(torch.randn(d, 2, dtype=torch.float64, generator=g))
    angle = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    ring = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    k = torch.arange(num_modes)
    weights = torch.stack([1.0 + (favored - 1.0) * (k % num_labels == y).double() for y in range(num_labels)])
    return GaussianMixture(ring @ basis.T, torch.full((num_modes,), std, dtype=torch.float64), weights, shape)
