"""TrainerConfig: the typed, validated settings of :class:`~distill_mixins.trainer.DistillationTrainer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill_mixins.config import check_choice, config_to_dict
from distill_mixins.precision import resolve_precision

AUTOCAST = ("auto", "none", "bf16", "fp16")
RESUME_MODES = ("auto", "never")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"TrainerConfig.{name}={value!r} must be an int >= {minimum}.")


@dataclass
class TrainerConfig:
    """Iterations, accumulation, precision, cadences (in completed iterations; 0 turns a cadence off) and resume.

    ``resume``: ``"auto"`` (newest usable checkpoint of ``run_dir``, else a fresh start), ``"never"``
    (refuses a ``run_dir`` that holds checkpoints), or the path of a checkpoint directory.
    """

    iterations: int = 1000
    run_dir: str = "runs/distill"
    batch_size: int | None = None
    """Samples per micro-batch; needed when the data is a map-style dataset."""
    grad_accum: int = 1
    """Micro-batches per iteration; the phase of the iteration is fixed for all of them."""
    autocast: str = "auto"
    """``auto`` (bf16 where ``device`` computes it natively, else none; the ``DISTILL_MIXINS_PRECISION`` variable
    overrides: :func:`distill_mixins.precision.resolve_precision`), ``none`` (float32), ``bf16`` (no scaler) or
    ``fp16`` (with a torch.amp.GradScaler, saved in checkpoints). Known-answer checks on tiny models pass ``none``."""
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    """Checkpoint every this many iterations; a checkpoint is always written at the end and on SIGTERM/SIGINT."""
    keep_last: int = 3
    visual_every: int = 0
    validate_every: int = 0
    max_nonfinite_in_row: int = 5
    """Non-finite losses in a row that stop training (each one skips its iteration)."""
    resume: str = "auto"
    progress: bool = True
    """A tqdm progress bar (it/s, ETA)."""
    tensorboard: bool = False
    """Also log to TensorBoard under ``run_dir/tensorboard`` (needs the optional ``tensorboard`` package)."""
    shuffle: bool = True
    """Map-style datasets: a fresh permutation per epoch, derived from (seed, epoch)."""

    def __post_init__(self) -> None:
        _check_int("iterations", self.iterations, 0)
        _check_int("grad_accum", self.grad_accum, 1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        for name in ("log_every", "save_every", "visual_every", "validate_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        _check_int("keep_last", self.keep_last, 1)
        _check_int("max_nonfinite_in_row", self.max_nonfinite_in_row, 1)
        check_choice("TrainerConfig", "autocast", self.autocast, AUTOCAST)
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"TrainerConfig.run_dir={self.run_dir!r} must be a non-empty path string.")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(
                f"TrainerConfig.resume={self.resume!r}: give 'auto', 'never' or a checkpoint directory path."
            )

    def resolved_autocast(self) -> str:
        """The autocast that runs on ``device``: ``none``, ``bf16`` or ``fp16`` (``auto`` resolved, logged once)."""
        if self.autocast != "auto":
            return self.autocast
        return "bf16" if resolve_precision("auto", self.device) == "bf16" else "none"

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-ready values."""
        return config_to_dict(self)
