"""Deterministic seeding and RNG isolation for callbacks that sample."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from distill_mixins.draws import mixed_seed as draws_mixed_seed


def mixed_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` (an epoch, a micro-batch, a sample) of a run seeded ``seed``: numpy
    ``SeedSequence`` mixing, so neighbouring indices give unrelated streams."""
    return draws_mixed_seed(seed, index)  # one implementation: the method draws' (distill_mixins.draws)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block (visuals, validation) without moving the training RNGs: torch (CPU, CUDA), numpy, Python."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
