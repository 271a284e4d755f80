"""GAN heads on tapped features: hooks leave outputs unchanged and go away, known-answer losses and R1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill_mixins.config import TimeSamplerConfig
from distill_mixins.discriminator import (
    Conv3dHead,
    Discriminator,
    DiscriminatorConfig,
    FeatureTaps,
    QueryAttentionHead,
    build_discriminator,
    find_blocks,
    gan_discriminator_loss,
    gan_generator_loss,
    r1_penalty,
)
from distill_mixins.run_config import build_dataclass

torch.set_num_threads(1)

B, C, T, H, W = 2, 4, 3, 4, 4


class ConvBlock(nn.Module):
    """Residual conv block on (B, C, T, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.nn.functional.silu(x))


class TupleBlock(ConvBlock):
    """A block that returns (features, aux), like many DiT blocks."""

    def forward(self, x):
        y = super().forward(x)
        return y, y.mean()


class ConvNet(nn.Module):
    """stem -> 4 blocks (ModuleList) -> out; a shorter ModuleList elsewhere; ``depth`` skips late blocks."""

    def __init__(self, tuple_blocks: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv3d(2, C, 1)
        block = TupleBlock if tuple_blocks else ConvBlock
        self.blocks = nn.ModuleList([block(C) for _ in range(4)])
        self.extras = nn.ModuleList([nn.Identity(), nn.Identity()])
        self.out = nn.Conv3d(C, 2, 1)

    def forward(self, x, depth: int = 4):
        h = self.stem(x)
        for block in self.blocks[:depth]:
            h = block(h)
            h = h[0] if isinstance(h, tuple) else h
        return self.out(h)


class TokenBlock(nn.Module):
    """Pre-norm residual MLP on tokens (B, N, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(x))))


class TokenNet(nn.Module):
    """A tiny transformer-like net on (B, N, D) with ``transformer_blocks``."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TokenBlock(dim) for _ in range(depth)])

    def forward(self, x):
        h = self.embed(x)
        for block in self.transformer_blocks:
            h = block(h)
        return h


def conv_net(**kwargs) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(**kwargs)


def video(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 2, T, H, W, generator=torch.Generator().manual_seed(seed))


def hooks_left(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


# ------------------------------------------------------------------------------------------------- taps


def test_taps_leave_the_output_bit_identical_and_are_removed_on_exit():
    net, x = conv_net(), video()
    expected = net(x)
    with FeatureTaps(net.blocks, [0, 2]) as taps:
        assert hooks_left(net) == 2 and taps.attached
        out = net(x)
    assert torch.equal(out, expected)
    assert hooks_left(net) == 0 and not taps.attached
    assert all(len(block._forward_hooks) == 0 for block in net.blocks)


def test_an_exception_inside_the_with_body_still_removes_the_hooks():
    net = conv_net()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(net.blocks, [1, 3]):
            net(video())
            raise RuntimeError("boom")
    assert hooks_left(net) == 0


def test_recorded_features_equal_the_block_outputs_computed_by_hand_in_index_order():
    net, x = conv_net(), video()
    with torch.no_grad():
        by_hand = [net.stem(x)]
        for block in net.blocks:
            by_hand.append(block(by_hand[-1]))  # by_hand[i + 1] = output of block i
        with FeatureTaps(net.blocks, [3, 0, -2]) as taps:
            net(x)
    assert taps.indices == (3, 0, 2)
    for feature, index in zip(taps.features, (3, 0, 2), strict=True):
        assert torch.equal(feature, by_hand[index + 1])


def test_a_tuple_output_records_its_first_tensor_and_a_dict_output_is_refused():
    net, x = conv_net(tuple_blocks=True), video()
    with torch.no_grad(), FeatureTaps(net.blocks, [0]) as taps:
        net(x)
    assert torch.equal(taps.features[0], net.blocks[0](net.stem(x))[0].detach())

    class DictBlock(nn.Module):
        def forward(self, x):
            return {"x": x}

    with pytest.raises(TypeError, match=r"block 0 \(DictBlock\) returned dict"):
        with FeatureTaps([DictBlock()], [0]) as taps:
            taps.blocks[0](x)


def test_index_out_of_range_names_the_number_of_blocks():
    net = conv_net()
    with pytest.raises(IndexError, match="index 4 is out of range: the tapped network has 4 blocks"):
        FeatureTaps(net.blocks, [1, 4])
    with pytest.raises(IndexError, match="has 4 blocks"):
        FeatureTaps(net.blocks, [-5])
    with pytest.raises(ValueError, match="at least one block index"):
        FeatureTaps(net.blocks, [])


def test_a_tap_that_did_not_run_or_ran_twice_is_an_error_and_records_reset_on_attach():
    net, x = conv_net(), video()
    with torch.no_grad(), FeatureTaps(net.blocks, [1, 3]) as taps:
        net(x, depth=2)
    with pytest.raises(RuntimeError, match="block 3 did not run"):
        _ = taps.features
    with torch.no_grad(), taps:
        net(x)
        net(x)
    with pytest.raises(RuntimeError, match="block 1 ran 2 times"):
        _ = taps.features
    with torch.no_grad(), taps:  # re-attaching clears the previous records
        net(x)
    assert len(taps.features) == 2
    taps.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        taps.attach()
    taps.remove()
    taps.remove()  # idempotent
    assert hooks_left(net) == 0


# ----------------------------------------------------------------------------------------------- blocks


def test_find_blocks_by_path_and_by_the_longest_module_list():
    net, tok = conv_net(), TokenNet()
    assert find_blocks(net, "blocks") is net.blocks
    assert find_blocks(net, "extras") is net.extras
    assert find_blocks(net) is net.blocks  # 4 > 2
    assert find_blocks(tok, "transformer_blocks") is tok.transformer_blocks
    assert find_blocks(tok) is tok.transformer_blocks
    with pytest.raises(ValueError, match=r"no submodule 'layers'.*'blocks' \(4\), 'extras' \(2\)"):
        find_blocks(net, "layers")
    with pytest.raises(TypeError, match="names a Conv3d"):
        find_blocks(net, "stem")
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks.*block_path"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    tied = nn.Module()
    tied.a, tied.b = nn.ModuleList([nn.Identity()] * 2), nn.ModuleList([nn.Identity()] * 2)
    with pytest.raises(ValueError, match="several longest.*'a', 'b'.*block_path"):
        find_blocks(tied)


# ------------------------------------------------------------------------------------------------ heads


def test_head_output_shapes_for_both_layouts():
    torch.manual_seed(0)
    feats = torch.randn(B, C, T, H, W)
    conv = Conv3dHead(C, hidden=8, num_layers=2)
    assert conv(feats).shape == (B,)
    conv_last = Conv3dHead(C, hidden=8, layout="channels_last")
    conv_last.load_state_dict(conv.state_dict())
    assert torch.allclose(conv_last(feats.permute(0, 2, 3, 4, 1)), conv(feats), atol=1e-6)
    attn = QueryAttentionHead(C, num_queries=3, heads=2, hidden=8)
    tokens = feats.flatten(2).transpose(1, 2)  # (B, T*H*W, C)
    assert attn(tokens).shape == (B,)
    assert torch.equal(attn(feats), attn(tokens))  # 5-D features are flattened to T*H*W tokens
    vectors = torch.randn(B, C)
    assert torch.equal(attn(vectors), attn(vectors[:, None]))  # (B, D) is one token
    attn_last = QueryAttentionHead(C, num_queries=3, heads=2, hidden=8, layout="channels_last")
    attn_last.load_state_dict(attn.state_dict())
    assert torch.equal(attn_last(feats.permute(0, 2, 3, 4, 1)), attn(tokens))
    image = feats[:, :, 0]  # (B, C, H, W): image features (e.g. a frames-as-channels UNet) are H*W tokens
    assert torch.equal(attn(image), attn(image.flatten(2).transpose(1, 2)))
    assert torch.equal(attn_last(image.permute(0, 2, 3, 1)), attn(image))
    with pytest.raises(ValueError, match="takes 5-D video features"):
        conv(tokens)
    with pytest.raises(ValueError, match=r"image features \(B, C, H, W\).*kind='attention'"):
        conv(image)
    with pytest.raises(ValueError, match=r"in_channels=4\) got 5 channels.*feature_dim"):
        conv(torch.randn(B, 5, T, H, W))
    with pytest.raises(ValueError, match=r"dim=4\) got features .* width 6"):
        attn(torch.randn(B, 7, 6))
    with pytest.raises(ValueError, match="divisible by heads"):
        QueryAttentionHead(C, heads=3, hidden=8)


def test_several_taps_combined_give_the_mean_of_the_per_head_logits():
    torch.manual_seed(0)
    heads = [Conv3dHead(C, hidden=8), QueryAttentionHead(C, hidden=8), Conv3dHead(C, hidden=4, num_layers=1)]
    feats = [torch.randn(B, C, T, H, W) for _ in heads]
    disc = Discriminator(heads)
    expected = (heads[0](feats[0]) + heads[1](feats[1]) + heads[2](feats[2])) / 3
    assert torch.allclose(disc(feats), expected, atol=1e-7, rtol=0)
    assert disc([f.double() for f in feats]).dtype == torch.float32  # features cast to the head dtype
    with pytest.raises(ValueError, match="3 heads but got 2 features"):
        disc(feats[:2])


# ------------------------------------------------------------------------------------------- gradients


def test_generator_gradient_reaches_the_student_through_a_frozen_tapped_net():
    net = conv_net().requires_grad_(False)
    student = nn.Conv3d(2, 2, 1)
    disc = Discriminator([Conv3dHead(C, hidden=8), Conv3dHead(C, hidden=8)])
    z = video()
    with FeatureTaps(net.blocks, [1, 3]) as taps:
        net(student(z))
    gan_generator_loss(disc(taps.features)).backward()
    via_taps = student.weight.grad.clone()
    assert all(p.grad is None for p in net.parameters())
    student.zero_grad()
    h, outputs = net.stem(student(z)), []  # the same loss with the features computed by hand
    for block in net.blocks:
        h = block(h)
        outputs.append(h)
    gan_generator_loss(disc([outputs[1], outputs[3]])).backward()
    print(f"student grad norm through taps {via_taps.norm():.3e}")
    assert via_taps.abs().sum() > 0
    assert torch.allclose(via_taps, student.weight.grad, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------- losses


def test_gan_losses_against_hand_values():
    zeros = torch.zeros(4)
    assert gan_generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert gan_discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    logits = torch.tensor([1.0, -2.0])
    g = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2  # softplus(-x)
    assert gan_generator_loss(logits).item() == pytest.approx(g, rel=1e-6)
    fake, real = torch.tensor([0.5]), torch.tensor([3.0])
    d = math.log1p(math.exp(0.5)) + math.log1p(math.exp(-3.0))
    assert gan_discriminator_loss(fake, real).item() == pytest.approx(d, rel=1e-6)
    assert gan_generator_loss(torch.tensor([-200.0], dtype=torch.bfloat16)).item() == pytest.approx(200.0)


def test_r1_of_a_linear_discriminator_is_the_squared_norm_of_its_weights():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, T, H, W, generator=g, dtype=torch.float64)
    x = torch.randn(3, 2, T, H, W, generator=g, dtype=torch.float64).requires_grad_(True)
    logits = (x * a).flatten(1).sum(1)  # D(x) = <a, x>
    r1 = r1_penalty(logits, x)
    print(f"R1 {r1.item():.12f} vs ||a||^2 {a.pow(2).sum().item():.12f}")
    assert r1.dtype == torch.float64
    assert r1.item() == pytest.approx(a.pow(2).sum().item(), rel=1e-12)
    with pytest.raises(ValueError, match="does not require grad"):
        r1_penalty(logits, x.detach())
    with pytest.raises(ValueError, match="has no graph"):
        r1_penalty(logits.detach(), x)
    with pytest.raises(ValueError, match="do not depend on real_input"):
        r1_penalty(logits, torch.zeros(3, requires_grad=True))


def test_r1_through_taps_and_an_attention_head_matches_the_jacobian_and_backpropagates():
    torch.manual_seed(0)
    net = TokenNet(dim=8).requires_grad_(False)
    disc = Discriminator([QueryAttentionHead(8, num_queries=2, heads=2, hidden=8)])

    def logits_of(x):
        with FeatureTaps(find_blocks(net), [1]) as taps:
            net(x)
        return disc(taps.features)

    x = torch.randn(2, 5, 8).requires_grad_(True)
    r1 = r1_penalty(logits_of(x), x)
    jac = torch.autograd.functional.jacobian(logits_of, x.detach())  # (B, B, N, D); samples independent
    expected = sum(jac[b, b].pow(2).sum() for b in range(2)) / 2
    assert torch.allclose(r1, expected, rtol=1e-5)
    r1.backward()  # double backward through SDPA (math kernel)
    head = disc.heads[0]
    assert head.mlp[-1].bias.grad is None  # dD/dx does not depend on the last bias
    for p in (head.queries, head.kv.weight, head.proj.weight, head.mlp[1].weight):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- config


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"DiscriminatorConfig.kind='mlp' is not known; choose one of conv3d"):
        DiscriminatorConfig(kind="mlp", feature_dim=4, taps=(1,))
    with pytest.raises(ValueError, match="DiscriminatorConfig.source"):
        DiscriminatorConfig(kind="conv3d", feature_dim=4, taps=(1,), source="student")
    with pytest.raises(ValueError, match="DiscriminatorConfig.layout"):
        DiscriminatorConfig(kind="conv3d", feature_dim=4, taps=(1,), layout="bthwc")
    with pytest.raises(ValueError, match="2 entries for 3 taps"):
        DiscriminatorConfig(kind="conv3d", feature_dim=(4, 4), taps=(1, 2, 3))
    with pytest.raises(ValueError, match="taps is empty"):
        DiscriminatorConfig(kind="conv3d", feature_dim=4, taps=())
    with pytest.raises(TypeError, match="taps=.* must contain ints"):
        DiscriminatorConfig(kind="conv3d", feature_dim=4, taps=(1.5,))
    with pytest.raises(ValueError, match="hidden=10 must be divisible by heads=4"):
        DiscriminatorConfig(kind="attention", feature_dim=4, taps=(1,), hidden=10)
    with pytest.raises(ValueError, match="DiscriminatorConfig.r1_weight"):
        DiscriminatorConfig(kind="conv3d", feature_dim=4, taps=(1,), r1_weight=-1.0)
    with pytest.raises(ValueError, match="DiscriminatorConfig.num_queries=0"):
        DiscriminatorConfig(kind="attention", feature_dim=4, taps=(1,), num_queries=0)
    config = DiscriminatorConfig(kind="attention", feature_dim=8, taps=[11, 19, 27])
    assert config.taps == (11, 19, 27) and config.feature_dim == (8, 8, 8)
    assert config.to_dict()["taps"] == [11, 19, 27]
    with pytest.raises(TypeError, match="DiscriminatorConfig.time must be a TimeSamplerConfig or None"):
        DiscriminatorConfig(kind="attention", feature_dim=4, taps=(1,), time="uniform")
    timed = DiscriminatorConfig(kind="attention", feature_dim=8, taps=(1,), time=TimeSamplerConfig(kind="uniform"))
    assert build_dataclass(DiscriminatorConfig, timed.to_dict(), "distill.discriminator") == timed  # run.json form


@pytest.mark.parametrize("kind", ["conv3d", "attention"])
def test_built_discriminator_on_taps_of_a_conv_net(kind):
    net, x = conv_net(), video()
    config = DiscriminatorConfig(kind=kind, feature_dim=C, taps=(0, -1), block_path="blocks", hidden=8, heads=2)
    disc = build_discriminator(config)
    assert len(disc.heads) == 2
    assert all(type(h) is (Conv3dHead if kind == "conv3d" else QueryAttentionHead) for h in disc.heads)
    with FeatureTaps(find_blocks(net, config.block_path), config.taps) as taps:
        net(x)
    logits = disc(taps.features)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    expected = (disc.heads[0](taps.features[0]) + disc.heads[1](taps.features[1])) / 2
    assert torch.allclose(logits, expected, atol=1e-7, rtol=0)
