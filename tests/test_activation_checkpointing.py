"""Activation checkpointing of the trainable networks' blocks: same losses, gradients and state dicts as without it,
less saved activation memory, GAN feature taps unaffected, and the same step under FSDP2 on 2 gloo processes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distill_mixins import DiscriminatorConfig, DMD2Config, DMD2Mixin, KDConfig, KDMixin, OptimizerConfig
from distill_mixins.discriminator import FeatureTaps
from distill_mixins.parallel.activation import (
    apply_activation_checkpointing,
    check_activation_checkpointing,
    checkpoint_networks,
    checkpointed_indices,
    graph_networks,
    is_activation_checkpointed,
    network_blocks,
    remove_activation_checkpointing,
    saved_activation_bytes,
)
from distill_mixins.testing import MLPDenoiser, ToyHost
from distill_mixins.toy.host import ToyVideo2World
from distill_mixins.toy.unet import ToyUNet
from tests.distributed import run_distributed

torch.set_num_threads(1)

B, T, H, W = 2, 4, 16, 16
PROMPTS = ["red square moving left", "blue circle moving up", "green square moving down", "red circle moving right"]
BLOCKS = 8  # ToyUNet(widths=(8, 16), blocks=1): 2 down, 2 middle, 4 up ResBlocks
ADAM = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)


class ToyKD(KDMixin, ToyVideo2World):
    """KD on the toy Video2World host."""


class ToyDMD2(DMD2Mixin, ToyVideo2World):
    """DMD2 on the toy Video2World host."""


class PromptTable(nn.Module):
    """Stands in for ToyTextEncoder (which loads transformers, seconds per process): prompts -> fixed random
    embeddings (B, 16), seeded by the prompt's bytes; the empty prompt is zeros."""

    def forward(self, prompts: list[str]) -> torch.Tensor:
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(sum(p.encode()))) for p in prompts]
        return torch.stack([row * bool(p) for row, p in zip(rows, prompts, strict=True)])


def teacher_parts() -> tuple[ToyUNet, PromptTable]:
    """The tiny teacher UNet (8 ResBlocks) and a prompt table."""
    torch.manual_seed(0)
    return ToyUNet(frames=T, widths=(8, 16), blocks=1, emb_dim=32, text_dim=16), PromptTable()


