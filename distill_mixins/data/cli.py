"""``distill-mixins generate-kd-data`` (registered by distill_mixins.cli); docs/kd_data.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SCHEDULES = ("one_step", "cosmos_4step", "model")


def _given_path_times(args: argparse.Namespace) -> tuple[float, ...] | None:
    """``--path-times`` as numbers (a ConfigError names the flag)."""
    from distill_mixins.errors import config_errors

    with config_errors("--path-times"):
        return tuple(float(t) for t in args.path_times.split(",")) if args.path_times else None


def _path_times(args: argparse.Namespace, model: Any) -> tuple[float, ...] | None:
    """``--path-times`` as given, or ``--student-schedule`` resolved with the model's host and config."""
    if args.path_times:
        return _given_path_times(args)
    if args.student_schedule is None:
        return None
    if args.student_schedule == "model":
        return tuple(model.student_times().tolist())
    from distill_mixins.trigflow import student_schedule

    config = model.distill_config
    ts = student_schedule(
        args.student_schedule, model.scaling, model.sigma_data, shift=config.student_shift, sigma_max=config.sigma_max
    )
    return tuple(ts.tolist())


def _batches(args: argparse.Namespace) -> tuple[Any, int]:
    """The batches and the default sample count (the prompt count for ``--prompts``)."""
    from distill_mixins.data.kd_data import prompt_batches, read_prompts
    from distill_mixins.run_config import resolve_object

    if args.data:
        return resolve_object(args.data, "--data")(), args.num_samples
    prompts = read_prompts(args.prompts)
    make_batch = resolve_object(args.prompt_batch, "--prompt-batch")
    return prompt_batches(prompts, make_batch, args.batch_size), args.num_samples or len(prompts)


def _check_flags(args: argparse.Namespace) -> None:
    """The flags, checked before the (heavy) model is built: a ConfigError names the flag."""
    from distill_mixins.errors import ConfigError, MissingFileError, config_errors

    if args.data and args.num_samples is None:
        raise ConfigError("--data needs --num-samples (the data may be endless).")
    if args.prompts and not args.prompt_batch:
        raise ConfigError("--prompts needs --prompt-batch module:callable (prompts -> host batch).")
    if args.prompts and not Path(args.prompts).is_file():
        raise MissingFileError(f"--prompts {args.prompts} is not a file: give a text file, one prompt a line.")
    if args.device is not None:
        import torch

        with config_errors("--device", also=(RuntimeError,)):  # torch.device("nope") raises a RuntimeError
            torch.device(args.device)
    _config(args, args.num_samples or 1, _given_path_times(args))


def _config(args: argparse.Namespace, num_samples: int, path_times: tuple[float, ...] | None) -> Any:
    """The :class:`KDDataConfig` of the flags; a bad value raises a ConfigError naming the field."""
    from distill_mixins.data.kd_data import KDDataConfig
    from distill_mixins.errors import config_errors

    with config_errors():
        return KDDataConfig(
            num_samples=num_samples, steps=args.steps, sampler=args.sampler, guidance=args.guidance, seed=args.seed,
            shard_size=args.shard_size, batch_size=args.batch_size, path_times=path_times,
            grid=args.grid, store_keys=tuple(args.store_keys.split(",")) if args.store_keys else None,
            dtype=args.dtype, store_video=args.store_video, device=args.device,
        )


def _overwrite(out: Path) -> None:
    """Remove a previous dataset's own files (shards and manifest) from ``out``."""
    from distill_mixins.data.kd_data import MANIFEST

    for path in [*out.glob("shard-*.safetensors"), out / MANIFEST]:
        path.unlink(missing_ok=True)


