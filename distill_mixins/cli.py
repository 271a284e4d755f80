"""The ``distill-mixins`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from loguru import logger

COMMAND_MODULES: tuple[str, ...] = ("distill_mixins.trainer.cli", "distill_mixins.data.cli", "distill_mixins.toy.cli")
"""Modules whose ``register(subparsers)`` adds a subcommand (light imports only; heavy ones inside the handler)."""


def _demo_analytic(args: argparse.Namespace) -> int:
    from distill_mixins.demo_analytic import format_result, run_analytic_demo

    iterations = args.iterations if args.iterations is not None else (300 if args.quick else 1500)
    logger.info("analytic demo: exact 8-mode mixture teacher (36 Heun steps, CFG w=2) -> 1-step student")
    result = run_analytic_demo(
        args.out, pairs=args.pairs, iterations=iterations, batch_size=args.batch_size, seed=args.seed
    )
    print(format_result(result))
    print(f"figures: {args.out}/metrics.json, picture: {args.out}/samples.png")
    return 0


DEMO_FLAGS = (
    "pairs", "eval_clips", "kd_iterations", "dmd2_iterations", "dmd2_refine_weight", "refine_iterations", "guidance",
    "seed", "teacher_weights",
)


def demo_config(args: argparse.Namespace) -> Any:
    """The :class:`~distill_mixins.toy.demo.DemoConfig` that ``distill-mixins demo`` flags ask for."""
    from distill_mixins.toy.demo import DemoConfig

    values = {name: getattr(args, name) for name in DEMO_FLAGS if getattr(args, name) is not None}
    if args.out is not None:
        values["out"] = args.out
    if args.no_bf16:
        values["bf16"] = False
    if args.kd_symmetries:
        values["kd_symmetries"] = True
    return DemoConfig.quick(**values) if args.quick else DemoConfig(**values)


def _demo(args: argparse.Namespace) -> int:
    from distill_mixins.toy.demo import run_demo
    from distill_mixins.toy.report import format_table

    config = demo_config(args)
    logger.info(
        "toy Video2World demo: 36-step CFG teacher -> KD -> refined KD -> DMD2 -> 1-step student, in {}", config.out
    )
    result = run_demo(config)
    print(format_table(result))
    print(f"report: {config.out}/report.md, figures: {config.out}/metrics.json, picture: {config.out}/samples.png")
    return 0


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="the main job: distill the toy Video2World teacher (36 steps x CFG) into a 1-step student"
    )
    demo.add_argument("--out", default=None, help="run directory (default runs/demo, quick: runs/demo-quick)")
    demo.add_argument("--quick", action="store_true", help="a CI-sized run (about a minute)")
    demo.add_argument("--pairs", type=int, default=None, help="KD teacher pairs (default 512)")
    demo.add_argument("--eval-clips", dest="eval_clips", type=int, default=None, help="held-out clips (default 1024)")
    demo.add_argument(
        "--kd-iterations", dest="kd_iterations", type=int, default=None, help="KD iterations (default 250)"
    )
    demo.add_argument(
        "--dmd2-iterations", dest="dmd2_iterations", type=int, default=None, help="DMD2 iterations (default 100)"
    )
    demo.add_argument(
        "--dmd2-refine-weight", dest="dmd2_refine_weight", type=float, default=None,
        help="weight of DMD2's refine term, 0 runs plain DMD2 (default 20)",
    )
    demo.add_argument(
        "--refine-iterations", dest="refine_iterations", type=int, default=None,
        help="refined-KD iterations between KD and DMD2, 0 skips them (default 160)",
    )
    demo.add_argument("--guidance", type=float, default=None, help="teacher CFG scale w, standard form (default 3)")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--teacher-weights", dest="teacher_weights", default=None, help="toy teacher safetensors")
    demo.add_argument("--no-bf16", dest="no_bf16", action="store_true", help="float32 instead of bf16 autocast")
    demo.add_argument(
        "--kd-symmetries", dest="kd_symmetries", action="store_true",
        help="move every KD pair by a random rotation or reflection of the square (pays off with more KD iterations)",
    )
    demo.set_defaults(func=_demo)
    analytic = commands.add_parser("demo-analytic", help="distill an exact 36-step CFG mixture teacher (seconds)")
    analytic.add_argument("--out", default="runs/demo-analytic", help="run directory (default: %(default)s)")
    analytic.add_argument("--iterations", type=int, default=None, help="training iterations (default 1500, quick 300)")
    analytic.add_argument("--pairs", type=int, default=16384, help="teacher pairs (default %(default)s)")
    analytic.add_argument("--batch-size", type=int, default=256)
    analytic.add_argument("--seed", type=int, default=0)
    analytic.add_argument("--quick", action="store_true", help="a short run")
    analytic.set_defaults(func=_demo_analytic)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-mixins", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distill-mixins`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