def nudge(net: nn.Module, seed: int = 1) -> None:
    """Move a copy of the teacher off it (the toy UNet's last convolutions start at zero: no gradient otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def make_kd() -> ToyKD:
    model = ToyKD(*teacher_parts(), distill=KDConfig(student_optimizer=ADAM))
    nudge(model.net)
    return model


def make_dmd2(source: str = "teacher") -> ToyDMD2:
    """DMD2 with query-attention GAN heads on blocks 2 (16 channels) and -1 (8 channels), and R1."""
    disc = DiscriminatorConfig(
        kind="attention", feature_dim=(16, 8), taps=(2, -1), source=source, hidden=16, heads=2, r1_weight=0.1
    )
    config = DMD2Config(
        gan_loss_weight=0.1, discriminator=disc, guidance_scale=2.0, student_optimizer=ADAM, critic_optimizer=ADAM,
        discriminator_optimizer=ADAM,
    )
    model = ToyDMD2(*teacher_parts(), distill=config)
    nudge(model.net, 1)
    nudge(model.net_fake_score, 2)
    return model


def clips(n: int = B, seed: int = 0, kd: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"clip": torch.rand(n, 3, T, H, W, generator=g) * 2 - 1, "prompt": PROMPTS[:n]}
    if kd:
        batch["noise"] = torch.randn(n, 3, T, H, W, generator=g)
        batch["teacher_x0"] = torch.rand(n, 3, T, H, W, generator=g)
    return batch


def step(model: nn.Module, batch: dict, iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every parameter gradient of one training step (seeded: the same draws for every model)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    _, loss = model.training_step(batch, iteration)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(plain: tuple, checkpointed: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = plain, checkpointed
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-6, msg=name)


def recompute_counter(model: nn.Module, net: str = "net") -> list[int]:
    """Counts runs of a conv *inside* the first block of ``net``: 2 per forward when it is recomputed."""
    calls: list[int] = []
    block = network_blocks(model, model._modules[net])[0]
    block.conv1.register_forward_hook(lambda m, i, o: calls.append(1))
    return calls


# ------------------------------------------------------------------------------------ same numbers


def test_kd_student_step_is_the_same_with_and_without_checkpointing():
    plain = make_kd()
    model = copy.deepcopy(plain)
    assert checkpoint_networks(model, "full") == {"net": BLOCKS}
    runs = recompute_counter(model)
    batch = clips(kd=True)
    assert_same_step(step(plain, batch, 0), step(model, batch, 0))
    assert len(runs) == 2  # one forward, one recomputation in the backward


@pytest.mark.parametrize("source", ["teacher", "critic"])
@pytest.mark.parametrize("iteration", [0, 1], ids=["student", "critic"])
def test_dmd2_with_gan_heads_is_the_same_with_and_without_checkpointing(source, iteration):
    """Student phase: the GAN generator term backpropagates through the taps of the frozen teacher or critic into
    the checkpointed student; critic phase: through the checkpointed critic, with R1's double backward. The tapped
    teacher keeps a graph, so it is checkpointed too (graph_networks)."""
    plain = make_dmd2(source)
    model = copy.deepcopy(plain)
    expected = {"net": BLOCKS, "net_fake_score": BLOCKS} | ({"net_teacher": BLOCKS} if source == "teacher" else {})
    assert graph_networks(model) == list(expected)
    assert checkpoint_networks(model, "full") == expected
    runs = recompute_counter(model, "net" if iteration == 0 else "net_fake_score")
    batch = clips()
    assert_same_step(step(plain, batch, iteration), step(model, batch, iteration))
    assert len(runs) > 1 and not any(m._forward_hooks for m in model.net_teacher.modules())


def test_every_second_block_of_the_trained_networks_only_gives_the_same_student_step():
    plain = make_dmd2("teacher")
    model = copy.deepcopy(plain)
    assert checkpoint_networks(model, 2, networks=("net", "net_fake_score")) == {"net": 4, "net_fake_score": 4}
    batch = clips()
    assert_same_step(step(plain, batch, 0), step(model, batch, 0))


class MLPDMD2(DMD2Mixin, ToyHost):
    """DMD2 on an MLP host without feature_blocks: the GAN taps use DiscriminatorConfig.block_path."""


def test_without_feature_blocks_the_taps_block_path_is_checkpointed():
    torch.manual_seed(0)
    teacher = MLPDenoiser((2, 2, 1, 1), "rf_velocity", num_labels=2, hidden=16, depth=3)
    disc = DiscriminatorConfig(kind="attention", feature_dim=16, taps=(1, 3), block_path="body", hidden=8, heads=2)
    config = DMD2Config(gan_loss_weight=0.1, discriminator=disc, student_optimizer=ADAM, critic_optimizer=ADAM,
                        discriminator_optimizer=ADAM, guidance_scale=2.0)
    plain = MLPDMD2(teacher, "rf_velocity", distill=config)
    nudge(plain.net)
    model = copy.deepcopy(plain)
    layers = len(model.net.body)  # Linear, SiLU, Linear, SiLU, ...
    assert checkpoint_networks(model, "full") == dict.fromkeys(("net", "net_fake_score", "net_teacher"), layers)
    g = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(8, 2, 2, 1, 1, generator=g), "label": torch.randint(0, 2, (8,), generator=g)}
    for iteration in (0, 1):
        assert_same_step(step(plain, batch, iteration), step(model, batch, iteration))


def test_taps_on_checkpointed_blocks_record_once_even_when_backward_runs_inside_the_context():
    """The recomputation calls the block's forward directly: hooks on the block itself never fire twice."""
    model = make_dmd2("critic")
    blocks = network_blocks(model, model.net_fake_score)
    apply_activation_checkpointing(blocks, "full")
    data = model.prepare_data(clips())
    x_t = torch.randn_like(data.x0, requires_grad=True)
    t = torch.full((B,), 0.7, dtype=torch.float64)
    inner = recompute_counter(model, "net_fake_score")
    with FeatureTaps(blocks, (0, 2)) as taps:
        model.trigflow_denoise(model.net_fake_score, x_t, t, data.condition).x0.sum().backward()
        features = taps.features  # would raise "ran 2 times" if the recomputation fired the taps
    assert len(features) == 2 and len(inner) == 2 and x_t.grad is not None


