"""The ``distill-mixins`` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from loguru import logger

COMMAND_MODULES: tuple[str, ...] = ("distill_mixins.trainer.cli", "distill_mixins.data.cli")
"""Modules whose ``register(subparsers)`` adds a subcommand (light imports only; heavy ones inside the handler)."""


def _demo(args: argparse.Namespace) -> int:
    from distill_mixins.demo_analytic import format_result, run_analytic_demo

    iterations = args.iterations if args.iterations is not None else (300 if args.quick else 1500)
    logger.info("analytic demo: exact 8-mode mixture teacher (36 Heun steps, CFG w=2) -> 1-step student")
    result = run_analytic_demo(
        args.out, pairs=args.pairs, iterations=iterations, batch_size=args.batch_size, seed=args.seed
    )
    print(format_result(result))
    print(f"figures: {args.out}/metrics.json, picture: {args.out}/samples.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-mixins", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="distill an exact 36-step CFG teacher into a 1-step student (CPU)")
    demo.add_argument("--out", default="runs/demo-analytic", help="run directory (default: %(default)s)")
    demo.add_argument("--iterations", type=int, default=None, help="training iterations (default 1500, quick 300)")
    demo.add_argument("--pairs", type=int, default=16384, help="teacher (noise, output) pairs (default %(default)s)")
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a short run for CI")
    demo.set_defaults(func=_demo)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distill-mixins`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
