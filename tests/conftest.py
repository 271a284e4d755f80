"""Shared test fixtures: a tiny two-phase method composed onto tiny hosts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import pytest
import torch

from distill_mixins import DistillationCoreMixin, DistillConfig
from distill_mixins.allocator import tune_cpu_allocator
from distill_mixins.precision import PRECISION_ENV

# The suite runs in float32 on every CPU kind (make test's budget is set in float32): without this, `auto` picks bf16
# on CPUs with AMX or AVX512-BF16, where FSDP2's bf16 parameters fail on gloo (docs/development.md, "Suite time").
# Spawned test processes inherit it; tests of the policy itself clear it (tests/test_precision.py).
os.environ.setdefault(PRECISION_ENV, "fp32")
from distill_mixins.testing import MLPDenoiser, ToyHost, mixture_batch, ring_mixture
from distill_mixins.trigflow import add_noise

# As the `distill-mixins` command does: large blocks stay in the process (distill_mixins/allocator.py).
tune_cpu_allocator()

SHAPE = (2, 2, 1, 1)


class TwoPhaseMethod(DistillationCoreMixin):
    """A minimal method with both phases, for core tests: the student regresses the teacher's
    one-step x0; the critic learns to denoise student samples (a DMD-style fake score)."""

    uses_critic = True

    def training_step_generator(self, data, iteration):
        noise = torch.randn_like(data.x0)
        t = self.student_times()[0].expand(noise.shape[0])
        x_t = noise * self.sigma_data
        x0 = self.trigflow_denoise(self.net, x_t, t, data.condition).x0
        with torch.no_grad():
            target = self.trigflow_denoise(self.net_teacher, x_t, t, data.condition).x0
        loss = 0.5 * (x0 - target).pow(2).mean()
        return {"loss_student": loss.detach()}, loss

    def training_step_critic(self, data, iteration):
        with torch.no_grad():
            fake = self.generate(data.condition, torch.randn_like(data.x0))
        t = torch.rand(fake.shape[0], dtype=torch.float64) + 0.2
        x_t = add_noise(fake, torch.randn_like(fake), t, self.sigma_data)
        loss = (self.trigflow_denoise(self.net_fake_score, x_t, t, data.condition).x0 - fake).pow(2).mean()
        return {"loss_critic": loss.detach()}, loss


class NeuralDistill(TwoPhaseMethod, ToyHost):
    """Tiny neural host (teacher = a random MLP denoiser) with the two-phase method."""


def make_neural_model(**config_kwargs) -> NeuralDistill:
    torch.manual_seed(0)
    net = MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=32, depth=2)
    config_kwargs.setdefault("student_update_freq", 5)
    model = NeuralDistill(net, "edm_eps", distill=DistillConfig(**config_kwargs))
    with torch.no_grad():  # move the student off the teacher so its loss has a gradient
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def param_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def mixture():
    return ring_mixture(shape=SHAPE)


@pytest.fixture
def batch(mixture):
    return mixture_batch(mixture, 16, torch.Generator().manual_seed(0))


class TrainingPool:
    """The acceptance trainings' worker processes (one per CPU, one thread each), shared by the test modules of a
    session: a training submitted twice under the same key runs once (the DMD2 1-step runs serve both the DMD2 and
    the rCM acceptance)."""

    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor
        self.futures: dict[Hashable, Future] = {}

    def submit(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Future:
        if key not in self.futures:
            self.futures[key] = self.executor.submit(fn, *args)
        return self.futures[key]


@pytest.fixture(scope="session")
def training_pool() -> Iterator[TrainingPool]:
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=get_context("spawn")) as executor:
        yield TrainingPool(executor)