def _generate(args: argparse.Namespace) -> int:
    """Flags are checked first (a KDDataConfig without the model); the model factory, the generation and the
    ODE pairs then run unwrapped: a config or dataset error is one line (distill_mixins.cli.main), a bug keeps its
    traceback."""
    from distill_mixins.data.dataset import write_ode_pairs
    from distill_mixins.data.kd_data import generate_kd_data
    from distill_mixins.methods.kd import KD_VIDEO
    from distill_mixins.run_config import resolve_object

    _check_flags(args)
    factory = resolve_object(args.model, "--model")
    negative = resolve_object(args.negative, "--negative") if args.negative else None
    model = factory()
    batches, num_samples = _batches(args)
    config = _config(args, num_samples, _path_times(args, model))
    if args.overwrite:
        _overwrite(Path(args.out))
    result = generate_kd_data(model, batches, args.out, config, negative=negative)
    pairs = args.ode_pairs or (str(Path(args.out) / "pairs") if args.ode_pairs_default else None)
    if pairs:
        reference = args.reference_key or (KD_VIDEO if args.store_video else None)
        write_ode_pairs(args.out, pairs, prompt_key=args.prompt_key, reference_key=reference)
    print(f"{result.num_samples} samples in {result.num_shards} shards ({result.generated_shards} generated, "
          f"{result.skipped_shards} already done), {result.samples_per_second:.1f} samples/s: {result.manifest}")
    return 0


def register(commands: Any) -> None:
    """Add the ``generate-kd-data`` and ``generate-ode-pairs`` subcommands to ``commands`` (argparse subparsers)."""
    p = commands.add_parser(
        "generate-kd-data", help="run the teacher's multi-step sampler and write KD shards (resumable)",
        description="Generate knowledge-distillation data: teacher ODE samples (standard-form CFG w) as safetensors "
        "shards with a manifest. Re-running the same command resumes: finished, verified shards are skipped.",
    )
    _add_arguments(p, ode_pairs=False)
    p = commands.add_parser(
        "generate-ode-pairs", help="stage 1 of the causal pipeline: the teacher's ODE states at the student's times",
        description="Generate ODE pairs for CausalKD: the teacher's CFG ODE solve with its states stored exactly at "
        "the student's K times (the model's own schedule unless --student-schedule/--path-times say otherwise), as "
        "resumable KD shards in --out and the per-sample pair layout in --ode-pairs (default OUT/pairs).",
    )
    _add_arguments(p, ode_pairs=True)


def _add_arguments(p: Any, ode_pairs: bool) -> None:
    p.add_argument("--model", required=True, help="module:factory, a zero-argument callable returning the model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="module:factory, a zero-argument callable returning an iterable of batches")
    source.add_argument("--prompts", help="text file, one prompt a line (with --prompt-batch)")
    p.add_argument("--prompt-batch", help="module:callable turning a list of prompts into a host batch")
    p.add_argument("--out", required=True, help="dataset directory")
    p.add_argument("--num-samples", type=int, default=None, help="samples (default with --prompts: one per prompt)")
    p.add_argument("--steps", type=int, default=36, help="teacher steps (default %(default)s)")
    p.add_argument("--sampler", choices=("heun", "euler"), default="heun")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG w, standard form x0_u + w (x0_c - x0_u); Cosmos 'guidance g' is w = g + 1")
    p.add_argument("--negative", help="module:callable(DistillBatch) -> negative condition (replaces the uncondition)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="samples per teacher call")
    times = p.add_mutually_exclusive_group()
    times.add_argument("--path-times", help="comma-separated descending TrigFlow times of the stored ODE path")
    times.add_argument("--student-schedule", choices=SCHEDULES, default="model" if ode_pairs else None,
                       help="store the ODE path at this student schedule ('model': the model's own)"
                       + (" (default %(default)s)" if ode_pairs else ""))
    p.add_argument("--grid", choices=("karras", "shifted_rf", "uniform"), default=None)
    p.add_argument("--store-keys", help="comma-separated batch keys to store (default: every per-sample key)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--store-video", action="store_true", help="also store model.decode(teacher_x0) as 'kd/video' "
                   "(the decoded reference video of ODE pairs)")
    p.add_argument("--device", default=None, help="device of the teacher calls (default: the teacher's)")
    p.add_argument("--overwrite", action="store_true", help="delete the directory's shards and manifest first")
    p.add_argument("--ode-pairs", help="also write the per-sample ODE-pair layout to this directory"
                   + (" (default OUT/pairs)" if ode_pairs else ""))
    p.add_argument("--prompt-key", default="prompt", help="string key of the prompt texts (ODE pairs)")
    p.add_argument("--reference-key", default=None, help="tensor key of the reference video (ODE pairs)")
    p.set_defaults(func=_generate, ode_pairs_default=ode_pairs)
