"""Streaming speed of a causal student on the toy causal transformer: KV-cached chunk-by-chunk sampling against
recomputing the whole prefix at every step, and against the bidirectional teacher's 36-step CFG sampling.

Prints, for one batch of clips: time to first chunk (the teacher: to its whole clip), total time, frames per second
and the cached sampler's speed-up (goal at 16 frames: cached >= 2x faster than recomputing the prefix). The weights
are random (speed does not depend on them); float32, the CPU kind and thread count printed.

    python benchmarks/causal_stream.py --frames 16 --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from distill_mixins import KDMixin
from distill_mixins.causal import generate_causal, stream_causal_uncached
from distill_mixins.sampling import guided_x0, sample_ddim, time_grid
from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.demo_causal import timed_stream
from distill_mixins.toy.host import ToyCondition, first_frame_mask
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.trigflow import student_schedule


class ToyCausalKD(KDMixin, ToyCausalVideo2World):
    """A composed causal model (its student is what streams)."""


def median_of(run: Callable[[], tuple[float, float, int]], repeats: int) -> tuple[float, float, int]:
    results = [run() for _ in range(repeats)]
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher-steps", type=int, default=36)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ToyCausalKD(ToyCausalDiT(), ToyTextEncoder()).eval()
    clips = make_clips(args.batch, seed=1, frames=args.frames)
    latent = model.encode(clips.video)
    with torch.no_grad():
        text = model.embed_prompts(clips.prompts)
    condition = ToyCondition(text, latent, first_frame_mask(args.batch, args.frames))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    ts = student_schedule("cosmos_4step", model.scaling, model.sigma_data)

    def cached() -> tuple[float, float, int]:
        return timed_stream(generate_causal(model, condition, noise, ts=ts, stream=True))

    def uncached() -> tuple[float, float, int]:
        def prefix(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.trigflow_denoise_causal(model.net, x_t, t, condition).x0

        with torch.no_grad():
            return timed_stream(stream_causal_uncached(prefix, noise, ts, chunk_size=model.chunk_size,
                                                       sigma_data=model.sigma_data, renoise="ode"))

    def teacher() -> tuple[float, float, int]:
        uncondition = ToyCondition(model.embed_prompts([""] * args.batch), latent, condition.frame_mask)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x0_c = model.trigflow_denoise(model.net_teacher, x_t, t, condition).x0
            x0_u = model.trigflow_denoise(model.net_teacher, x_t, t, uncondition).x0
            return guided_x0(x0_c, x0_u, 3.0)

        grid = time_grid(args.teacher_steps, "shifted_rf", model.sigma_data, shift=1.0)
        start = time.perf_counter()
        with torch.no_grad():
            sample_ddim(denoise, noise, grid, sigma_data=model.sigma_data)
        total = time.perf_counter() - start
        return total, total, args.frames

    rows = {"cached (KV cache)": median_of(cached, args.repeats),
            "uncached (prefix recomputed)": median_of(uncached, args.repeats),
            f"teacher {args.teacher_steps}-step CFG (bidirectional)": median_of(teacher, 1)}
    print(f"CPU: torch capability {torch.backends.cpu.get_cpu_capability()}, AMX "
          f"{'yes' if torch.cpu._is_amx_tile_supported() else 'no'}, {torch.get_num_threads()} threads; float32; "
          f"ToyCausalDiT {sum(p.numel() for p in model.net.parameters()):,} parameters; batch {args.batch}, "
          f"{args.frames} frames of 32x32, chunks of {model.chunk_size}, K = {len(ts)} steps")
    print(f"{'sampler':40s} {'first chunk s':>14s} {'total s':>9s} {'frames/s':>9s} {'cached speed-up':>16s}")
    base = rows["cached (KV cache)"][1]
    for name, (first, total, frames) in rows.items():
        fps = frames * args.batch / total
        print(f"{name:40s} {first:14.3f} {total:9.3f} {fps:9.2f} {total / base:15.2f}x")
    ratio = rows["uncached (prefix recomputed)"][1] / base
    print(f"cached vs recomputing the prefix at {args.frames} frames: {ratio:.2f}x faster "
          f"(goal >= 2x: {'PASS' if ratio >= 2 else 'FAIL'})")


if __name__ == "__main__":
    main()
