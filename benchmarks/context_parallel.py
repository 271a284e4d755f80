"""Context parallel (Ulysses) on the CPU: per-rank activation memory and time of a TinyVideoDiT forward + backward
at CP = 2 (two gloo processes) against CP = 1 (one process).

Each run spawns fresh processes (torch.multiprocessing, ``spawn``, a file store: no ports), one thread each unless
said otherwise. Every rank builds the same ``TinyVideoDiT`` (seed 0) and the same input, a latent of
``(1, channels, frames, height, width)`` with patch (1, 2, 2); at CP = 2 the model runs
``set_context_parallel(WORLD)``: each rank keeps S / 2 tokens through the blocks, attention is Ulysses
all-to-all, and the output is gathered (every rank computes the same MSE loss on the full output). Measured:

- **saved**: bytes of the distinct tensors saved for backward during the forward
  (``distill_mixins.parallel.activation.saved_activation_bytes``, the weights excluded): the activation memory at
  its peak, the end of the forward. ``formula`` is ``distill_mixins.parallel.activation_memory`` for the same
  dims in float32 (it leaves out the per-sample conditioning and the loss's saved (B, C, T, H, W) difference).
- **peak live**: the largest sum of live bytes of the tensors one forward + backward creates (a
  ``TorchDispatchMode`` that registers every operator's output storage and drops it when a weak reference says it
  was freed, checked after each operator; the weights and the input existed before and are not counted, the
  parameters' gradients are): the saved activations plus what is transient (activation gradients, the all-to-all
  buffers, the gathered output). Scratch memory inside one kernel is not seen. (torch's memory profiler timeline,
  ``profile_memory=True``, was tried first: its private data-flow pass failed under CP on gloo.)
- **time**: the median of ``--repeats`` forward + backward passes after one warm-up (the slowest rank; the ranks
  meet at a barrier before each pass). The gradient all-reduce over the CP group, which a data-parallel wrapper
  over ``dp x cp`` does in training, is not in it.

The CP = 1 run is repeated with two threads (the same two cores as the two CP ranks), unless ``--no-two-threads``.
Goal: per-rank saved activations at CP = 2 <= 0.6x CP = 1.

    python benchmarks/context_parallel.py [--frames 16] [--height 32] [--width 32] [--dim 96] [--depth 4]
                                          [--heads 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from loguru import logger

from distill_mixins.parallel.activation import saved_activation_bytes
from distill_mixins.parallel.activation_memory import estimate_activations, tiny_video_dit_shape
from distill_mixins.parallel.memory import LiveBytes
from distill_mixins.testing.transformer import TinyVideoDiT

MIB = 2**20
GOAL = 0.6


def _build(args: argparse.Namespace) -> tuple[TinyVideoDiT, dict[str, torch.Tensor]]:
    grid_max = (args.frames, args.height // 2, args.width // 2)
    model = TinyVideoDiT(args.channels, dim=args.dim, depth=args.depth, heads=args.heads, max_size=grid_max, seed=0)
    g = torch.Generator().manual_seed(1)
    size = (1, args.channels, args.frames, args.height, args.width)
    data = {"x": torch.randn(size, generator=g), "time": torch.rand(1, generator=g), "labels": torch.tensor([0]),
            "target": torch.randn(size, generator=g)}
    return model, data


def _loss(model: TinyVideoDiT, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(data["x"], data["time"], data["labels"]) - data["target"]).square().mean()


def _peak_live(model: TinyVideoDiT, data: dict[str, torch.Tensor]) -> int:
    """Peak live bytes of the tensors one forward + backward creates (:class:`LiveBytes`; the parameters'
    gradients, created in the backward, are included)."""
    with LiveBytes() as tracker:
        _loss(model, data).backward()
    return tracker.peak


def _run(rank: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    model, data = _build(args)
    if world > 1:
        model.set_context_parallel(dist.group.WORLD)
    grid = (args.frames, args.height // 2, args.width // 2)
    shape = tiny_video_dit_shape(model)
    formula = estimate_activations(shape, grid, world, dtype_bytes=4)
    saved = saved_activation_bytes(lambda: _loss(model, data), exclude=[model])
    model.zero_grad(set_to_none=True)
    peak = None if args.no_profile else _peak_live(model, data)
    times = []
    for i in range(args.repeats + 1):  # the first pass warms up
        model.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        _loss(model, data).backward()
        if i:
            times.append(time.perf_counter() - start)
    return {"saved": saved, "formula": formula.saved, "transient": formula.transient, "peak": peak,
            "time": statistics.median(times), "split": formula.split, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}


def _worker(rank: int, world: int, threads: int, store: str, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result: Any = ("ok", _run(rank, world, args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace, threads: int = 1, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Run :func:`_run` on ``world`` fresh processes (gloo when more than one); the ranks' results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(_worker, args=(world, threads, str(Path(tmp) / "store"), tmp, args),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"CP={world} ran past {timeout:.0f} s")
        results = []
        for rank in range(world):
            status, value = torch.load(Path(tmp) / f"rank{rank}.pt", weights_only=False)
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world} failed:\n{value}")
            results.append(value)
        return results


def _cpu_line() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    amx = torch.cpu._is_amx_tile_supported() if hasattr(torch.cpu, "_is_amx_tile_supported") else "unknown"
    return (f"CPU: {platform.machine()}, torch CPU capability {capability}, AMX {'yes' if amx is True else 'no'}, "
            f"{os.cpu_count()} cores; torch {torch.__version__}; float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16, help="latent frames T (patch 1 in time)")
    parser.add_argument("--height", type=int, default=32, help="latent height (patch 2)")
    parser.add_argument("--width", type=int, default=32, help="latent width (patch 2)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the peak-live pass")
    parser.add_argument("--no-two-threads", action="store_true", help="skip CP = 1 with two threads")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    grid = (args.frames, args.height // 2, args.width // 2)
    tokens = grid[0] * grid[1] * grid[2]
    runs = [("1", launch(1, args)), ("2", launch(2, args))]
    if not args.no_two_threads:
        runs.insert(1, ("1 (2 threads)", launch(1, args, threads=2)))
    base = runs[0][1][0]
    print(_cpu_line())
    print(f"TinyVideoDiT dim {args.dim}, depth {args.depth}, heads {args.heads}, {base['params']:,} parameters "
          f"({base['params'] * 4 / MIB:.1f} MiB); latent (1, {args.channels}, {args.frames}, {args.height}, "
          f"{args.width}), patch (1, 2, 2): grid {grid[0]}x{grid[1]}x{grid[2]} = {tokens:,} tokens")
    print()
    head = (f"{'CP':<14}{'rank':>5}{'split':>8}{'threads':>8}{'saved MiB':>11}{'formula':>9}{'ratio':>7}"
            f"{'peak live MiB':>15}{'ratio':>7}{'fwd+bwd s':>11}{'time ratio':>11}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for label, results in runs:
        for rank, r in enumerate(results):
            ratio = r["saved"] / base["saved"]
            if label == "2":
                worst = max(worst, ratio)
            peak = "n/a" if r["peak"] is None else f"{r['peak'] / MIB:.1f}"
            peak_ratio = "n/a" if r["peak"] is None or base["peak"] is None else f"{r['peak'] / base['peak']:.3f}"
            print(f"{label:<14}{rank:>5}{r['split']:>8}{r['threads']:>8}{r['saved'] / MIB:>11.1f}"
                  f"{r['formula'] / MIB:>9.1f}{ratio:>7.3f}{peak:>15}{peak_ratio:>7}{r['time']:>11.3f}"
                  f"{r['time'] / base['time']:>11.3f}")
    slowest = max(r["time"] for r in runs[-1][1])
    print()
    print(f"CP 2 / CP 1 per-rank saved activations: worst {worst:.3f}x, goal <= {GOAL}x: "
          f"{'PASS' if worst <= GOAL else 'FAIL'}; time (slowest rank) {slowest / base['time']:.3f}x of CP 1 "
          f"on one thread")
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
