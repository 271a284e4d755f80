"""The ``distill-mixins`` command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from loguru import logger

from distill_mixins.allocator import tune_cpu_allocator
from distill_mixins.errors import ConfigError, UsageError, config_errors, describe
from distill_mixins.precision import PRECISIONS

COMMAND_MODULES: tuple[str, ...] = (
    "distill_mixins.trainer.cli",
    "distill_mixins.data.cli",
    "distill_mixins.toy.cli",
    "distill_mixins.trainer.pipeline",
)
"""Modules whose ``register(subparsers)`` adds a subcommand (light imports only; heavy ones inside the handler)."""


def _check_analytic(args: argparse.Namespace) -> None:
    """``demo-analytic``'s numbers, checked before any work."""
    for flag, value, minimum in (("--pairs", args.pairs, 1), ("--batch-size", args.batch_size, 1),
                                 ("--iterations", args.iterations, 0), ("--seed", args.seed, 0)):
        if value is not None and value < minimum:
            raise ConfigError(f"demo-analytic {flag}={value} must be >= {minimum}.")


def _demo_analytic(args: argparse.Namespace) -> int:
    from distill_mixins.demo_analytic import format_result, run_analytic_demo

    _check_analytic(args)
    iterations = args.iterations if args.iterations is not None else (300 if args.quick else 1500)
    logger.info("analytic demo: exact 8-mode mixture teacher (36 Heun steps, CFG w=2) -> 1-step student")
    result = run_analytic_demo(
        args.out, pairs=args.pairs, iterations=iterations, batch_size=args.batch_size, seed=args.seed
    )
    print(format_result(result))
    print(f"figures: {args.out}/metrics.json, picture: {args.out}/samples.png")
    return 0


DEMO_FLAGS = (
    "pairs", "eval_clips", "diversity_clips", "kd_iterations", "dmd2_iterations", "dmd2_refine_weight",
    "dmd2_energy_weight", "dmd2_energy_beta", "dmd2_gan_weight", "dmd2_student_lr", "refine_iterations", "guidance",
    "seed", "teacher_weights", "spot_check", "batch_size", "sample_batch",
)


def demo_config(args: argparse.Namespace) -> Any:
    """The :class:`~distill_mixins.toy.demo.DemoConfig` that ``distill-mixins demo`` flags ask for."""
    from distill_mixins.toy.demo import DemoConfig

    values = {name: getattr(args, name) for name in DEMO_FLAGS if getattr(args, name) is not None}
    if args.out is not None:
        values["out"] = args.out
    if args.precision is not None:
        values["precision"] = args.precision
    for switch in ("fresh_teacher", "kd_symmetries", "steps_curve"):
        if getattr(args, switch):
            values[switch] = True
    return DemoConfig.for_recipe(args.recipe, quick=args.quick, **values)