# ------------------------------------------------------------------------------ state and structure


def test_state_dict_keys_values_and_classes_are_unchanged():
    plain = make_dmd2()
    model = copy.deepcopy(plain)
    classes = [type(m) for m in model.modules()]
    checkpoint_networks(model, "full")
    a, b = plain.state_dict(), model.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [type(m) for m in model.modules()] == classes
    model.load_state_dict(a)  # cross-loading in both directions
    plain.load_state_dict(b)
    assert all(is_activation_checkpointed(m) for m in network_blocks(model, model.net))


def test_a_deep_copy_checkpoints_its_own_blocks():
    """EMA and critic copies are made with deepcopy: the copy's checkpointed forward must run the copy."""
    model = make_kd()
    checkpoint_networks(model, "full")
    copied = copy.deepcopy(model.net)
    block, original = copied.down[0], model.net.down[0]
    assert is_activation_checkpointed(block) and block.forward.block is block
    with torch.no_grad():
        block.conv1.weight.add_(1.0)
    x, emb = torch.randn(1, 8, 4, 4).requires_grad_(), torch.randn(1, 32)
    assert not torch.allclose(block(x, emb), original(x, emb))


def test_apply_is_idempotent_removable_and_refuses_a_conflicting_policy():
    model = make_kd()
    blocks = network_blocks(model, model.net)
    assert apply_activation_checkpointing(blocks, 2) == BLOCKS // 2
    assert [i for i, b in enumerate(blocks) if is_activation_checkpointed(b)] == [1, 3, 5, 7]
    assert apply_activation_checkpointing(blocks, 2) == 0
    assert apply_activation_checkpointing(blocks, "full") == BLOCKS // 2  # the other half
    with pytest.raises(ValueError, match="remove_activation_checkpointing"):
        apply_activation_checkpointing(blocks, 4)
    assert remove_activation_checkpointing(blocks) == BLOCKS
    assert not any(is_activation_checkpointed(b) for b in blocks) and "forward" not in blocks[0].__dict__
    assert apply_activation_checkpointing(blocks, "none") == 0


# ----------------------------------------------------------------------------------------- memory


def measure(model: nn.Module, batch: dict, policy, networks=None) -> tuple[int, dict[str, int]]:
    """Saved activation bytes of a student step of a copy of ``model`` checkpointed with ``policy``."""
    model = copy.deepcopy(model)
    counts = checkpoint_networks(model, policy, networks)
    torch.manual_seed(5)
    nbytes = saved_activation_bytes(lambda: model.training_step(batch, 0)[1], [model])
    assert any(p.grad is not None for p in model.net.parameters())  # the backward ran
    return nbytes, counts


@pytest.mark.parametrize("method", ["KD", "DMD2+GAN(teacher)", "DMD2+GAN(critic)"])
def test_full_checkpointing_saves_less_and_every_second_block_is_half(method):
    model = make_kd() if method == "KD" else make_dmd2("critic" if "critic" in method else "teacher")
    batch = clips(kd=method == "KD")
    (none, _), (every2, counts2), (full, _) = (measure(model, batch, p) for p in ("none", 2, "full"))
    assert counts2["net"] == BLOCKS // 2
    print(f"\n{method} student step: saved activations full/none = {full / none:.3f}, 2/none = {every2 / none:.3f}")
    assert full < every2 < none and full < 0.5 * none
    if method == "DMD2+GAN(teacher)":  # the tapped teacher's graph is most of what is left
        trained_only, _ = measure(model, batch, "full", ("net", "net_fake_score"))
        print(f"{method}, student and critic only: full/none = {trained_only / none:.3f}")
        assert full < trained_only < none


