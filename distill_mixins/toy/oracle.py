"""The toy domain's exact denoiser: the posterior mean of the clean clip given a noised one.

A toy condition (first frame + prompt) leaves a finite set of futures: the shape, colour and start are in the
given frame, the direction is in the prompt, and the speed is one of :data:`~distill_mixins.toy.clips.SPEEDS`
(2 futures); without the prompt (classifier-free guidance's unconditional branch) every direction is open too (8).
The data are these futures with equal probability, so for the rectified-flow state ``x = (1 - tau) x0 + tau eps``
(the first frame given)

    E[x0 | x] = sum_k w_k c_k,   w = softmax_k( -||x - (1 - tau) c_k||^2 / (2 tau^2) )

over the generated frames, exactly. Its ODE follows every prompt (adherence 1, tests/test_toy_oracle.py), and
``benchmarks/toy_speed_commitment.py`` measures a toy teacher's distance to it where a sample's speed is decided.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from distill_mixins.toy.clips import DIRECTIONS, SPEEDS, ClipSpec, render_specs
from distill_mixins.toy.host import ToyVideo2World


def futures(specs: Sequence[ClipSpec], *, conditional: bool = True) -> Tensor:
    """Latent clips (N, K, 3, T, H, W) in [0, 1] of every future each spec's condition allows: K = len(SPEEDS)
    speeds along the prompt's direction (``conditional``), or K = 4 x len(SPEEDS) when the prompt is dropped."""
    if not specs:
        raise ValueError("futures: give at least one ClipSpec (ToyClips.specs).")
    alternatives = [
        dataclasses.replace(spec, direction=direction, speed=speed)
        for spec in specs
        for direction in ([spec.direction] if conditional else list(DIRECTIONS))
        for speed in SPEEDS
    ]
    video = render_specs(alternatives)
    return ToyVideo2World.encode(video).view(len(specs), -1, *video.shape[1:])


def exact_x0(x: Tensor, tau: Tensor, futures: Tensor, *, given: int = 1) -> Tensor:
    """E[x0 | x] (N, C, T, H, W) for rectified-flow states x (N, C, T, H, W) at tau (N,) in (0, 1] whose first
    ``given`` frames are the condition, the data uniform over ``futures`` (N, K, C, T, H, W); computed in float64."""
    if futures.ndim != x.ndim + 1 or futures.shape[0] != x.shape[0] or futures.shape[2:] != x.shape[1:]:
        raise ValueError(f"exact_x0: futures {tuple(futures.shape)} must be (N, K) + x's {tuple(x.shape)[1:]} with "
                         f"N = {x.shape[0]}.")
    if tau.shape != (x.shape[0],) or not bool(((tau > 0) & (tau <= 1)).all()):
        raise ValueError(f"exact_x0: tau must be (N,) = ({x.shape[0]},) in (0, 1], got {tuple(tau.shape)}.")
    xd, cd, td = x.double(), futures.double(), tau.double()
    scale = (1.0 - td).view(-1, 1, 1, 1, 1, 1)
    distance = (xd[:, None, :, given:] - scale * cd[:, :, :, given:]).pow(2).flatten(2).sum(-1)  # (N, K)
    weights = torch.softmax(-distance / (2.0 * td[:, None] ** 2), dim=1)
    return torch.einsum("nk,nk...->n...", weights, cd).to(x.dtype)


def future_weights(x0: Tensor, futures: Tensor, *, given: int = 1) -> Tensor:
    """Each generated frame's weight on the first of two ``futures`` (N, 2, C, T, H, W), a and b: the least-squares
    ``w`` of ``x0_t = w a_t + (1 - w) b_t`` per frame t >= ``given`` of x0 predictions (N, C, T, H, W); (N, T - given),
    float64 (0 on a frame where the two futures coincide). The exact denoiser's weights are one number a clip (it
    weighs whole futures); a network that decides frame by frame spreads them (``benchmarks/toy_speed_commitment``)."""
    if futures.ndim != x0.ndim + 1 or futures.shape[1] != 2 or futures.shape[0] != x0.shape[0] or (
        futures.shape[2:] != x0.shape[1:]
    ):
        raise ValueError(f"future_weights: futures {tuple(futures.shape)} must be (N, 2) + x0's "
                         f"{tuple(x0.shape)[1:]} with N = {x0.shape[0]} (the conditional futures of two speeds).")
    a, b = futures[:, 0, :, given:].double(), futures[:, 1, :, given:].double()
    d, r = a - b, x0[:, :, given:].double() - b
    dims = (1, 3, 4)
    return (r * d).sum(dims) / (d * d).sum(dims).clamp(min=1e-12)