def _demo(args: argparse.Namespace) -> int:
    from distill_mixins.toy.demo import STUDENT_STEPS, DemoStopped, run_demo
    from distill_mixins.toy.report import format_table

    config = demo_config(args)
    stages = [name for name, n in (("KD", config.kd_iterations), ("refined KD", config.refine_iterations),
                                   ("DMD2", config.dmd2_iterations)) if n > 0]
    logger.info("toy Video2World demo ({}): {}-step CFG teacher -> {} -> {}-step student, in {}", config.recipe,
                config.teacher_steps, " -> ".join(stages), STUDENT_STEPS[config.recipe][0], config.out)
    try:
        result = run_demo(config)
    except DemoStopped as stopped:
        logger.warning("{}", stopped)
        return 128 + stopped.signal_number
    print(format_table(result))
    print(f"report: {config.out}/report.md, figures: {config.out}/metrics.json, picture: {config.out}/samples.png")
    return 0


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="the main job: distill the toy Video2World teacher (36 steps x CFG) into a 1-step student"
    )
    demo.add_argument("--out", default=None, help="run directory (default runs/demo[-predict2.5][-quick])")
    demo.add_argument("--quick", action="store_true", help="a CI-sized run (about a minute)")
    demo.add_argument(
        "--recipe", choices=("transfer1", "predict2.5"), default="transfer1",
        help="transfer1: 1-step student by KD, then DMD2 with the energy-score term (default); predict2.5: 4-step "
        "DMD2 from the teacher's weights (sampled at 4, 2 and 1 steps)",
    )
    demo.add_argument("--pairs", type=int, default=None, help="KD teacher pairs (default 256)")
    demo.add_argument("--eval-clips", dest="eval_clips", type=int, default=None, help="held-out clips (default 1024)")
    demo.add_argument("--diversity-clips", dest="diversity_clips", type=int, default=None,
                      help="held-out conditions sampled a second time for diversity (default 256, quick 32)")
    demo.add_argument(
        "--kd-iterations", dest="kd_iterations", type=int, default=None, help="KD iterations (default 300)"
    )
    demo.add_argument(
        "--dmd2-iterations", dest="dmd2_iterations", type=int, default=None, help="DMD2 iterations (default 600)"
    )
    demo.add_argument(
        "--dmd2-refine-weight", dest="dmd2_refine_weight", type=float, default=None,
        help="weight of DMD2's refine term, 0 runs plain DMD2 (default 20)",
    )
    demo.add_argument(
        "--dmd2-energy-weight", dest="dmd2_energy_weight", type=float, default=None,
        help="weight of DMD2's energy-score term on real clips, which keeps per-condition diversity (default 1)",
    )
    demo.add_argument(
        "--dmd2-energy-beta", dest="dmd2_energy_beta", type=float, default=None,
        help="the energy score's exponent on distances, in (0, 2); below 1 a sample between two modes costs more "
        "(default 0.5)",
    )
    demo.add_argument(
        "--dmd2-gan-weight", dest="dmd2_gan_weight", type=float, default=None,
        help="weight of DMD2's GAN term (attention heads on the critic's features, at their own times); 0: off "
        "(default 0)",
    )
    demo.add_argument(
        "--dmd2-student-lr", dest="dmd2_student_lr", type=float, default=None,
        help="DMD2's student learning rate (default 3e-05)",
    )
    demo.add_argument(
        "--refine-iterations", dest="refine_iterations", type=int, default=None,
        help="refined-KD iterations between KD and DMD2, 0 skips them (default 0)",
    )
    demo.add_argument("--batch-size", dest="batch_size", type=int, default=None,
                      help="training clips per iteration, every stage (default 16)")
    demo.add_argument("--sample-batch", dest="sample_batch", type=int, default=None,
                      help="clips per sampling batch (default 64)")
    demo.add_argument("--guidance", type=float, default=None, help="teacher CFG scale w, standard form (default 3)")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--teacher-weights", dest="teacher_weights", default=None, help="toy teacher safetensors")
    demo.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="auto: bf16 where the CPU computes it natively (AMX, AVX512-BF16), float32 otherwise (default auto)",
    )
    demo.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32",
                      help="the same as --precision fp32")
    demo.add_argument(
        "--fresh-teacher", dest="fresh_teacher", action="store_true",
        help="sample the 36-step teacher on every held-out clip instead of the shipped samples (slow)",
    )
    demo.add_argument(
        "--spot-check", dest="spot_check", type=int, default=None,
        help="held-out clips the teacher re-samples to check the shipped samples and time itself (default 32)",
    )
    demo.add_argument(
        "--steps-curve", dest="steps_curve", action="store_true",
        help="add the quality-vs-steps curve to the report (the teacher at 1, 2, 4, 8, 36 steps beside the student)",
    )
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
    parser = argparse.ArgumentParser(
        prog="distill-mixins", description=__doc__,
        epilog=f"A configuration or input error prints one line and exits with status 2; --debug (or {DEBUG_ENV}=1) "
        "shows its traceback instead.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a configuration or input error")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_demo(commands)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


DEBUG_ENV = "DISTILL_MIXINS_DEBUG"
"""Set to 1 for tracebacks instead of one-line errors (like the ``--debug`` flag)."""
USAGE_EXIT = 2
"""Exit status of a configuration or input error (argparse's too)."""


def _check_demo(args: argparse.Namespace) -> None:
    with config_errors():
        demo_config(args)


PRECHECKS: dict[str, Callable[[argparse.Namespace], None]] = {"demo": _check_demo}
"""Subcommand -> a cheap check of its flags that runs before the subcommand, so a bad value fails before any work."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions ``distill-mixins`` reports as one line and exit status 2: user errors, not bugs.

    :class:`~distill_mixins.errors.UsageError` (config and input code raises it, or converts a config
    constructor's ValueError/TypeError/KeyError with :func:`~distill_mixins.errors.config_errors`), a damaged
    or missing checkpoint or KD dataset, and a missing file. Anything else keeps its traceback."""
    from distill_mixins.checkpointer import CheckpointError
    from distill_mixins.data.kd_data import KDDataError

    return (UsageError, CheckpointError, KDDataError, FileNotFoundError)


def debug_requested(args: argparse.Namespace) -> bool:
    """True with ``--debug`` or ``DISTILL_MIXINS_DEBUG`` set to 1 (or true, yes, on)."""
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip().lower() in (
        "1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distill-mixins`` command; a user error prints one line on stderr and returns 2."""
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    try:
        PRECHECKS.get(args.command, lambda _: None)(args)
        return args.func(args)
    except Exception as error:
        if debug_requested(args) or not isinstance(error, user_error_types()):
            raise
        print(f"distill-mixins: error: {describe(error)}", file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
