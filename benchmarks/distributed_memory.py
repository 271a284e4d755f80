"""Per-rank memory of a DMD2 training state under ``ddp`` and ``fsdp``, and activation memory with checkpointing.

Two measurements on the toy Video2World host (``ToyVideo2World(ToyUNet(widths=...))``) composed with DMD2
(student ``net``, critic ``net_fake_score``, frozen teacher ``net_teacher``; >= 20M parameters per network by
default):

1. **Training state per rank.** ``--world-size`` gloo processes on the CPU (one thread each) build the same model,
   ``parallelize`` it with ``ParallelConfig(mode="ddp")`` and then, afresh, with ``mode="fsdp"``, and run four
   iterations (student, critic, student, critic; ``student_update_freq=2``). Each network is measured with
   ``measure_local_bytes`` right after the backward of its second phase, before that phase's optimizer step: its
   weights, its gradients and the AdamW states of its first phase's step (DTensors count their local shard), i.e.
   the most a rank holds for it during training. Printed per network beside the formula
   (``estimate_memory`` / ``from_module``), with the per-rank total ratio fsdp / ddp (goal <= 0.55x).
2. **Activation memory of a student-phase step** in one process: the bytes of the tensors saved for backward
   while ``model.training_step(batch, 0)`` builds its graph (``saved_activation_bytes``, the model's weights
   excluded), without and with ``activation_checkpointing="full"`` (``checkpoint_networks``, the function
   ``parallelize`` applies before sharding), and their ratio (goal <= 0.6x). Both runs must give the same loss.

Bytes are MiB (2^20). The CPU kind is printed beside the wall times (``auto`` precision is float32 on a CPU without
AMX or AVX512-BF16).

    python benchmarks/distributed_memory.py [--quick] [--world-size 2] [--batch 2] [--widths 48,96,192,288]
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distill_mixins.trainer.distributed import Ranks, local_share
from loguru import logger

from distill_mixins import DMD2Config, DMD2Mixin
from distill_mixins.parallel import ParallelConfig, parallelize
from distill_mixins.parallel.activation import checkpoint_networks, saved_activation_bytes
from distill_mixins.parallel.memory import (
    NetworkBytes,
    NetworkMemory,
    estimate_memory,
    from_module,
    measure_local_bytes,
)
from distill_mixins.precision import resolve_precision
from distill_mixins.toy.demo import clip_batches
from distill_mixins.toy.host import ToyVideo2World
from distill_mixins.toy.text import ToyTextEncoder
from distill_mixins.toy.unet import ToyUNet

MIB = 2**20
DEFAULT_WIDTHS = (48, 96, 192, 288)
"""21.0M parameters per network: the smallest round widths of the toy UNet above 20M."""
QUICK_WIDTHS = (16, 32, 48, 64)
"""1.7M parameters per network: a smoke test."""
MIN_PARAMS = 20_000_000
STATE_GOAL, ACTIVATION_GOAL = 0.55, 0.6
NETWORKS = {"net": "student", "net_fake_score": "critic", "net_teacher": "teacher", "text_encoder": "text encoder"}
"""The composed model's modules with parameters, and their names in the tables (the text encoder is the host's
frozen conditioner: ``parallelize`` leaves it a plain copy on every rank)."""
STUDENT_IT, CRITIC_IT = (0, 2), (1, 3)
"""Iterations of each phase with ``student_update_freq=2``; the second of each is measured."""
DATA_SEED = 7


class ToyDMD2(DMD2Mixin, ToyVideo2World):
    """DMD2 on the toy Video2World host."""


def build(widths: tuple[int, ...]) -> ToyDMD2:
    """The composed model, the same weights in every process. The critic is moved off the teacher (as after some
    critic steps): a critic equal to the teacher gives a DMD gradient, and a student loss, of exactly 0."""
    torch.manual_seed(0)
    model = ToyDMD2(ToyUNet(widths=widths), ToyTextEncoder(), distill=DMD2Config(student_update_freq=2))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.net_fake_score.parameters():
            p.add_(torch.randn(p.shape, generator=generator), alpha=1e-2)
    return model


def global_batch(n: int) -> dict[str, Any]:
    """``n`` procedural clips and their prompts (the same in every process)."""
    return next(clip_batches(n, DATA_SEED, n))


def formula_networks(model: ToyDMD2) -> dict[str, NetworkMemory]:
    """The formula's description of every module with parameters (the text encoder is never sharded)."""
    described = {}
    for attr, name in NETWORKS.items():
        memory = from_module(name, getattr(model, attr), trainable=attr in ("net", "net_fake_score"))
        described[attr] = replace(memory, sharded=False) if attr == "text_encoder" else memory
    return described


# ------------------------------------------------------------------------------------------- training state


@dataclass
class ModeResult:
    """One rank's measurement under one mode."""

    held: dict[str, str]
    measured: dict[str, NetworkBytes]
    formula: dict[str, NetworkBytes]
    params: dict[str, int]
    setup_seconds: float
    step_seconds: float


