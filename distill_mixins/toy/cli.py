"""``distill-mixins toy-teacher`` (train the toy Video2World teacher from scratch), ``toy-teacher-samples``,
``toy-teacher-eval`` (its quality bar), ``toy-causal-kd``, ``demo-causal``."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from distill_mixins.errors import ConfigError, MissingFileError, config_errors
from distill_mixins.precision import PRECISIONS


def _toy_teacher(args: argparse.Namespace) -> int:
    from distill_mixins.toy.train import TeacherTrainConfig, train_toy_teacher

    given = {f.name: getattr(args, f.name, None) for f in fields(TeacherTrainConfig)}
    values = {name: value for name, value in given.items() if value is not None}
    command = "distill-mixins " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "distill-mixins toy-teacher"
    with config_errors():
        config = TeacherTrainConfig(**values)
    path = train_toy_teacher(args.out, config, command=command)
    print(f"toy teacher: {path}")
    return 0


def _check_samples(args: argparse.Namespace) -> None:
    """``toy-teacher-samples``' flags, checked before the teacher is loaded."""
    for flag, value, low, high in (("--clips", args.clips, 1, None), ("--again", args.again, 1, args.clips),
                                   ("--steps", args.steps, 1, None)):
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}] (--clips)"
            raise ConfigError(f"toy-teacher-samples {flag}={value} must be {bound}.")
    if args.teacher_weights is not None and not Path(args.teacher_weights).is_file():
        raise MissingFileError(f"--teacher-weights {args.teacher_weights} is not a file: give a toy teacher "
                               "safetensors file (`distill-mixins toy-teacher` writes one), or leave it out.")


def sampling_model(teacher: Any) -> Any:
    """A composed model that samples the toy ``teacher``: the UNet on its host, the transformer on its causal host
    (it takes per-frame times, the given first frame at the conditional time, as it trained)."""
    from distill_mixins.toy.causal_dit import ToyCausalVideo2World

    if isinstance(teacher, ToyCausalVideo2World):
        from distill_mixins.methods.causal_kd import CausalKDConfig
        from distill_mixins.toy.causal_kd import ToyCausalKD

        return ToyCausalKD(teacher.net, teacher.text_encoder, distill=CausalKDConfig())
    from distill_mixins.methods import KDConfig
    from distill_mixins.toy.demo import ToyKD

    return ToyKD(teacher.net, teacher.text_encoder, distill=KDConfig())


def _teacher_samples(args: argparse.Namespace) -> int:
    from distill_mixins.toy.evalset import make_teacher_samples, teacher_settings, write_teacher_samples
    from distill_mixins.toy.train import WEIGHTS, load_toy_teacher

    _check_samples(args)
    weights = args.teacher_weights or WEIGHTS
    model = sampling_model(load_toy_teacher(weights))
    settings = teacher_settings(weights, args.steps, args.guidance)
    samples = make_teacher_samples(model, settings, clips=args.clips, again=args.again)
    samples.metadata["command"] = "distill-mixins " + shlex.join(sys.argv[1:])
    print(f"teacher samples: {write_teacher_samples(args.out, samples)}")
    return 0


def _toy_teacher_eval(args: argparse.Namespace) -> int:
    from distill_mixins.toy.quality import load_for_quality, teacher_quality

    if args.clips < 2:
        raise ConfigError(f"toy-teacher-eval --clips={args.clips} must be >= 2 (FD needs a covariance).")
    if not Path(args.weights).is_file():
        raise MissingFileError(f"{args.weights} is not a file: give a toy teacher safetensors file or a toy-teacher "
                               "run's train_state.pt.")
    result = teacher_quality(load_for_quality(args.weights), clips=args.clips, precision=args.precision)
    for goal, met, measured in result.goals():
        print(f"{'yes' if met else 'NO ':4s} {goal:58s} {measured}")
    print(f"{result.clips} held-out conditions; FD on fewer than 1,000 clips is biased upward (only the ratio counts)")
    return 0 if result.ok else 1


