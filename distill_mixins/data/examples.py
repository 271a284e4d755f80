"""Built-in factories for ``distill-mixins generate-kd-data`` on the analytic toy (exact ring-mixture teacher).

    distill-mixins generate-kd-data --model distill_mixins.data.examples:analytic_model \\
        --data distill_mixins.data.examples:analytic_batches --out runs/kd-data --num-samples 1024 --guidance 2
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from distill_mixins.methods.kd import KDConfig, KDMixin
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, mixture_batch, ring_mixture

SHAPE = (2, 2, 1, 1)
"""(C, T, H, W) of one toy sample."""
NUM_LABELS = 2


class AnalyticKD(KDMixin, ToyHost):
    """The exact 8-mode ring-mixture teacher composed with KD (batches: ``x0`` (B, C, T, H, W), ``label`` (B,))."""


def _mixture() -> Any:
    return ring_mixture(num_modes=8, num_labels=NUM_LABELS, shape=SHAPE)


def analytic_model(student_schedule: str = "one_step", form: str = "rf_velocity") -> AnalyticKD:
    """The analytic KD model; its student is an MLP (the exact teacher has no weights to copy)."""
    student = MLPDenoiser(SHAPE, form, NUM_LABELS, hidden=64, depth=3, seed=0)
    config = KDConfig(student_net=student, student_schedule=student_schedule)
    return AnalyticKD(**analytic_host_args(_mixture(), form), distill=config)


def analytic_batches(batch_size: int = 64, seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """An endless stream of exact data batches ``{"x0", "label"}`` (labels uniform), reproducible from ``seed``."""
    mixture = _mixture()
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield mixture_batch(mixture, batch_size, generator)


def analytic_prompt_batch(prompts: list[str]) -> dict[str, Any]:
    """A host batch for prompts naming a label (``"1"`` or ``"label 1"``): ``label`` (B,) and a zero ``x0``
    (B, C, T, H, W) (the teacher only reads its shape)."""
    labels = []
    for prompt in prompts:
        token = prompt.split()[-1] if prompt.split() else ""
        if not token.isdigit() or int(token) >= NUM_LABELS:
            raise ValueError(f"analytic prompt {prompt!r} must end with a label 0..{NUM_LABELS - 1}, e.g. 'label 1'.")
        labels.append(int(token))
    label = torch.tensor(labels, dtype=torch.int64)
    return {"x0": torch.zeros(len(prompts), *SHAPE), "label": label, "prompt": list(prompts)}
