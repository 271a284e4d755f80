"""Throughput of KD teacher data generation, and the share of wall time spent inside the teacher network.

A Conv3d teacher (EDM eps-prediction, time and label embeddings) on latents (B, C, T, H, W) generates
``--samples`` samples with the 36-step Heun sampler and CFG (two teacher calls per evaluation), written as
shards by ``generate_kd_data``. Forward pre/post hooks on the teacher sum the time spent inside it (CUDA
events on a GPU, so no step is synchronized); the goal is >= 95% of the wall time.

    python benchmarks/kd_datagen.py [--samples 8] [--batch-size 4] [--width 64] [--device cpu|cuda]

The time outside the teacher grows with the latent size (the sampler's elementwise ops and the float64
TrigFlow conversions around each call: about 0.4 ms per call for a (4, 4, 4, 16, 16) batch, 0.9 ms for
(4, 4, 8, 16, 16), on 2 CPU cores), so the share depends on the teacher's work per latent element: a width-32
net spends about 89% of the wall time inside, the default width 64 about 96%.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Iterator

import torch
from torch import nn

from distill_mixins import KDConfig, KDMixin
from distill_mixins.data import KDDataConfig, generate_kd_data
from distill_mixins.testing import ToyHost


class ConvTeacher(nn.Module):
    """A small video denoiser: Conv3d stem, residual Conv3d blocks, Conv3d head; EDM eps output.

    forward(x (B, C, T, H, W) EDM state, sigma (B,), labels (B,); label -1 is unconditional) -> eps.
    """

    def __init__(self, channels: int, width: int, depth: int, num_labels: int) -> None:
        super().__init__()
        self.stem = nn.Conv3d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv3d(width, width, 3, padding=1) for _ in range(depth))
        self.head = nn.Conv3d(width, channels, 3, padding=1)
        self.label = nn.Embedding(num_labels + 1, width)
        self.time = nn.Linear(1, width)
        self.num_labels = num_labels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c_in = (1.0 / torch.sqrt(sigma**2 + 0.25)).to(x.dtype)[:, None, None, None, None]
        index = torch.where(labels < 0, torch.full_like(labels, self.num_labels), labels)
        embedding = self.label(index) + self.time((sigma.log() / 4).to(x.dtype)[:, None])
        h = self.stem(x * c_in) + embedding[:, :, None, None, None]
        for block in self.blocks:
            h = h + nn.functional.silu(block(h))
        return self.head(nn.functional.silu(h))


class ConvKD(KDMixin, ToyHost):
    """The conv teacher composed with KD, as a user composes theirs."""


class ForwardTimer:
    """Sums the time spent inside a module's forward (forward pre/post hooks; CUDA events on a GPU)."""

    def __init__(self, net: nn.Module, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds = 0.0
        self.calls = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: float | torch.cuda.Event = 0.0
        net.register_forward_pre_hook(self._before)
        net.register_forward_hook(self._after)

    def _before(self, *args: object) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def _after(self, *args: object) -> None:
        self.calls += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def total(self) -> float:
        """Seconds inside the forward (synchronizes a GPU once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        return self.seconds


def batches(shape: tuple[int, ...], batch_size: int, num_labels: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless host batches: a zero latent (only its shape is used) and random labels."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield {"x0": torch.zeros(batch_size, *shape), "label": torch.randint(0, num_labels, (batch_size,),
                                                                            generator=generator)}


def main() -> None:
    """Generate samples with a conv teacher and print samples/s and the teacher's share of wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shape", default="4,8,16,16", help="C,T,H,W of a latent")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    teacher = ConvTeacher(shape[0], args.width, args.depth, num_labels=10)
    model = ConvKD(teacher, "edm_eps", distill=KDConfig()).to(args.device)
    cuda = torch.device(args.device).type == "cuda"
    timer = ForwardTimer(model.net_teacher, cuda)
    config = KDDataConfig(num_samples=args.samples, steps=args.steps, guidance=args.guidance,
                          shard_size=args.samples, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        generate_kd_data(model, batches(shape, args.batch_size, 10), out, config)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    inside = timer.total()
    evaluations = math.ceil(args.samples / args.batch_size) * (2 * args.steps - 1) * 2
    print(f"device {args.device}, latent {shape}, conv width {args.width} depth {args.depth}, {args.steps} Heun steps, "
          f"CFG w = {args.guidance}, teacher batch {args.batch_size}")
    print(f"samples: {args.samples}, wall: {wall:.2f} s, samples/s: {args.samples / wall:.2f}")
    print(f"teacher forwards: {timer.calls} (expected {evaluations}), inside the teacher: {inside:.2f} s "
          f"= {100 * inside / wall:.1f}% of wall time (goal >= 95%)")
    print(f"outside the teacher: {1e3 * (wall - inside) / max(timer.calls, 1):.3f} ms per teacher call")


if __name__ == "__main__":
    main()
