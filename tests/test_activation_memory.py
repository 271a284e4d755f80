"""The CP activation-memory calculator (distill_mixins.parallel.activation_memory): its formula against measured
saved-for-backward bytes of a TinyVideoDiT, its architecture numbers against memory.py, and the table's CP scaling.

Tolerance of the measured check: the formula leaves out the per-sample conditioning (time MLP and label embedding:
a few ``dim``-sized vectors per clip: 146 float32 elements at dim 64) and nothing else, so the whole-model measurement
must exceed the formula by 0 to 1 % (the 1 % leaves room for a torch version that saves one more small per-clip
tensor); the per-block slope (depth 2 minus depth 1) has no per-sample term and must be exact.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from distill_mixins.parallel.activation import saved_activation_bytes
from distill_mixins.parallel.activation_memory import (
    COSMOS_2B,
    COSMOS_14B,
    activation_table,
    block_terms,
    context_split,
    cosmos_block_params,
    docs_tables,
    estimate_activations,
    latent_frames,
    tiny_video_dit_shape,
    token_grid,
)
from distill_mixins.parallel.memory import COSMOS_PREDICT25_2B, COSMOS_PREDICT25_14B, GIB
from distill_mixins.testing.transformer import TinyVideoDiT

torch.set_num_threads(1)
FP32 = 4
TOLERANCE = 0.01


def _measure(model: TinyVideoDiT, size: tuple[int, int, int]) -> int:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, model.channels, *size, generator=g)
    time, labels = torch.rand(1, generator=g), torch.tensor([0])
    return saved_activation_bytes(lambda: model(x, time, labels).sum(), exclude=[model])


@pytest.mark.parametrize(("dim", "heads", "mlp_ratio"), [(64, 4, 4), (48, 2, 2)])
def test_formula_matches_measured_tiny_video_dit(dim, heads, mlp_ratio):
    size = (4, 16, 16)  # patch (1, 2, 2): grid (4, 8, 8), S = 256
    measured, formula = {}, {}
    for depth in (1, 2):
        model = TinyVideoDiT(4, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, seed=0)
        grid = tuple(n // p for n, p in zip(size, model.patch, strict=True))
        estimate = estimate_activations(tiny_video_dit_shape(model), grid, 1, dtype_bytes=FP32)
        measured[depth], formula[depth] = _measure(model, size), estimate.saved
        assert estimate.transient == 0
        assert 0 <= measured[depth] - formula[depth] <= TOLERANCE * formula[depth], (measured, formula)
    s, h = 256, dim  # per block: (10 + 2r) h + 4 LayerNorm statistics + logsumexp per head, float32
    per_block = s * ((10 + 2 * mlp_ratio) * h + 4 + heads) * FP32
    assert measured[2] - measured[1] == formula[2] - formula[1] == per_block


def test_architecture_numbers_match_memory_py():
    for shape, arch, heads in ((COSMOS_2B, COSMOS_PREDICT25_2B, 16), (COSMOS_14B, COSMOS_PREDICT25_14B, 40)):
        assert (shape.hidden, shape.blocks, shape.heads, shape.mlp_ratio) == (arch.width, arch.blocks, heads, 4)
        assert cosmos_block_params(shape) == arch.block_params


def test_token_grid():
    assert [latent_frames(f) for f in (1, 93, 121)] == [1, 24, 31]
    assert token_grid(93, 704, 1280) == (24, 44, 80)
    assert token_grid(121, 704, 1280) == (31, 44, 80)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        latent_frames(94)
    assert context_split((24, 44, 80), 8, 16) == "frames"
    assert context_split((31, 44, 80), 8, 40) == "tokens"
    with pytest.raises(ValueError, match="does not divide heads=40"):
        context_split((24, 44, 80), 3, 40)
    with pytest.raises(ValueError, match="divides neither"):
        context_split((3, 1, 1), 2)


def test_known_answer_2b_93_frames_cp8():
    s_local, h = 84_480 // 8, 2048
    per_token = 30 * h * 2 + (6 + 5 * 16) * FP32  # 30 h in bf16 at P > 1; LN stats, logsumexp, rstd in float32
    text = 512 * (3 * h * 2 + 16 * FP32)  # text k, v and the k norm input, replicated
    estimate = estimate_activations(COSMOS_2B, (24, 44, 80), 8)
    assert estimate.blocks == 28 * (s_local * per_token + text)
    assert estimate.transient == 6 * s_local * h * 2
    outside = s_local * (68 + 3 * h + 128) * 2 + s_local * 2 * FP32 + 512 * 1024 * 2
    assert estimate.outside == outside


@pytest.mark.parametrize("shape", [COSMOS_2B, COSMOS_14B])
@pytest.mark.parametrize("frames", [93, 121])
def test_cp_scaling(shape, frames):
    grid = token_grid(frames, 704, 1280)
    s, h = math.prod(grid), shape.hidden
    text = shape.blocks * shape.text_tokens * (3 * h * 2 + shape.heads * FP32)  # replicated: does not scale
    local = {p: estimate_activations(shape, grid, p).blocks - text for p in (1, 2, 4, 8)}
    # per-rank token activations scale as 1 / P ...
    assert local[2] * 2 == local[4] * 4 == local[8] * 8
    # ... and P = 1 saves one h per token per block less (no Ulysses head -> seq copy before the out projection)
    assert local[1] == local[2] * 2 - shape.blocks * s * h * 2
    transient = {p: estimate_activations(shape, grid, p).transient for p in (1, 2, 4, 8)}
    assert transient[1] == 0 and transient[2] * 2 == transient[4] * 4 == transient[8] * 8
    full = {p: estimate_activations(shape, grid, p, checkpointing="full") for p in (1, 2, 4, 8)}
    assert all(full[p].total < estimate_activations(shape, grid, p).total / 5 for p in full)


def test_block_terms_tiny_at_cp2():
    model = TinyVideoDiT(4, dim=64, depth=1, heads=4, seed=0)
    shape = tiny_video_dit_shape(model)
    h_terms = {p: sum(t.elements for t in block_terms(shape, p) if t.bytes_per_element is None) for p in (1, 2)}
    assert h_terms == {1: 18 * 64, 2: 17 * 64}


def test_table():
    table = activation_table()
    lines = table.splitlines()
    assert lines[0] == "| model | clip (frames, HxW) | tokens T'xH'xW' (split) | CP 1 | CP 2 | CP 4 | CP 8 |"
    assert len(lines) == 2 + 4
    row = next(line for line in lines if line.startswith("| Cosmos-Predict2.5-14B | 121,"))
    assert "31x44x80 = 109,120 (tokens)" in row and row.count("✗") == 4  # above 80 GiB even at CP 8
    cp8 = estimate_activations(COSMOS_14B, (31, 44, 80), 8).total
    assert f"{cp8 / GIB:.1f} ✗" in row
    assert "✗" not in activation_table(checkpointing="full")


def test_module_prints_the_tables():
    out = subprocess.run(
        [sys.executable, "-m", "distill_mixins.parallel.activation_memory"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == docs_tables().strip()
    assert "| Cosmos-Predict2.5-2B | 93, 704x1280 |" in out