def register(commands: Any) -> None:
    """Add the ``toy-teacher``, ``toy-teacher-samples``, ``toy-teacher-eval``, ``toy-causal-kd`` and
    ``demo-causal`` subcommands."""
    parser = commands.add_parser("toy-teacher", help="train the toy Video2World teacher from scratch (CPU)")
    parser.add_argument("--out", default="runs/toy-teacher", help="run directory (default: %(default)s); resumable")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default 3000)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="clips per step (default 48)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (default 6e-4 for unet, 3e-3 for dit)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    parser.add_argument("--arch", choices=("unet", "dit"), default=None,
                        help="unet (the main demo's teacher, default) or dit (the causal pipeline's transformer "
                        "teacher)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="auto: bf16 autocast where the CPU computes it natively (AMX, AVX512-BF16), float32 otherwise "
        "(default auto; the shipped weights: bf16)",
    )
    parser.add_argument(
        "--target-teacher", dest="target_teacher", default=None,
        help="regress this toy teacher's denoiser instead of the data (e.g. the shipped UNet teacher's "
        "distill_mixins/toy/weights/toy_teacher.safetensors): fewer iterations for a new network",
    )
    parser.add_argument("--init-weights", dest="init_weights", default=None,
                        help="start from this toy teacher weights file of the same arch (fine-tuning)")
    parser.add_argument("--logit-mean", dest="logit_mean", type=float, default=None,
                        help="mean of the logit-normal training times (default 0; > 0: more high-noise times)")
    parser.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32",
                        help="the same as --precision fp32")
    parser.set_defaults(func=_toy_teacher)
    samples = commands.add_parser(
        "toy-teacher-samples",
        help="sample the toy teacher (36 steps, CFG) on the demo's held-out conditions in float32 (the shipped set)",
    )
    samples.add_argument("--out", required=True, help="output file (the shipped one: "
                         "distill_mixins/toy/weights/toy_teacher_eval.safetensors.xz)")
    samples.add_argument("--teacher-weights", dest="teacher_weights", default=None, help="default: the shipped teacher")
    samples.add_argument("--clips", type=int, default=1024, help="held-out conditions (default %(default)s)")
    samples.add_argument("--again", type=int, default=256,
                         help="conditions sampled a second time for diversity (default %(default)s)")
    samples.add_argument("--steps", type=int, default=36, help="DDIM steps (default %(default)s)")
    samples.add_argument("--guidance", type=float, default=3.0, help="CFG scale w (default %(default)s)")
    samples.set_defaults(func=_teacher_samples)
    quality = commands.add_parser(
        "toy-teacher-eval", help="check a toy teacher (weights file or a run's train_state.pt) against its quality bar",
        description="Sample the teacher at 36 and 1 DDIM steps with CFG on held-out conditions and check the quality "
        "bar of docs/toy.md (adherence, temporal consistency, FD against held-out real clips). Exit status 1 when a "
        "goal is missed.",
    )
    quality.add_argument("weights", help="a toy teacher safetensors file, or a toy-teacher run's train_state.pt")
    quality.add_argument("--clips", type=int, default=96, help="held-out conditions (default %(default)s)")
    quality.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto (default), bf16 or fp32")
    quality.set_defaults(func=_toy_teacher_eval)
    causal = commands.add_parser(
        "toy-causal-kd", help="the toy causal pipeline's first stages: ODE pairs -> CausalKD -> streaming evaluation",
        description="ODE pairs from the bidirectional toy transformer teacher, CausalKD of a causal student started "
        "from its weights, and an evaluation of the student streaming chunk by chunk against the teacher "
        "(distill_mixins.toy.causal_kd; docs/causal.md). Resumable: re-run the same command.",
    )
    causal.add_argument("--out", default=None, help="run directory (default runs/toy-causal-kd)")
    causal.add_argument("--teacher-weights", dest="teacher_weights", default=None,
                        help="the transformer teacher (toy-teacher --arch dit); default: the shipped one")
    for flag, kind, what in (("pairs", int, "ODE pairs"), ("teacher-steps", int, "teacher DDIM steps"),
                             ("guidance", float, "CFG scale w"), ("iterations", int, "CausalKD iterations"),
                             ("batch-size", int, "pairs per step"), ("lr", float, "AdamW learning rate"),
                             ("context-noise", float, "TrigFlow time of the clean context frames (0: none)"),
                             ("student-shift", float, "rectified-flow shift of the students' 4-step schedule"),
                             ("eval-clips", int, "held-out conditions evaluated"), ("seed", int, "seed")):
        causal.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=kind, default=None, help=what)
    causal.add_argument("--symmetries", action="store_true", default=None,
                        help="move each pair by a random rotation or reflection of the square world")
    causal.add_argument("--precision", choices=PRECISIONS, default=None, help="auto (default), bf16 or fp32")
    causal.add_argument("--quick", action="store_true", help="a CI-sized run")
    causal.set_defaults(func=_toy_causal_kd)
    demo = commands.add_parser(
        "demo-causal", help="the causal pipeline on the toy: ODE pairs -> CausalKD -> Self-Forcing, long rollouts",
        description="The shipped bidirectional toy transformer teacher -> ODE pairs -> CausalKD -> Self-Forcing (the "
        "library's pipeline), then the teacher, the CausalKD student and the Self-Forcing student on held-out "
        "conditions at 8 frames and on longer rollouts (FD of every 8-frame window: drift), time to the first chunk "
        "and frames per second; report.md, metrics.json, long_rollouts.png and GIFs in --out "
        "(distill_mixins.toy.demo_causal). Resumable: re-run the same command.",
    )
    demo.add_argument("--out", default=None, help="run directory (default runs/demo-causal, --quick: "
                      "runs/demo-causal-quick)")
    demo.add_argument("--teacher-weights", dest="teacher_weights", default=None,
                      help="the transformer teacher (toy-teacher --arch dit); default: the shipped one")
    for flag, kind, what in (("pairs", int, "ODE pairs"), ("teacher-steps", int, "teacher DDIM steps"),
                             ("guidance", float, "CFG scale w"), ("kd-iterations", int, "CausalKD iterations"),
                             ("sf-iterations", int, "Self-Forcing iterations"),
                             ("sf-update-freq", int, "one Self-Forcing student update every N iterations"),
                             ("sf-guidance", float, "Self-Forcing's DMD CFG scale (default: --guidance)"),
                             ("context-noise", float, "TrigFlow time of the clean context frames (0: none)"),
                             ("student-shift", float, "rectified-flow shift of the students' 4-step schedule"),
                             ("eval-clips", int, "held-out conditions at 8 frames"),
                             ("long-clips", int, "held-out conditions of the long rollouts"), ("seed", int, "seed")):
        demo.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=kind, default=None, help=what)
    demo.add_argument("--kd-symmetries", dest="kd_symmetries", action="store_true", default=None,
                      help="move each ODE pair by a random rotation or reflection of the square world in CausalKD")
    demo.add_argument("--precision", choices=PRECISIONS, default=None, help="auto (default), bf16 or fp32")
    demo.add_argument("--quick", action="store_true", help="a CI-sized run (under 2 minutes)")
    demo.set_defaults(func=_demo_causal)