def measure_mode(rank: int, world_size: int, mode: str, args: argparse.Namespace) -> ModeResult:
    """Build, parallelize, run four iterations and measure each network after its second backward."""
    start = time.perf_counter()
    model = build(args.widths)
    described = formula_networks(model)
    estimate = estimate_memory(list(described.values()), mode, world_size)
    plan = parallelize(model, ParallelConfig(mode=mode, precision=args.precision))
    batch = local_share(global_batch(args.batch * world_size), Ranks(rank, world_size, rank, world_size))
    optimizers = model.optimizers()
    setup = time.perf_counter()
    measured: dict[str, NetworkBytes] = {}
    for iteration in range(4):
        _, loss = model.training_step(batch, iteration)
        loss.backward()
        if iteration in (STUDENT_IT[1], CRITIC_IT[1]):  # gradients present, AdamW states from the first step
            for attr, net in model.phase_networks(iteration in STUDENT_IT).items():
                measured[attr] = measure_local_bytes(net, optimizers[attr], NETWORKS[attr])
        model.optimizer_step(iteration)
    for attr in ("net_teacher", "text_encoder"):  # frozen: weights only
        measured[attr] = measure_local_bytes(getattr(model, attr), None, NETWORKS[attr])
    held = {attr: plan.networks.get(attr, "copy") for attr in NETWORKS}
    return ModeResult(
        held, measured, {attr: estimate.row(NETWORKS[attr]) for attr in NETWORKS},
        {attr: net.params for attr, net in described.items()}, setup - start, time.perf_counter() - setup,
    )


def worker(rank: int, world_size: int, store: str, out: str, args: argparse.Namespace) -> None:
    """One rank: ddp then fsdp, the results pickled to ``out/rank{rank}.pkl``."""
    torch.set_num_threads(1)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    import transformers  # noqa: F401 - the text encoder's import (seconds), kept out of the first mode's time

    try:
        result: tuple[str, Any] = ("ok", {mode: measure_mode(rank, world_size, mode, args) for mode in ("ddp", "fsdp")})
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = ("error", traceback.format_exc())
    try:
        with open(Path(out) / f"rank{rank}.pkl", "wb") as file:
            pickle.dump(result, file)
    finally:
        dist.destroy_process_group()


