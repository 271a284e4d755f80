"""Procedural toy Video2World clips: one coloured shape moving with a direction and a speed, bouncing off walls.

A clip is ``(3, T, H, W)`` RGB in ``[-1, 1]`` on a black background (default 8 frames of 32x32). Its prompt
names what the first frame cannot show, the direction, together with the colour and the shape:
``"red square moving left"``. The speed (pixels per frame, one of :data:`SPEEDS`) is not in the prompt, so a
condition (first frame + prompt) has several futures: a generator must pick one, and averaging them (what
a 1-step teacher does) smears the shape.

Motion: the shape's centre moves by ``speed`` pixels a frame along the direction and is reflected at the
walls so that the whole shape stays inside (:func:`trajectory`, shared with the prompt-adherence metric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FRAMES = 8
SIZE = 32
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
SHAPES = ("square", "circle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}
"""direction -> unit step (dx, dy) in image coordinates (y grows downwards)."""
SPEEDS = (2.0, 3.0)
RADIUS = 4.0
"""Half the side of a square, the radius of a circle (pixels)."""
BACKGROUND = -1.0


@dataclass(frozen=True)
class ClipSpec:
    """What one clip shows: colour, shape, direction, speed (px/frame) and the first frame's centre (x, y)."""

    color: str
    shape: str
    direction: str
    speed: float
    start: tuple[float, float]

    @property
    def prompt(self) -> str:
        """The clip's text condition, e.g. ``"red square moving left"``."""
        return make_prompt(self.color, self.shape, self.direction)


def make_prompt(color: str, shape: str, direction: str) -> str:
    """``"<color> <shape> moving <direction>"``."""
    return f"{color} {shape} moving {direction}"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """``(color, shape, direction)`` of a prompt made by :func:`make_prompt`; raises ValueError otherwise."""
    words = prompt.split()
    if len(words) != 4 or words[2] != "moving" or words[0] not in COLORS or words[1] not in SHAPES or (
        words[3] not in DIRECTIONS
    ):
        raise ValueError(
            f"prompt {prompt!r} is not a toy prompt: use '<color> <shape> moving <direction>' with color in "
            f"{', '.join(COLORS)}, shape in {', '.join(SHAPES)}, direction in {', '.join(DIRECTIONS)}."
        )
    return words[0], words[1], words[3]


def all_prompts() -> list[str]:
    """Every toy prompt (colours x shapes x directions), in a fixed order."""
    return [make_prompt(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def reflect(p: Tensor, low: float, high: float) -> Tensor:
    """Positions ``p`` folded into ``[low, high]`` by reflection at both ends (a bouncing point)."""
    span = high - low
    q = torch.remainder(p - low, 2 * span)
    return low + torch.where(q > span, 2 * span - q, q)


def trajectory(
    start: Tensor, step: Tensor, speed: Tensor, frames: int = FRAMES, size: int = SIZE, radius: float = RADIUS
) -> Tensor:
    """Centres (N, frames, 2) of shapes starting at ``start`` (N, 2), moving by ``speed`` (N,) px/frame along
    the unit ``step`` (N, 2), reflected at the walls so the shape stays inside ``[radius, size - radius]``."""
    k = torch.arange(frames, dtype=start.dtype, device=start.device)
    free = start[:, None, :] + (speed[:, None, None] * k[None, :, None]) * step[:, None, :]
    return reflect(free, radius, size - radius)


def render(
    centers: Tensor, shapes: Tensor, colors: Tensor, size: int = SIZE, radius: float = RADIUS
) -> Tensor:
    """Clips (N, 3, T, H, W) in [-1, 1]: shapes (N,) (0 square, 1 circle) of colours (N, 3) at ``centers``
    (N, T, 2), with a one-pixel anti-aliased edge (coverage from the signed distance)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, None, :] - centers[..., 0, None, None].float()  # (N, T, 1, W)
    dy = coords[None, None, :, None] - centers[..., 1, None, None].float()  # (N, T, H, 1)
    box = torch.maximum(dx.abs(), dy.abs())
    disc = torch.sqrt(dx * dx + dy * dy)
    sdf = torch.where(shapes[:, None, None, None].bool(), disc, box) - radius
    alpha = (0.5 - sdf).clamp(0.0, 1.0)  # (N, T, H, W)
    color = colors.float()[:, :, None, None, None]
    return BACKGROUND + alpha[:, None] * (color - BACKGROUND)


@dataclass
class ToyClips:
    """A set of toy clips: ``video`` (N, 3, T, H, W) in [-1, 1], their ``prompts`` and ``specs``."""

    video: Tensor
    prompts: list[str]
    specs: list[ClipSpec]

    def __len__(self) -> int:
        return self.video.shape[0]

    def head(self, n: int) -> ToyClips:
        """The first ``n`` clips."""
        return ToyClips(self.video[:n], self.prompts[:n], self.specs[:n])


def sample_specs(n: int, generator: torch.Generator, size: int = SIZE, radius: float = RADIUS) -> list[ClipSpec]:
    """``n`` random clip specs: uniform colour, shape, direction and speed, start anywhere the shape fits."""
    color = torch.randint(len(COLORS), (n,), generator=generator).tolist()
    shape = torch.randint(len(SHAPES), (n,), generator=generator).tolist()
    direction = torch.randint(len(DIRECTIONS), (n,), generator=generator).tolist()
    speed = torch.randint(len(SPEEDS), (n,), generator=generator).tolist()
    start = radius + (size - 2 * radius) * torch.rand(n, 2, generator=generator, dtype=torch.float64)
    colors, directions = list(COLORS), list(DIRECTIONS)
    return [
        ClipSpec(colors[c], SHAPES[s], directions[d], SPEEDS[v], (float(x), float(y)))
        for c, s, d, v, (x, y) in zip(color, shape, direction, speed, start.tolist(), strict=True)
    ]


def render_specs(specs: list[ClipSpec], frames: int = FRAMES, size: int = SIZE, radius: float = RADIUS) -> Tensor:
    """The clips (N, 3, frames, size, size) that ``specs`` describe."""
    start = torch.tensor([s.start for s in specs], dtype=torch.float64)
    step = torch.tensor([DIRECTIONS[s.direction] for s in specs], dtype=torch.float64)
    speed = torch.tensor([s.speed for s in specs], dtype=torch.float64)
    centers = trajectory(start, step, speed, frames, size, radius)
    shapes = torch.tensor([SHAPES.index(s.shape) for s in specs])
    colors = torch.tensor([COLORS[s.color] for s in specs])
    return render(centers, shapes, colors, size, radius)


def make_clips(n: int, seed: int, frames: int = FRAMES, size: int = SIZE) -> ToyClips:
    """``n`` random clips from ``seed`` (the same seed gives the same clips)."""
    if n < 1:
        raise ValueError(f"make_clips n={n} must be >= 1.")
    specs = sample_specs(n, torch.Generator().manual_seed(seed), size)
    return ToyClips(render_specs(specs, frames, size), [s.prompt for s in specs], specs)
