"""Cost of a DMD2 iteration against its parts and against a plain diffusion training step.

For a fixed conv video network and batch, prints (median of ``--reps`` runs, one process):

- time and transient peak memory of a student-phase and of a critic-phase iteration
  (``training_step`` + ``backward`` + ``optimizer_step``);
- each as a ratio to the sum of its constituent passes measured alone
  (student phase: student forward+backward, teacher forward x2 (CFG), critic forward;
  critic phase: student forward, critic forward+backward; plus the optimizer step) (goal <= 1.10);
- each as a ratio to one plain diffusion training step of the same network (forward+backward+step);
  goals: student-phase peak memory <= 1.10x the plain step; the schedule average
  (1 student : 4 critic) <= 1.40x the plain step's time.

Peak memory is the transient peak above the memory held before the iteration (weights, gradients and
optimizer states excluded): on CUDA from the allocator's statistics, on CPU from the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) with glibc returning large blocks to
the system (``MALLOC_MMAP_THRESHOLD_``; the script re-executes itself with it set).

    python benchmarks/dmd2_step.py [--device cpu|cuda] [--batch 4] [--channels 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill_mixins import DMD2Config, DMD2Mixin, OptimizerConfig
from distill_mixins.testing import ToyHost
from distill_mixins.trigflow import add_noise

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


class VideoNet(nn.Module):
    """A residual Conv3d network over (B, C, T, H, W) returning an RF velocity; labels add an embedding."""

    def __init__(self, channels: int, depth: int, in_channels: int = 4) -> None:
        super().__init__()
        self.inp = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv3d(channels, channels, 3, padding=1) for _ in range(depth))
        self.out = nn.Conv3d(channels, in_channels, 3, padding=1)
        self.label = nn.Embedding(3, channels)

    def forward(self, x: Tensor, time: Tensor, labels: Tensor) -> Tensor:
        """Velocity (B, C, T, H, W) at native state x and RF time (B,)."""
        h = self.inp(x) + self.label(torch.where(labels < 0, 2, labels))[:, :, None, None, None]
        h = h * (1 + time.to(h.dtype)[:, None, None, None, None])
        for block in self.blocks:
            h = h + torch.nn.functional.silu(block(h))
        return self.out(h)


def _repeat(fn: Callable[[], None], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def _in_phase(model: DMD2Mixin, student_phase: bool, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        model.set_phase(student_phase)
        fn()
    return run


class BenchDMD2(DMD2Mixin, ToyHost):
    """The benchmark host composed with DMD2."""


class Meter:
    """Wall time and transient peak memory of a callable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _rss_kib(self, field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")

    def peak_bytes(self, fn: Callable[[], None]) -> int:
        """Peak memory above the memory held before ``fn``."""
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            self._sync()
            return torch.cuda.max_memory_allocated() - base
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current resident set
        base = self._rss_kib("VmRSS:")
        fn()
        return (self._rss_kib("VmHWM:") - base) * 1024

    def seconds(self, fns: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
        """Median wall time of each callable over ``reps`` interleaved rounds (after one warm-up round),
        so that drifts of a shared machine hit every measurement alike."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        for rep in range(reps + 1):
            for name, fn in fns.items():
                self._sync()
                start = time.perf_counter()
                fn()
                self._sync()
                if rep:
                    times[name].append(time.perf_counter() - start)
        return {name: statistics.median(values) for name, values in times.items()}


def network_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the device and the :class:`VideoNet` batch and sizes (shared by the DMD2 benchmarks)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    return parser


def main() -> None:
    """Measure and print the ratios."""
    parser = network_arguments(__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=4.0, help="teacher CFG w (1 = no unconditional pass)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if sys.platform == "linux" and args.device == "cpu" and MMAP_ENV not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "65536"})
    device = torch.device(args.device)
    torch.manual_seed(0)
    opt = OptimizerConfig(name="adamw", lr=1e-5)
    model = BenchDMD2(
        VideoNet(args.channels, args.depth), "rf_velocity",
        distill=DMD2Config(guidance_scale=args.guidance, student_optimizer=opt, critic_optimizer=opt),
    ).to(device)
    shape = (args.batch, 4, args.frames, args.size, args.size)
    batch = {"x0": torch.randn(shape, device=device), "label": torch.randint(0, 2, (args.batch,), device=device)}
    data = model.prepare_data(batch)
    meter = Meter(device)
    t = torch.full((args.batch,), 1.0, dtype=torch.float64, device=device)
    x_t = add_noise(batch["x0"], torch.randn(shape, device=device), t, model.sigma_data)

    plain_net = VideoNet(args.channels, args.depth).to(device)
    plain_opt = torch.optim.AdamW(plain_net.parameters(), lr=1e-5)

    def plain_step() -> None:  # one diffusion training step of the same network
        x0 = model.trigflow_denoise(plain_net, x_t, t, data.condition).x0
        (x0 - batch["x0"]).pow(2).mean().backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def iteration(it: int) -> Callable[[], None]:
        def run() -> None:
            _, loss = model.training_step(batch, it)
            loss.backward()
            model.optimizer_step(it)
        return run

    def forward(net: nn.Module, condition: object, grad: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.set_grad_enabled(grad):
                x0 = model.trigflow_denoise(net, x_t, t, condition).x0
            if grad:
                x0.float().pow(2).mean().backward()
        return run

    def opt_step(it: int) -> Callable[[], None]:
        def run() -> None:
            model.set_phase(model.is_student_phase(it))
            for net in model.phase_networks(model.is_student_phase(it)).values():
                for p in net.parameters():
                    p.grad = torch.zeros_like(p)
            model.optimizer_step(it)
        return run

    cfg_passes = 2 if args.guidance != 1.0 else 1
    parts_student = {
        "student fwd+bwd": forward(model.net, data.condition, True),
        f"teacher fwd x{cfg_passes}": _repeat(forward(model.net_teacher, data.condition, False), cfg_passes),
        "critic fwd": forward(model.net_fake_score, data.condition, False),
        "optimizer step": opt_step(0),
    }
    parts_critic = {
        "student fwd": forward(model.net, data.condition, False),
        "critic fwd+bwd": forward(model.net_fake_score, data.condition, True),
        "optimizer step": opt_step(1),
    }
    r = args.reps
    plain_mem, student_mem, critic_mem = (meter.peak_bytes(fn) for fn in (plain_step, iteration(0), iteration(1)))
    student_parts = {f"student/{k}": _in_phase(model, True, fn) for k, fn in parts_student.items()}
    critic_parts = {f"critic/{k}": _in_phase(model, False, fn) for k, fn in parts_critic.items()}
    secs = meter.seconds(
        {"plain": plain_step, "student": iteration(0), "critic": iteration(1), **student_parts, **critic_parts}, r
    )
    plain_s, student_s, critic_s = secs["plain"], secs["student"], secs["critic"]
    parts_s = {k: secs[f"student/{k}"] for k in parts_student}
    parts_c = {k: secs[f"critic/{k}"] for k in parts_critic}
    sum_s, sum_c = sum(parts_s.values()), sum(parts_c.values())
    schedule = (student_s + 4 * critic_s) / 5

    mib = 2**20
    print(f"device {device}, batch {shape}, net {sum(p.numel() for p in plain_net.parameters()) / 1e6:.2f}M params, "
          f"CFG w={args.guidance}, median of {r}")
    print(f"plain diffusion training step: {plain_s * 1e3:8.1f} ms, peak {plain_mem / mib:8.1f} MiB")
    for name, seconds, mem, parts, total in (
        ("student phase", student_s, student_mem, parts_s, sum_s),
        ("critic phase", critic_s, critic_mem, parts_c, sum_c),
    ):
        detail = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items())
        print(f"{name:14s}: {seconds * 1e3:8.1f} ms, peak {mem / mib:8.1f} MiB   parts: {detail}")
        print(f"{'':16s}time / sum of parts {seconds / total:.3f} (goal <= 1.10); "
              f"time / plain step {seconds / plain_s:.3f}; peak memory / plain step {mem / plain_mem:.3f}")
    print(f"schedule average (1 student : 4 critic): {schedule * 1e3:.1f} ms = {schedule / plain_s:.3f}x the plain "
          f"step (goal <= 1.40); student-phase peak memory {student_mem / plain_mem:.3f}x (goal <= 1.10)")


if __name__ == "__main__":
    main()