def run_ranks(args: argparse.Namespace, timeout: float = 900.0) -> list[dict[str, ModeResult]]:
    """Spawn ``args.world_size`` gloo processes and return each rank's results, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        context = mp.start_processes(
            worker, args=(args.world_size, store, tmp, args), nprocs=args.world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the ranks ran past {timeout:.0f} s (a hung collective?)")
        results = []
        for rank in range(args.world_size):
            path = Path(tmp) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} wrote no result (it crashed).")
            with open(path, "rb") as file:
                status, value = pickle.load(file)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results


def total(rows: dict[str, NetworkBytes]) -> int:
    return sum(row.total for row in rows.values())


def print_state(results: list[dict[str, ModeResult]], world_size: int) -> bool:
    """The per-rank table and the fsdp/ddp ratio; returns whether the goal is met."""
    ranks = range(world_size)
    print(f"\nTraining state per rank at world size {world_size} (MiB; weights/grads/optimizer of rank 0; "
          "AdamW step scalars included in measured)")
    head = (f"{'mode':5s} {'network':13s} {'held':10s} {'parameters':>12s} {'weights':>8s} {'grads':>8s} "
            f"{'optim':>8s} " + " ".join(f"{f'total r{r}':>9s}" for r in ranks) + f" {'formula':>9s}")
    print(head)
    print("-" * len(head))
    for mode in ("ddp", "fsdp"):
        first = results[0][mode]
        for attr, name in NETWORKS.items():
            row = first.measured[attr]
            totals = " ".join(f"{results[r][mode].measured[attr].total / MIB:9.1f}" for r in ranks)
            print(f"{mode:5s} {name:13s} {first.held[attr]:10s} {first.params[attr]:12,d} {row.params / MIB:8.1f} "
                  f"{row.grads / MIB:8.1f} {row.optimizer / MIB:8.1f} {totals} {first.formula[attr].total / MIB:9.1f}")
        sums = " ".join(f"{total(results[r][mode].measured) / MIB:9.1f}" for r in ranks)
        print(f"{mode:5s} {'total':13s} {'':10s} {sum(first.params.values()):12,d} "
              f"{sum(r.params for r in first.measured.values()) / MIB:8.1f} "
              f"{sum(r.grads for r in first.measured.values()) / MIB:8.1f} "
              f"{sum(r.optimizer for r in first.measured.values()) / MIB:8.1f} {sums} "
              f"{total(first.formula) / MIB:9.1f}")
    for mode in ("ddp", "fsdp"):
        diffs = ", ".join(
            f"rank {r} {total(results[r][mode].measured) - total(results[r][mode].formula):+,d}" for r in ranks
        )
        print(f"{mode} measured - formula, bytes: {diffs} (AdamW's float32 step scalar per parameter tensor)")
    ratios = [total(results[r]["fsdp"].measured) / total(results[r]["ddp"].measured) for r in ranks]
    formula = total(results[0]["fsdp"].formula) / total(results[0]["ddp"].formula)
    worst = max(ratios)
    ok = worst <= STATE_GOAL
    per_rank = ", ".join(f"rank {r} {ratio:.3f}x" for r, ratio in zip(ranks, ratios, strict=True))
    print(f"fsdp / ddp per-rank total: {per_rank} (formula {formula:.3f}x); worst {worst:.3f}x, "
          f"goal <= {STATE_GOAL}x: {'PASS' if ok else 'FAIL'}")
    seconds = ", ".join(
        f"{mode} {max(results[r][mode].setup_seconds for r in ranks):.1f} s + "
        f"{max(results[r][mode].step_seconds for r in ranks):.1f} s" for mode in ("ddp", "fsdp")
    )
    print(f"time, build + parallelize + 4 iterations (slowest rank; ddp runs first): {seconds}")
    return ok


# ------------------------------------------------------------------------------------------- activations


def student_step_activations(model: ToyDMD2, batch: dict[str, Any]) -> tuple[int, float, float]:
    """Saved activation bytes, loss and seconds of one student-phase step (forward + backward) of ``model``."""
    losses = []

    def step() -> torch.Tensor:
        _, loss = model.training_step(batch, STUDENT_IT[0])
        losses.append(float(loss.detach()))
        return loss

    start = time.perf_counter()
    nbytes = saved_activation_bytes(step, [model])
    return nbytes, losses[0], time.perf_counter() - start


def print_activations(args: argparse.Namespace) -> bool:
    """Activation memory of a student-phase step without and with full checkpointing; returns the goal."""
    plain = build(args.widths)
    checkpointed = copy.deepcopy(plain)
    counts = checkpoint_networks(checkpointed, "full")
    batch = global_batch(args.batch)
    student_step_activations(copy.deepcopy(plain), batch)  # warm-up: first-call overheads out of the timings
    none_bytes, none_loss, none_s = student_step_activations(plain, batch)
    full_bytes, full_loss, full_s = student_step_activations(checkpointed, batch)
    ratio = full_bytes / none_bytes
    ok = ratio <= ACTIVATION_GOAL
    blocks = ", ".join(f"{NETWORKS[k]} {v}" for k, v in counts.items())
    print(f"\nActivation memory of a student-phase DMD2 step, one process, batch {args.batch} "
          f"(saved for backward, weights excluded; checkpointed blocks: {blocks})")
    print(f"{'activation_checkpointing':24s} {'saved MiB':>10s} {'loss':>12s} {'fwd+bwd s':>10s}")
    print(f"{'none':24s} {none_bytes / MIB:10.1f} {none_loss:12.6g} {none_s:10.2f}")
    print(f"{'full':24s} {full_bytes / MIB:10.1f} {full_loss:12.6g} {full_s:10.2f}")
    print(f"full / none: {ratio:.3f}x, goal <= {ACTIVATION_GOAL}x: {'PASS' if ok else 'FAIL'}; "
          f"same loss: {'yes' if abs(full_loss - none_loss) <= 1e-5 * abs(none_loss) else 'NO'}")
    return ok


# ------------------------------------------------------------------------------------------- main


def cpu_kind() -> str:
    """torch's CPU capability and the bf16 flags the precision policy reads."""
    amx, avx512_bf16 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    return (f"{platform.processor() or platform.machine()}, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, AMX {'yes' if amx else 'no'}, "
            f"AVX512-BF16 {'yes' if avx512_bf16 else 'no'}, {os.cpu_count()} cores")


def parse_widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(","))


def main() -> None:
    """Measure and print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"small networks (widths {QUICK_WIDTHS}): a smoke test")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="clips per rank (and of the activation step)")
    parser.add_argument("--widths", type=parse_widths, default=None, help="ToyUNet widths, e.g. 48,96,192,288")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args()
    if args.widths is None:
        args.widths = QUICK_WIDTHS if args.quick else DEFAULT_WIDTHS
    if args.world_size < 2:
        parser.error("--world-size must be >= 2 (fsdp over one rank shards nothing)")
    torch.set_num_threads(1)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    start = time.perf_counter()
    per_net = sum(p.numel() for p in ToyUNet(widths=args.widths).parameters())
    print(f"CPU: {cpu_kind()}; torch {torch.__version__}; precision {args.precision} -> "
          f"{resolve_precision(args.precision, 'cpu')}; 1 thread per process")
    print(f"host: ToyVideo2World(ToyUNet(widths={args.widths})) + DMD2: {per_net:,} parameters per network "
          f"(>= {MIN_PARAMS / 1e6:.0f}M: {'yes' if per_net >= MIN_PARAMS else 'no'}); "
          f"{args.batch} clips per rank, AdamW")
    results = run_ranks(args)
    state_ok = print_state(results, args.world_size)
    activation_ok = print_activations(args)
    print(f"\nwall time {time.perf_counter() - start:.1f} s; state {'PASS' if state_ok else 'FAIL'}, "
          f"activations {'PASS' if activation_ok else 'FAIL'}")


if __name__ == "__main__":
    main()
