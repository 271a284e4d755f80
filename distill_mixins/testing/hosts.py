"""Toy hosts: the exact Gaussian-mixture teacher in each native form, and a tiny neural denoiser.

``ToyHost(net, form)`` satisfies the host contract for any ``net(x, time, labels)`` that
returns the native output of ``form``; compose it like a user's model:
``class Distill(KDMixin, ToyHost)``. Batches are dicts ``{"x0": (B, C, T, H, W), "label": (B,)}``;
label -1 is the unconditional (CFG) condition.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from distill_mixins.testing.gmm import GaussianMixture
from distill_mixins.trigflow import (
    F_to_x0,
    native_to_trigflow_state,
    native_to_trigflow_time,
    x0_to_native_output,
)

FORMS: dict[str, tuple[str, str]] = {
    "edm_eps": ("edm", "eps"),
    "edm_x0": ("edm", "x0"),
    "rf_velocity": ("rectified_flow", "velocity"),
}
"""form -> (scaling, prediction_type)."""


def _check_form(form: str) -> tuple[str, str]:
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not known; choose one of {', '.join(FORMS)}.")
    return FORMS[form]


class GMMDenoiserNet(nn.Module):
    """The exact denoiser of a :class:`GaussianMixture` in a native form (no trainable weights).

    forward(x (B, C, T, H, W) native state, time (B,) EDM sigma or RF tau, labels (B,)) -> native output.
    The native formulas are written here independently of :mod:`distill_mixins.trigflow`.
    """

    def __init__(self, mixture: GaussianMixture, form: str) -> None:
        super().__init__()
        self.mixture = mixture
        self.form = form
        self.scaling, self.prediction_type = _check_form(form)

    def forward(self, x: Tensor, time: Tensor, labels: Tensor) -> Tensor:
        time = time.double()
        if self.scaling == "edm":  # x = x0 + sigma eps
            a, b = torch.ones_like(time), time
        else:  # x = (1 - tau) x0 + tau eps
            a, b = 1.0 - time, time
        x0 = self.mixture.posterior_mean(x, a, b, labels)
        bb = b.reshape(-1, *([1] * (x.ndim - 1)))
        if self.prediction_type == "x0":
            out = x0
        else:  # EDM eps = (x - x0) / sigma; RF velocity = eps - x0 = (x - x0) / tau
            out = (x.double() - x0) / bb
        return out.to(x.dtype)


class MLPDenoiser(nn.Module):
    """A tiny neural denoiser with the same call signature as :class:`GMMDenoiserNet`.

    It predicts the TrigFlow velocity F from the unit-variance state ``x_t / sigma_d``, Fourier
    features of t and a label embedding (index ``num_labels`` = unconditional), and returns the
    native output of ``form``. shape: (C, T, H, W) of one sample.
    """

    def __init__(
        self, shape: tuple[int, int, int, int], form: str, num_labels: int = 0, *, hidden: int = 128,
        depth: int = 3, sigma_data: float | None = None, seed: int | None = None,
    ) -> None:
        super().__init__()
        self.scaling, self.prediction_type = _check_form(form)
        self.sigma_data = sigma_data if sigma_data is not None else (0.5 if self.scaling == "edm" else 1.0)
        self.shape = tuple(shape)
        self.num_labels = num_labels
        if seed is not None:
            torch.manual_seed(seed)
        dim = math.prod(shape)
        self.label_embedding = nn.Embedding(num_labels + 1, hidden)
        self.register_buffer("frequencies", torch.arange(1, 9, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = [nn.Linear(dim + 16, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, time: Tensor, labels: Tensor) -> Tensor:
        t = native_to_trigflow_time(time, self.scaling, self.sigma_data).to(x.device)
        x_t = native_to_trigflow_state(x, t, self.scaling, self.sigma_data)
        tf = t.to(self.frequencies.dtype)[:, None] * self.frequencies
        h = torch.cat([x_t.reshape(x.shape[0], -1).float() / self.sigma_data, torch.sin(tf), torch.cos(tf)], 1)
        index = torch.where(labels < 0, torch.full_like(labels, self.num_labels), labels)
        h = self.body[0](h) + self.label_embedding(index)
        F = self.head(self.body[1:](h)).reshape(x.shape).to(x.dtype)
        x0 = F_to_x0(F, x_t, t, self.sigma_data)
        return x0_to_native_output(x0, x, t, self.scaling, self.prediction_type, self.sigma_data)


class ToyHost(nn.Module):
    """A host satisfying the contract for a ``net(x, time, labels)`` of a native ``form``."""

    def __init__(self, net: nn.Module, form: str, sigma_data: float | None = None) -> None:
        super().__init__()
        self.scaling, self.prediction_type = _check_form(form)
        self.sigma_data = sigma_data if sigma_data is not None else (0.5 if self.scaling == "edm" else 1.0)
        self.net = net

    def predict(self, net: nn.Module, x: Tensor, time: Tensor, condition: Any) -> Tensor:
        """Native output (B, C, T, H, W) of ``net`` at native state x and native time (B,)."""
        return net(x, time, condition)

    def get_data_and_condition(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x0 (B, C, T, H, W), labels (B,), and the unconditional labels (all -1)."""
        labels = batch["label"]
        return batch["x0"], labels, torch.full_like(labels, -1)


def analytic_host_args(mixture: GaussianMixture, form: str, sigma_data: float | None = None) -> dict[str, Any]:
    """Constructor arguments of a :class:`ToyHost` whose teacher is the exact mixture denoiser."""
    return {"net": GMMDenoiserNet(mixture, form), "form": form, "sigma_data": sigma_data}


def mixture_batch(
    mixture: GaussianMixture, batch_size: int, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """A batch of exact data: ``{"x0": (B, C, T, H, W), "label": (B,)}`` with uniform labels."""
    labels = torch.randint(0, mixture.num_labels, (batch_size,), generator=generator)
    return {"x0": mixture.sample(labels, generator).to(dtype), "label": labels}
