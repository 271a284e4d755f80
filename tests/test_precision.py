"""matmul_weights_in: bit-identical results under autocast, originals restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill_mixins.precision import matmul_weights_in


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(512, 4))


def test_same_results_under_autocast_and_originals_restored():
    model = net().requires_grad_(False)
    x = torch.randn(5, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(x)
        with matmul_weights_in(model):
            assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
            fast = model(x)
    assert torch.equal(reference, fast)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_restored_on_error():
    model = net()
    pointer = model[0].weight.data_ptr()
    with pytest.raises(RuntimeError, match="boom"), matmul_weights_in(model):
        raise RuntimeError("boom")
    assert model[0].weight.data_ptr() == pointer and model[0].weight.dtype == torch.float32
