"""``distill-mixins toy-teacher``: train the toy Video2World teacher from scratch."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from typing import Any


def _toy_teacher(args: argparse.Namespace) -> int:
    from distill_mixins.toy.train import TeacherTrainConfig, train_toy_teacher

    given = {f.name: getattr(args, f.name, None) for f in fields(TeacherTrainConfig)}
    values = {name: value for name, value in given.items() if value is not None}
    command = "distill-mixins " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "distill-mixins toy-teacher"
    path = train_toy_teacher(args.out, TeacherTrainConfig(**values), command=command)
    print(f"toy teacher: {path}")
    return 0


def register(commands: Any) -> None:
    """Add the ``toy-teacher`` subcommand."""
    parser = commands.add_parser("toy-teacher", help="train the toy Video2World teacher from scratch (CPU)")
    parser.add_argument("--out", default="runs/toy-teacher", help="run directory (default: %(default)s); resumable")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default 3000)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="clips per step (default 48)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 6e-4)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.set_defaults(func=_toy_teacher)
