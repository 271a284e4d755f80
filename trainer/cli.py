"""``distill-mixins train`` and ``distill-mixins extract-weights`` (registered by distill_mixins.cli)."""

from __future__ import annotations

import argparse
from typing import Any


def _checked_run_config(args: argparse.Namespace) -> Any:
    """The run config of ``--config`` and ``--set``, every stage checked before any training; a config error is
    a :class:`~distill_mixins.errors.ConfigError` naming the file, the stage and the field."""
    from distill_mixins.trainer.stages import check_run_config

    from distill_mixins.errors import ConfigError
    from distill_mixins.run_config import load_run_config

    run = load_run_config(args.config, args.set or [])
    try:
        check_run_config(run)  # run_stages checks again: cheap
    except ConfigError as error:
        raise ConfigError(f"{args.config}: {error}") from error
    return run


def _train(args: argparse.Namespace) -> int:
    from distill_mixins.trainer.signals import Signalled
    from distill_mixins.trainer.stages import run_stages
    from loguru import logger

    try:
        results = run_stages(_checked_run_config(args))
    except Signalled as stop:
        logger.warning("stopped by signal {} between training iterations; run the same command again to resume.",
                       stop.signal_number)
        return 128 + stop.signal_number
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
    from pathlib import Path

    from distill_mixins.checkpointer import extract_student_weights

    from distill_mixins.errors import MissingFileError, UsageError

    if not Path(args.input).exists():
        raise MissingFileError(f"--input {args.input} does not exist: give a checkpoint, checkpoints or run directory.")
    if args.lora and args.merge:
        raise UsageError("extract-weights: give --lora (the adapter, for diffusers) or --merge (the merged network).")
    if args.base is not None and not args.merge:
        raise UsageError("extract-weights: --base is the base network's weights for --merge; add --merge.")
    print(extract_student_weights(args.input, args.output, ema=args.ema, lora=args.lora, merge=args.merge,
                                  base=args.base))  # a CheckpointError is one line (cli.main)
    return 0


def register(commands: Any) -> None:
    """Add the ``train`` and ``extract-weights`` subcommands to ``commands`` (argparse subparsers)."""
    train = commands.add_parser(
        "train", help="train the stages of a run config (JSON); run again to resume",
        description="Train the stages of a run config; a stopped run resumes from its newest usable checkpoint. "
        "Exit status 0 when every stage completed, 128+N when stopped by signal N (a checkpoint was saved), 2 on a "
        "configuration error (one line naming the file, stage and field; --debug shows the traceback).",
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
    extract.add_argument("--lora", action="store_true",
                         help="a LoRA run's adapter as a diffusers LoRA file (PEFT keys transformer.<module>.lora_A."
                         "weight, LoraConfig in the metadata: pipe.load_lora_weights / load_lora_adapter)")
    extract.add_argument("--merge", action="store_true",
                         help="a LoRA run's student merged into the base weights (--base): the full network's "
                         "state dict")
    extract.add_argument("--base", default=None, help="with --merge: the base (teacher) network's safetensors weights")
    extract.set_defaults(func=_extract)
