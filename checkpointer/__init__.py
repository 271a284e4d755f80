"""distill_mixins.checkpointer: the dual-network checkpointer (installed from top-level checkpointer/).

One directory per saved iteration (student, EMA, critic, discriminator as safetensors; optimizer,
scheduler, grad-scaler, RNG and trainer state; the resolved config; a checksummed manifest), written
atomically with a ``latest`` pointer last. The teacher is never written. See docs/trainer.md.
"""

from distill_mixins.checkpointer.checkpointer import (
    NETWORK_FILES,
    PAUSE_ENV,
    DistillCheckpointer,
    LoadedCheckpoint,
    checkpoint_name,
    load_checkpoint,
    load_networks,
    network_files,
    resolve_checkpoint,
    verify_checkpoint,
)
from distill_mixins.checkpointer.extract import extract_student_weights, load_student_weights, student_file_metadata
from distill_mixins.checkpointer.files import CheckpointError
from distill_mixins.checkpointer.rng import capture_rng_state, restore_rng_state

__all__ = [
    "NETWORK_FILES",
    "PAUSE_ENV",
    "CheckpointError",
    "DistillCheckpointer",
    "LoadedCheckpoint",
    "capture_rng_state",
    "checkpoint_name",
    "extract_student_weights",
    "load_checkpoint",
    "load_networks",
    "load_student_weights",
    "network_files",
    "resolve_checkpoint",
    "restore_rng_state",
    "student_file_metadata",
    "verify_checkpoint",
]
