"""The stage bridge: extract a checkpoint's student (or its EMA) to one safetensors file, and load it anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distill_mixins.checkpointer.checkpointer import resolve_checkpoint, verify_checkpoint
from distill_mixins.checkpointer.files import CheckpointError, fsync_dir, save_safetensors
from distill_mixins.checkpointer.sharded import is_sharded, read_full_state, set_full_state
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

STUDENT_FORMAT = "distill-mixins-student/1"
LORA_FORMAT = "distill-mixins-lora/1"
"""``distill_format`` of a ``--lora`` file (its ``format`` is ``pt``, as diffusers writes LoRA files)."""
MERGED_FORMAT = "distill-mixins-student-merged/1"


def extract_student_weights(
    checkpoint: str | Path, output: str | Path, *, ema: bool = False, lora: bool = False, merge: bool = False,
    base: str | Path | None = None,
) -> Path:
    """Write the student (``ema=True``: its EMA) of a checkpoint to ``output`` (safetensors, atomic).

    ``checkpoint``: a checkpoint directory, a checkpoints directory or a run directory (newest usable one).
    Keys are the network's own ``state_dict`` keys, so the file loads into ``host.net`` of a plain host. A sharded
    checkpoint's student is gathered into one file (in this process; no process group needed).

    A LoRA run (``DistillConfig.lora``) saves the student adapter only. ``lora=True`` writes it in the PEFT format
    diffusers' LoRA loaders read (``transformer.<module>.lora_A.weight`` and the ``LoraConfig`` in the metadata);
    ``merge=True`` writes the base network's full state dict with the adapter merged, from the base weights in
    ``base`` (a safetensors file of the teacher network's state dict).
    """
    path = resolve_checkpoint(checkpoint)
    manifest = verify_checkpoint(path)
    attr = "net_ema" if ema else "net"
    if attr not in manifest["networks"]:
        hint = "the run had no EMA (DistillConfig.ema=None); extract without --ema" if ema else "it has no student"
        found = ", ".join(sorted(manifest["networks"])) or "no networks"
        raise CheckpointError(f"{path} holds no {'EMA' if ema else 'student'} weights (it holds: {found}): {hint}.")
    source = path / manifest["networks"][attr]
    tensors = read_full_state(source) if source.suffix == ".dcp" else load_file(str(source))  # sharded: gathered
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    meta = {"format": STUDENT_FORMAT, "source": str(path), "iteration": str(manifest["iteration"]), "network": attr}
    if lora or merge:
        tensors, meta = _lora_export(path, tensors, meta, merge=merge, base=base)
    save_safetensors(tensors, tmp, meta)
    os.replace(tmp, output)
    fsync_dir(output.parent)
    logger.info("wrote {} ({} of {}, iteration {})", output, "EMA" if ema else "student", path, manifest["iteration"])
    return output


def _lora_export(
    path: Path, tensors: dict[str, Any], meta: dict[str, str], *, merge: bool, base: str | Path | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The adapter of a LoRA checkpoint as a diffusers LoRA file, or merged into the base weights (``merge``)."""
    from distill_mixins.lora import adapter_to_diffusers, checkpoint_lora_spec, merge_adapter

    config_file = path / "config.json"
    spec = checkpoint_lora_spec(json.loads(config_file.read_text(encoding="utf-8"))) if config_file.is_file() else None
    if spec is None:
        flag = "--merge" if merge else "--lora"
        raise CheckpointError(f"{path} was not trained with DistillConfig.lora (its config.json has no distill.lora): "
                              f"extract it without {flag}.")
    try:
        if not merge:
            tensors, lora_meta = adapter_to_diffusers(tensors, spec)
            return tensors, {**meta, **lora_meta, "distill_format": LORA_FORMAT}
        if base is None:
            raise CheckpointError("--merge needs --base: the base (teacher) network's weights as a safetensors file "
                                  "(its plain state dict; a checkpoint never holds the base).")
        if not Path(base).is_file():
            raise CheckpointError(f"--base {base} is not a file: give the teacher network's safetensors weights.")
        merged = merge_adapter(load_file(str(base)), tensors, spec)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return merged, {**meta, "format": MERGED_FORMAT, "lora_rank": str(spec["rank"]), "lora_alpha": str(spec["alpha"])}


def student_file_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a student weights file (format, source checkpoint, iteration, network)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_student_weights(target: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load a student weights file into ``target``.

    ``target`` may be a distillation model (its ``load_student_state_dict``: student, EMA reset to it),
    a plain host for inference (loads into ``host.net``), or the network itself. A sharded student (FSDP2) takes
    the full file on every rank (collective).
    """
    state = load_file(str(path))
    try:
        if hasattr(target, "load_student_state_dict"):
            if is_sharded(target.net):  # collective: every rank shards the full file, then the EMA follows
                set_full_state(target.net, state)
                state = target.net.state_dict()
            target.load_student_state_dict(state, strict=strict)
        elif isinstance(getattr(target, "net", None), nn.Module) and callable(getattr(target, "predict", None)):
            target.net.load_state_dict(state, strict=strict)
        else:
            target.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit {type(target).__name__}'s student network: {error}") from error
