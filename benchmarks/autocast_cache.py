"""Cost of the library's uncached bf16 autocast against torch's default (weight-cast cache on).

The library runs autocast with ``cache_enabled=False`` (``distill_mixins.precision.uncached_autocast``): with the
cache, a resharded FSDP2 network got no gradient (docs/distributed.md). The cache saves re-casting a trainable
weight used more than once inside one autocast region (a multi-step DMD2 student's backward simulation calls the
student up to 4 times). This prints the median time of DMD2 iterations of each phase under both, interleaved in
one process (each configuration first in half of the rounds), and their ratio (uncached / cached), with the CPU
kind.

    python -m benchmarks.autocast_cache [--device cpu|cuda] [--schedule cosmos_4step] [--reps 7]   (from the repo root)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.dmd2_step import BenchDMD2, Meter, VideoNet, network_arguments
from distill_mixins import DMD2Config, OptimizerConfig
from distill_mixins.precision import uncached_autocast


def cpu_kind() -> str:
    """The CPU's bf16 support, as the timings depend on it."""
    return (f"capability {torch.backends.cpu.get_cpu_capability()}, AMX {torch.cpu._is_amx_tile_supported()}, "
            f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}")


def main() -> None:
    """Measure and print the ratio per phase."""
    parser = network_arguments(__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="cosmos_4step", help="DMD2 student_schedule (one_step, cosmos_4step)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    opt = OptimizerConfig(name="adamw", lr=1e-5)
    model = BenchDMD2(
        VideoNet(args.channels, args.depth), "rf_velocity",
        distill=DMD2Config(guidance_scale=4.0, student_optimizer=opt, critic_optimizer=opt,
                           student_schedule=args.schedule),
    ).to(device)
    shape = (args.batch, 4, 8, 32, 32)
    batch = {"x0": torch.randn(shape, device=device), "label": torch.randint(0, 2, (args.batch,), device=device)}

    def iteration(it: int, cached: bool) -> Callable[[], None]:
        def run() -> None:
            context = (torch.autocast(device.type, dtype=torch.bfloat16) if cached
                       else uncached_autocast(device.type, torch.bfloat16))
            with context:
                _, loss = model.training_step(batch, it)
            loss.backward()
            model.optimizer_step(it)
        return run

    # Within a round the first run of a phase after the other phase is slower (measured: 1.33x the second), so each
    # configuration goes first in one half of the rounds and the two halves' medians are averaged.
    secs: dict[str, float] = {}
    for order in (("cached", "uncached"), ("uncached", "cached")):
        fns = {f"{phase} {kind}": iteration(it, kind == "cached")
               for phase, it in (("student", 0), ("critic", 1)) for kind in order}
        for name, seconds in Meter(device).seconds(fns, args.reps).items():
            secs[name] = secs.get(name, 0.0) + seconds / 2
    print(f"device {device} ({cpu_kind() if device.type == 'cpu' else torch.cuda.get_device_name()}), batch "
          f"{shape}, student_schedule {args.schedule}, bf16 autocast, mean of two medians of {args.reps} (both orders)")
    for phase in ("student", "critic"):
        cached, uncached = secs[f"{phase} cached"], secs[f"{phase} uncached"]
        print(f"{phase:8s} phase: cached {cached * 1e3:8.1f} ms, uncached {uncached * 1e3:8.1f} ms, "
              f"uncached / cached {uncached / cached:.3f}")


if __name__ == "__main__":
    main()
