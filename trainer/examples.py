"""Runnable factories for run configs: the analytic toy (exact 8-mode mixture teacher, MLP students).

``distill-mixins train --config cfg.json`` with ``"model": "distill_mixins.trainer.examples:toy_model"`` and
``"data": "distill_mixins.trainer.examples:toy_kd_data"``; :func:`two_stage_kd_config` writes such a config
(KD one-step, then a 4-step KD student starting from it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from distill_mixins.trainer.callbacks import ValidationCallback, student_sample_validation
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from distill_mixins.config import DistillConfig
from distill_mixins.methods.kd import KD_NOISE, KD_TEACHER_X0
from distill_mixins.run_config import compose
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, ring_mixture

SHAPE = (2, 2, 1, 1)
"""(C, T, H, W) of one toy sample."""


def toy_model(
    method: type, distill: DistillConfig, *, form: str = "rf_velocity", hidden: int = 64, depth: int = 3,
    num_modes: int = 8, num_labels: int = 2,
) -> nn.Module:
    """``compose(method, ToyHost)`` on the exact ring-mixture teacher; MLP student (and critic) unless configured."""
    mixture = ring_mixture(num_modes=num_modes, num_labels=num_labels, shape=SHAPE)
    changes: dict[str, Any] = {}
    if distill.student_net is None:  # the analytic teacher has no weights to copy
        changes["student_net"] = MLPDenoiser(SHAPE, form, num_labels, hidden=hidden, depth=depth)
    if getattr(method, "uses_critic", False) and distill.critic_net is None:
        changes["critic_net"] = MLPDenoiser(SHAPE, form, num_labels, hidden=hidden, depth=depth)
    if changes:
        distill = dataclasses.replace(distill, **changes)
    return compose(method, ToyHost)(**analytic_host_args(mixture, form), distill=distill)


class TensorDictDataset(Dataset):
    """Map-style dataset over a dict of equally long tensors: sample ``i`` is ``{key: tensor[i]}``."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        lengths = {key: len(value) for key, value in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"TensorDictDataset tensors differ in length: {lengths}.")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


@torch.no_grad()
def toy_kd_data(
    model: nn.Module, *, seed: int, pairs: int = 1024, guidance: float = 2.0, teacher_steps: int = 36,
) -> TensorDictDataset:
    """KD pairs from the model's teacher: ``label``, ``kd/noise``, ``kd/teacher_x0`` (= ``x0``), each (pairs, ...).

    Teacher: ``teacher_steps`` Heun steps with CFG ``w = guidance``. Multi-step students use
    ``multistep_input="interpolated"`` (these pairs carry no ODE ``path``).
    """
    generator = torch.Generator().manual_seed(seed + 1)
    num_labels = model.net_teacher.mixture.num_labels  # type: ignore[union-attr]
    labels = torch.randint(0, num_labels, (pairs,), generator=generator)
    noise = torch.randn(pairs, *SHAPE, generator=generator)
    x0 = model.generate_teacher(  # type: ignore[operator]
        labels, noise, uncondition=torch.full_like(labels, -1), guidance=guidance, steps=teacher_steps,
    )
    return TensorDictDataset({"label": labels, KD_NOISE: noise, KD_TEACHER_X0: x0, "x0": x0})


def toy_validation(model: nn.Module, data: TensorDictDataset) -> ValidationCallback:
    """Validation on the first 256 pairs: the student's sample MSE to the teacher (``val/sample_mse``)."""
    batch = default_collate([data[i] for i in range(min(256, len(data)))])
    return ValidationCallback(student_sample_validation(batch))


def two_stage_kd_config(run_dir: str, *, iterations: tuple[int, int] = (300, 200), pairs: int = 1024) -> dict[str, Any]:
    """A run config: KD to a one-step student, then a 4-step KD student (interpolated inputs) starting from it."""
    optimizer = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0}
    common = {"method": "kd", "model": "distill_mixins.trainer.examples:toy_model",
              "data": "distill_mixins.trainer.examples:toy_kd_data", "data_args": {"pairs": pairs}}
    trainer = {"batch_size": 64, "log_every": 50, "validate_every": 100, "progress": True,
               "autocast": "none"}  # tiny MLPs: float32 (bf16 autocast gains nothing at this size)
    return {
        "run_dir": run_dir,
        "seed": 0,
        "stages": [
            {"name": "kd_1step", **common, "trainer": {**trainer, "iterations": iterations[0]},
             "method_config": {"student_optimizer": optimizer},
             "callbacks": ["distill_mixins.trainer.examples:toy_validation"]},
            {"name": "kd_4step", **common, "trainer": {**trainer, "iterations": iterations[1]},
             "method_config": {"student_optimizer": optimizer, "student_schedule": "cosmos_4step",
                               "multistep_input": "interpolated"},
             "callbacks": ["distill_mixins.trainer.examples:toy_validation"]},
        ],
    }