def _demo_causal(args: argparse.Namespace) -> int:
    from distill_mixins.toy.demo_causal import config_from_args, run_demo_causal
    from distill_mixins.toy.report_causal import acceptance, format_long_table, format_table

    with config_errors():
        config = config_from_args(vars(args), args.quick)
    result = run_demo_causal(config)
    print(format_table(result))
    print(format_long_table(result))
    for goal, met, measured in acceptance(result):
        print(f"{'yes' if met else 'NO ':4s} {goal:70s} {measured}")
    print(f"report: {config.out}/report.md")
    return 0


def _toy_causal_kd(args: argparse.Namespace) -> int:
    from distill_mixins.toy.causal_kd import CausalKDRunConfig, run_causal_kd

    given = {f.name: getattr(args, f.name, None) for f in fields(CausalKDRunConfig)}
    values = {name: value for name, value in given.items() if value is not None}
    with config_errors():
        config = CausalKDRunConfig.quick(**values) if args.quick else CausalKDRunConfig(**values)
    result = run_causal_kd(config)
    for name, figures in result.samplers.items():
        print(f"{name:20s} FD {figures['fd']:7.3f}  adherence {figures['prompt_adherence']:.3f}  "
              f"consistency {figures['temporal_consistency']:.3f}")
    print(f"FD floor {result.fd_floor:.3f}; metrics: {config.out}/metrics.json")
    return 0