def test_saved_activation_bytes_counts_distinct_storages_once_and_skips_weights():
    lin = nn.Linear(4, 4, bias=False)
    x = torch.randn(3, 4, requires_grad=True)
    # mul saves both operands (the same storage, counted once); the linear layer saves x and its weight (excluded)
    assert saved_activation_bytes(lambda: (x * x).sum()) == x.nbytes
    assert saved_activation_bytes(lambda: lin(x).sum(), [lin]) == x.nbytes
    assert x.grad is not None and lin.weight.grad is not None  # backward ran
    assert saved_activation_bytes(lambda: lin(x).sum(), backward=False) == x.nbytes + lin.weight.nbytes


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", ["all", "Full", "2", 0, -1, True, 1.5, None])
def test_bad_policies_name_the_field_the_value_and_the_choices(bad):
    with pytest.raises(ValueError, match=r"ParallelConfig\.activation_checkpointing=.*'none', 'full', or an int"):
        check_activation_checkpointing(bad)


def test_policies_choose_every_kth_block_counting_from_one():
    assert check_activation_checkpointing("full") == "full" and check_activation_checkpointing(3) == 3
    assert checkpointed_indices(5, "none") == [] and checkpointed_indices(5, "full") == [0, 1, 2, 3, 4]
    assert checkpointed_indices(5, 1) == [0, 1, 2, 3, 4]
    assert checkpointed_indices(5, 2) == [1, 3] and checkpointed_indices(7, 3) == [2, 5]


def test_network_blocks_prefers_the_host_then_module_lists_and_names_the_fix():
    model = make_kd()
    assert network_blocks(model, model.net) == [*model.net.down, *model.net.middle, *model.net.up]
    plain_host = nn.Module()  # no feature_blocks: the modules of the net's direct-child ModuleLists
    assert network_blocks(plain_host, model.net) == [
        *model.net.down, *model.net.downsample, *model.net.middle, *model.net.up
    ]
    mlp = MLPDenoiser((2, 2, 1, 1), "rf_velocity", 2, hidden=8, depth=2)
    host = ToyHost(mlp, "rf_velocity")
    with pytest.raises(ValueError, match=r"define feature_blocks\(net\)"):
        network_blocks(host, mlp)
    assert network_blocks(host, mlp, path="body") == list(mlp.body)


def test_a_network_with_its_own_gradient_checkpointing_is_refused():
    model = make_kd()
    model.net.is_gradient_checkpointing = True
    with pytest.raises(ValueError, match="own gradient checkpointing"):
        checkpoint_networks(model, "full")
    assert checkpoint_networks(model, "none") == {}  # nothing is wrapped, nothing is checked


# ------------------------------------------------------------------------------------ FSDP2, 2 ranks


def fsdp_kd_step(rank: int, world_size: int) -> dict:
    """One KD step on this rank's half of the batch, FSDP2 on the student, with and without checkpointing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    batch = clips(n=2 * world_size, kd=True)
    local = {k: v[rank * 2 : rank * 2 + 2] for k, v in batch.items()}
    results = {}
    for policy in ("none", "full"):
        model = make_kd()
        model.set_data_parallel(rank, world_size)
        model.net.to(memory_format=torch.contiguous_format)  # FSDP2 refuses the toy UNet's channels-last weights
        checkpoint_networks(model, policy)  # before sharding
        for block in network_blocks(model, model.net):
            fully_shard(block, mesh=mesh)
        fully_shard(model.net, mesh=mesh)
        runs = recompute_counter(model)
        loss, grads = step(model, local, 0)
        results[policy + "_runs"] = len(runs)
        results[policy] = (loss, {n: g.full_tensor() for n, g in grads.items()})
        results[policy + "_keys"] = list(model.state_dict())
        results[policy + "_checkpointed"] = sum(map(is_activation_checkpointed, network_blocks(model, model.net)))
    return results


def test_fsdp2_step_is_the_same_with_and_without_checkpointing():
    ranks = run_distributed(fsdp_kd_step, 2)
    for result in ranks:
        assert result["full_checkpointed"] == BLOCKS and result["none_checkpointed"] == 0
        assert (result["none_runs"], result["full_runs"]) == (1, 2)  # recomputed under FSDP2
        assert result["full_keys"] == result["none_keys"]
        assert_same_step(result["none"], result["full"])
    torch.testing.assert_close(ranks[0]["full"][1], ranks[1]["full"][1], rtol=0, atol=0)  # gathered gradients
