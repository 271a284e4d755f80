"""Known answers for the per-GPU memory calculator (distill_mixins/parallel/memory.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distill_mixins.parallel.memory import (
    COSMOS_PREDICT25_2B,
    COSMOS_PREDICT25_14B,
    GIB,
    MemoryLayout,
    NetworkBytes,
    NetworkMemory,
    Recipe,
    count_parameters,
    discriminator_params,
    docs_tables,
    ema_of,
    estimate_memory,
    fit_mark,
    from_module,
    frozen_network,
    largest_block_params,
    measure_local_bytes,
    recipe_networks,
    recipe_table,
    trainable_network,
)
from tests.distributed import run_distributed

DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def tiny(ema: bool = False) -> list[NetworkMemory]:
    """1,000-parameter student, critic and teacher, all fp32, AdamW."""
    student = trainable_network("student", 1000)
    networks = [student, trainable_network("critic", 1000), frozen_network("teacher", 1000, param_bytes=4)]
    return networks + [ema_of(student)] if ema else networks


# ----------------------------------------------------------------------------------------------- known answers


def test_tiny_ddp_world_4_exact_bytes():
    est = estimate_memory(tiny(), "ddp", 4)
    # student, critic: 1000 x (4 weight + 4 grad + 2 x 4 AdamW) = 16,000 each; teacher: 1000 x 4 = 4,000
    assert [r.total for r in est.rows] == [16_000, 16_000, 4_000]
    assert (est.params, est.grads, est.optimizer, est.total) == (12_000, 8_000, 16_000, 36_000)
    assert est.transient == 0 and est.peak == 36_000


def test_tiny_fsdp_world_4_exact_bytes():
    est = estimate_memory(tiny(), "fsdp", 4)
    # 250 elements of each network per rank
    assert [r.total for r in est.rows] == [4_000, 4_000, 1_000]
    assert (est.params, est.grads, est.optimizer, est.total) == (3_000, 2_000, 4_000, 9_000)
    assert est.row("teacher").grads == 0 and est.row("teacher").optimizer == 0


@pytest.mark.parametrize("world_size", [2, 4, 8, 40])
def test_fsdp_is_ddp_over_world_size(world_size):
    ddp = estimate_memory(tiny(ema=True), "ddp", world_size)
    fsdp = estimate_memory(tiny(ema=True), "fsdp", world_size)
    for a, b in zip(ddp.rows, fsdp.rows, strict=True):
        assert (b.params, b.grads, b.optimizer) == (
            a.params / world_size,
            a.grads / world_size,
            a.optimizer / world_size,
        )
    assert fsdp.total * world_size == ddp.total


def test_fsdp_rounds_up_elements_per_rank():
    est = estimate_memory([trainable_network("s", 10)], "fsdp", 4)  # ceil(10 / 4) = 3 elements
    assert est.total == 3 * 16


def test_layout_shards():
    assert [MemoryLayout("ddp", 8).shards, MemoryLayout("fsdp", 8).shards, MemoryLayout("hsdp", 16, 8).shards] == [
        1,
        8,
        8,
    ]


def test_ddp_does_not_depend_on_world_size():
    assert estimate_memory(tiny(), "ddp", 1).rows == estimate_memory(tiny(), "ddp", 64).rows


@pytest.mark.parametrize(("world_size", "shard"), [(8, 4), (16, 8), (4, 4), (4, 1)])
def test_hsdp_equals_fsdp_at_shard_size(world_size, shard):
    hsdp = estimate_memory(tiny(ema=True), "hsdp", world_size, shard_size=shard, unsharded_blocks=2)
    fsdp = estimate_memory(tiny(ema=True), "fsdp", shard, unsharded_blocks=2)
    ddp = estimate_memory(tiny(ema=True), "ddp", world_size)
    assert hsdp.rows == (fsdp if shard > 1 else ddp).rows
    assert hsdp.total == (fsdp if shard > 1 else ddp).total


@pytest.mark.parametrize(("mode", "world_size"), [("ddp", 4), ("fsdp", 4), ("fsdp", 8)])
def test_ema_adds_one_fp32_student_copy(mode, world_size):
    without = estimate_memory(tiny(), mode, world_size)
    with_ema = estimate_memory(tiny(ema=True), mode, world_size)
    shards = 1 if mode == "ddp" else world_size
    assert with_ema.total - without.total == 4 * 1000 // shards
    assert with_ema.grads == without.grads and with_ema.optimizer == without.optimizer
    assert with_ema.row("ema").params == 4 * 1000 // shards


def test_unsharded_network_is_replicated_under_fsdp():
    head = NetworkMemory("head", 100, True, 4, 4, 2, sharded=False)
    assert estimate_memory([head], "fsdp", 4).total == 1600


def test_transient_is_separate_and_zero_under_ddp():
    nets = [trainable_network("student", 1000, largest_block=100), frozen_network("teacher", 1000, largest_block=300)]
    fsdp = estimate_memory(nets, "fsdp", 4, unsharded_blocks=2)
    assert fsdp.transient == 2 * 300 * 2  # two units of the largest (300) in bf16
    assert fsdp.peak == fsdp.total + fsdp.transient
    assert fsdp.total == estimate_memory(nets, "fsdp", 4).total
    assert estimate_memory(nets, "ddp", 4, unsharded_blocks=2).transient == 0


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "zero3", "world_size": 4}, "mode"),
        ({"mode": "fsdp", "world_size": 0}, "world_size"),
        ({"mode": "fsdp", "world_size": True}, "world_size"),
        ({"mode": "fsdp", "world_size": 2.0}, "world_size"),
        ({"mode": "hsdp", "world_size": 8}, "shard_size"),
        ({"mode": "hsdp", "world_size": 8, "shard_size": 3}, "shard_size"),
        ({"mode": "fsdp", "world_size": 8, "shard_size": 4}, "shard_size"),
        ({"mode": "fsdp", "world_size": 8, "unsharded_blocks": -1}, "unsharded_blocks"),
    ],
)
def test_bad_layout_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        estimate_memory(tiny(), **kwargs)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("t", 10, False, 2, 4, 0), "grad_bytes"),
        (("t", 10, False, 2, 0, 2), "optimizer_states"),
        (("s", -1, True, 4, 4, 2), "params"),
        (("s", 10, True, 0, 4, 2), "param_bytes"),
        (("", 10, True, 4, 4, 2), "name"),
        (("s", 10, "yes", 4, 4, 2), "trainable"),
    ],
)
def test_bad_network_raises_naming_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        NetworkMemory(*args)


def test_largest_block_cannot_exceed_params():
    with pytest.raises(ValueError, match="largest_block"):
        trainable_network("s", 10, largest_block=11)


def test_duplicate_and_empty_networks_raise():
    with pytest.raises(ValueError, match="duplicate"):
        estimate_memory([trainable_network("s", 1), trainable_network("s", 1)], "ddp", 1)
    with pytest.raises(ValueError, match="networks"):
        estimate_memory([], "ddp", 1)


# ----------------------------------------------------------------------------------------------- real modules


def test_from_module_counts_a_linear_exactly():
    lin = nn.Linear(10, 6)  # 60 + 6 parameters
    net = from_module("lin", lin)
    assert (net.params, net.trainable, net.param_bytes, net.grad_bytes, net.optimizer_states) == (66, True, 4, 4, 2)
    assert estimate_memory([net], "ddp", 2).total == 66 * 16
    assert estimate_memory([net], "fsdp", 2).total == 33 * 16
    frozen = from_module("teacher", nn.Linear(10, 6).to(torch.bfloat16).requires_grad_(False))
    assert (frozen.trainable, frozen.param_bytes, frozen.grad_bytes, frozen.optimizer_states) == (False, 2, 0, 0)
    assert from_module("lin", lin, trainable=False).trainable is False


def test_from_module_rejects_mixed_dtypes_without_param_bytes():
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ValueError, match="param_bytes"):
        from_module("mixed", mixed)
    assert from_module("mixed", mixed, param_bytes=4).param_bytes == 4


class Blocks(nn.Module):
    def __init__(self, head_out: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))  # 20 parameters each
        self.head = nn.Linear(4, head_out)


def test_largest_block_is_a_block_or_the_rest():
    assert largest_block_params(Blocks(1)) == 20  # head: 5 parameters
    assert largest_block_params(Blocks(10)) == 50  # head: 50 parameters
    assert largest_block_params(nn.Linear(3, 3)) == 12


def test_measure_local_bytes_after_an_adamw_step():
    lin = nn.Linear(10, 6)
    opt = torch.optim.AdamW(lin.parameters())
    assert measure_local_bytes(lin, opt) == NetworkBytes("measured", 264, 0, 0)
    lin(torch.randn(3, 10)).sum().backward()
    opt.step()
    measured = measure_local_bytes(lin, opt, name="lin")
    assert (measured.params, measured.grads) == (264, 264)
    steps = sum(opt.state[p]["step"].numel() * opt.state[p]["step"].element_size() for p in lin.parameters())
    assert measured.optimizer - steps == 2 * 264  # two fp32 states; the formula leaves out the step scalars
    assert estimate_memory([from_module("lin", lin)], "ddp", 1).total == measured.total - steps


def _fsdp_rank(rank: int, world_size: int) -> dict[str, int]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))  # 54 + 28 = 82 parameters
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    measured = measure_local_bytes(model, opt)
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    return {
        "count": count_parameters(model),
        "params": measured.params,
        "grads": measured.grads,
        "optimizer": measured.optimizer - steps,
    }


def test_dtensor_local_shards_match_the_fsdp_formula():
    ranks = run_distributed(_fsdp_rank, 2, timeout=120)
    # rows split on dim 0: weight (6, 8) -> 3 rows, bias 3, weight (4, 6) -> 2 rows, bias 2: 41 elements per rank
    assert ranks == [{"count": 82, "params": 164, "grads": 164, "optimizer": 328}] * 2
    ddp = estimate_memory([trainable_network("model", 82)], "ddp", 2)
    fsdp = estimate_memory([trainable_network("model", 82)], "fsdp", 2)
    assert fsdp.row("model") == NetworkBytes("model", 164, 164, 328)
    assert sum(ranks[0][k] for k in ("params", "grads", "optimizer")) <= 0.55 * ddp.total


# ----------------------------------------------------------------------------------------------- recipes


def test_cosmos_parameter_counts():
    assert COSMOS_PREDICT25_2B.params == 2_059_174_912
    assert COSMOS_PREDICT25_14B.params == 14_368_047_104


def test_cosmos_counts_match_diffusers_on_meta():
    diffusers = pytest.importorskip("diffusers")
    for arch, heads in ((COSMOS_PREDICT25_2B, 16), (COSMOS_PREDICT25_14B, 40)):
        with torch.device("meta"):
            net = diffusers.CosmosTransformer3DModel(
                in_channels=17,
                out_channels=16,
                num_attention_heads=heads,
                attention_head_dim=128,
                num_layers=arch.blocks,
                rope_scale=(1.0, 3.0, 3.0),
                extra_pos_embed_type=None,
                use_crossattn_projection=True,
                crossattn_proj_in_channels=100352,
                encoder_hidden_states_channels=1024,
            )
        assert count_parameters(net) == arch.params
        assert count_parameters(net.transformer_blocks[0]) == arch.block_params


def test_discriminator_heads_hand_count():
    d, h = 2048, 128  # attention head: LayerNorm(d), kv Linear(d, 2h), 1 query, proj Linear(h, h), MLP
    head = 2 * d + (d * 2 * h + 2 * h) + h + (h * h + h) + 2 * h + (h * h + h) + (h + 1)
    assert discriminator_params(d) == 3 * head == 1_686_531


def test_recipe_totals():
    p = COSMOS_PREDICT25_2B.params
    base = estimate_memory(recipe_networks(Recipe(COSMOS_PREDICT25_2B)), "ddp", 8)
    assert base.total == (2 + 16 + 16) * p  # bf16 teacher, student and critic with fp32 master + AdamW
    ema = estimate_memory(recipe_networks(Recipe(COSMOS_PREDICT25_2B, ema=True)), "ddp", 8)
    assert ema.total - base.total == 4 * p
    gan = estimate_memory(recipe_networks(Recipe(COSMOS_PREDICT25_2B, discriminator=True)), "ddp", 8)
    assert gan.total - base.total == 16 * 1_686_531
    q = COSMOS_PREDICT25_14B.params
    fsdp = estimate_memory(recipe_networks(Recipe(COSMOS_PREDICT25_14B)), "fsdp", 8)
    assert fsdp.total == 34 * math.ceil(q / 8)


def test_fit_marks():
    assert fit_mark(80 * 10**9) == "✓" and fit_mark(80 * 10**9 + 1) == "◑"
    assert fit_mark(141 * 10**9) == "◑" and fit_mark(141 * 10**9 + 1) == "✗"


def test_recipe_table_rows():
    table = recipe_table()
    lines = table.splitlines()
    assert len(lines) == 2 + 8  # header, rule, 2 teachers x (EMA, GAN) on/off
    assert "| Cosmos-Predict2.5-14B | DMD2 | 133.8 | 107.1 | 214.1 | 455.0 ✗ | 56.9 ✓ |" in table
    assert f"{34 * COSMOS_PREDICT25_2B.params / GIB:.1f} ✓" in lines[2]


def test_docs_hold_the_generated_tables():
    assert docs_tables() in DOCS.read_text(encoding="utf-8")


def test_live_bytes_known_answer():
    """Two 4 MB products alive at once at most (the first freed before the third is made); the weights excluded."""
    from distill_mixins.parallel.memory import LiveBytes

    w = torch.randn(1000, 1000)
    with LiveBytes(existing={w.untyped_storage().data_ptr()}) as tracker:
        a = w @ w
        b = a * 2
        del a
        c = b + 1
    assert tracker.peak == 8_000_000 and c.shape == w.shape
