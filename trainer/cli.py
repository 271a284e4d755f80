"""``distill-mixins train`` and ``distill-mixins extract-weights`` (registered by distill_mixins.cli)."""

from __future__ import annotations

import argparse
from typing import Any


def _train(args: argparse.Namespace) -> int:
    from distill_mixins.trainer.stages import run_stages
    from loguru import logger

    from distill_mixins.run_config import load_run_config

    results = run_stages(load_run_config(args.config, args.set or []))
    for stage in results:
        if stage.completed:
            print(f"stage {stage.name}: done, student {stage.student}")
        else:
            result = stage.result
            assert result is not None
            logger.warning("stage {} stopped by {} after iteration {}; run the same command again to resume.",
                           stage.name, result.stop_reason, result.iteration)
            return 128 + (result.signal_number or 0)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from distill_mixins.checkpointer import CheckpointError, extract_student_weights
    from loguru import logger

    try:
        path = extract_student_weights(args.input, args.output, ema=args.ema)
    except CheckpointError as error:
        logger.error("{}", error)
        return 1
    print(path)
    return 0


def register(commands: Any) -> None:
    """Add the ``train`` and ``extract-weights`` subcommands to ``commands`` (argparse subparsers)."""
    train = commands.add_parser(
        "train", help="train the stages of a run config (JSON); run again to resume",
        description="Train the stages of a run config; a stopped run resumes from its newest usable checkpoint. "
        "Exit status 0 when every stage completed, 128+N when stopped by signal N (a checkpoint was saved).",
    )
    train.add_argument("--config", required=True, help="run config JSON file (see docs/trainer.md)")
    train.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override a config value, e.g. --set stages.0.trainer.iterations=10 (repeatable; JSON values)",
    )
    train.set_defaults(func=_train)
    extract = commands.add_parser(
        "extract-weights", help="write a checkpoint's student weights to one safetensors file (the stage bridge)",
    )
    extract.add_argument("--input", required=True, help="checkpoint directory, checkpoints directory or run directory")
    extract.add_argument("--output", required=True, help="output .safetensors file")
    extract.add_argument("--ema", action="store_true", help="extract the student's EMA instead of the student")
    extract.set_defaults(func=_extract)
