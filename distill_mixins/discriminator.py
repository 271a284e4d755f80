"""GAN heads on intermediate features tapped by forward hooks (DMD2, Yin et al. 2024, arXiv 2405.14867; MATH.md s. 4).

The discriminator of DMD2 is a set of small heads on features of a network that already understands
noisy videos: the frozen teacher (Cosmos-Transfer1, FastGen) or the critic (Cosmos-Predict2.5, blocks
``[11, 19, 27]`` of 28). The features are recorded by :class:`FeatureTaps`, which registers forward hooks on
the chosen blocks and never patches a forward, so the tapped network computes exactly what it computes
without taps. Recorded features keep their graph: the generator term backpropagates through a frozen
tapped network into the student's sample, and R1 differentiates the logits w.r.t. the real input.

Usage (what ``DMD2Mixin`` does)::

    blocks = find_blocks(net, config.block_path)        # or host.feature_blocks(net), preferred when present
    with FeatureTaps(blocks, config.taps) as taps:
        net(x_t, ...)                                    # one forward of the tapped network
    logits = discriminator(taps.features)               # (B,), mean over taps
    loss_g = gan_generator_loss(logits)                 # softplus(-D(fake))

Feature layouts: 5-D features are ``(B, C, T, H, W)`` (``layout="channels_first"``) or ``(B, T, H, W, C)``
(``layout="channels_last"``, the Cosmos DiT block layout); 3-D features are token sequences ``(B, N, D)``.
:class:`Conv3dHead` takes 5-D features; :class:`QueryAttentionHead` takes both (5-D flattened to ``T*H*W`` tokens)
and also (B, D) vectors as one token.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.hooks import RemovableHandle

from distill_mixins.config import TimeSamplerConfig, check_choice, check_positive, config_to_dict

KINDS = ("conv3d", "attention")
SOURCES = ("teacher", "critic")
LAYOUTS = ("channels_first", "channels_last")

# ----------------------------------------------------------------------------------------------- blocks


def find_blocks(net: nn.Module, path: str | None = None) -> nn.ModuleList | nn.Sequential:
    """The blocks feature taps index: ``net.<path>`` (dotted, e.g. ``"blocks"``), or the longest ``nn.ModuleList``.

    Hosts may instead define ``feature_blocks(net) -> Sequence[nn.Module]``; ``DMD2Mixin`` prefers it when present.
    """
    if path is None:
        return _longest_module_list(net)
    try:
        blocks = net.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"block_path={path!r}: {type(net).__name__} has no submodule {path!r} ({err}). "
            f"Module lists in this network: {_describe_lists(net) or 'none'}."
        ) from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"block_path={path!r} names a {type(blocks).__name__}, not an nn.ModuleList or nn.Sequential of blocks; "
            "point it at the list of blocks, or define feature_blocks(net) on the host."
        )
    return blocks


def _module_lists(net: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _describe_lists(net: nn.Module) -> str:
    return ", ".join(f"{name!r} ({len(m)})" for name, m in _module_lists(net))


def _longest_module_list(net: nn.Module) -> nn.ModuleList:
    lists = _module_lists(net)
    if not lists:
        raise ValueError(
            f"{type(net).__name__} has no nn.ModuleList of blocks to tap: pass DiscriminatorConfig.block_path "
            "(a dotted attribute path to the blocks) or define feature_blocks(net) on the host."
        )
    longest = max(len(m) for _, m in lists)
    best = [(name, m) for name, m in lists if len(m) == longest]
    if len(best) > 1:
        names = ", ".join(repr(name) for name, _ in best)
        raise ValueError(
            f"{type(net).__name__} has several longest nn.ModuleLists ({names}, {longest} modules each): "
            "pass DiscriminatorConfig.block_path to choose one."
        )
    return best[0][1]


# ------------------------------------------------------------------------------------------------- taps


def _first_tensor(output: Any, index: int, module: nn.Module) -> Tensor:
    """The block's output, or the first tensor of a tuple/list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(
        f"block {index} ({type(module).__name__}) returned {type(output).__name__}; a feature tap needs a Tensor "
        "or a tuple/list whose first tensor is the features. Define feature_blocks(net) on the host to tap "
        "modules that return tensors."
    )


class FeatureTaps:
    """Records the outputs of ``blocks[i]`` for ``i in indices`` with forward hooks (never a patched forward).

    Use as a context manager around one forward of the tapped network (or call ``attach()``/``remove()``);
    hooks are removed on exit, also on an exception. ``features`` lists the recorded tensors in the order of
    ``indices`` (a tuple output records its first tensor). Nothing is detached, so gradients flow through the
    features to the network's input even when its parameters are frozen. Negative indices count from the end.
    Run backward after the context exits: a checkpointed block recomputed inside it would fire its hook again.
    ``context_parallel_group``: the tapped network runs context-parallel over it (blocks output this rank's tokens
    (B, S/P, D)); ``features`` gathers the tokens (B, S, D), the gradient keeping the local chunk.
    """

    def __init__(
        self, blocks: Sequence[nn.Module] | nn.ModuleList | nn.Sequential, indices: Sequence[int],
        context_parallel_group: Any = None,
    ) -> None:
        self.blocks: list[nn.Module] = list(blocks)
        self.context_parallel_group = context_parallel_group
        n = len(self.blocks)
        if len(indices) == 0:
            raise ValueError("FeatureTaps needs at least one block index (DiscriminatorConfig.taps).")
        resolved = []
        for i in indices:
            i = operator.index(i)
            if not -n <= i < n:
                raise IndexError(
                    f"feature tap index {i} is out of range: the tapped network has {n} blocks "
                    f"(valid 0..{n - 1} or {-n}..-1). Fix DiscriminatorConfig.taps, or block_path if it names the "
                    "wrong list."
                )
            resolved.append(i % n)
        self.indices: tuple[int, ...] = tuple(resolved)
        self._records: list[list[Tensor]] = [[] for _ in self.indices]
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> FeatureTaps:
        """Register the hooks and clear previous records."""
        if self.attached:
            raise RuntimeError("FeatureTaps.attach(): the hooks are already attached; call remove() first.")
        self._records = [[] for _ in self.indices]
        for slot, index in enumerate(self.indices):
            self._handles.append(self.blocks[index].register_forward_hook(self._hook(slot, index)))
        return self

    def remove(self) -> None:
        """Remove the hooks (idempotent); the records stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, slot: int, index: int) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self._records[slot].append(_first_tensor(output, index, module))

        return record

    @property
    def features(self) -> list[Tensor]:
        """Recorded features in the order of ``indices``; each tapped block must have run exactly once."""
        out = []
        for index, record in zip(self.indices, self._records, strict=True):
            if not record:
                raise RuntimeError(
                    f"block {index} did not run: no forward of the tapped network ran inside this FeatureTaps "
                    "context, or its forward skips that block. Run the forward inside the `with` body, or tap "
                    "blocks that run."
                )
            if len(record) > 1:
                raise RuntimeError(
                    f"block {index} ran {len(record)} times inside one FeatureTaps context (e.g. a predict that "
                    "calls the network for several CFG branches, or a reused block); run one forward per context."
                )
            out.append(self._gathered(record[0], index))
        return out

    def _gathered(self, feature: Tensor, index: int) -> Tensor:
        """The feature of the whole clip: under context parallel, the tokens gathered over the group."""
        if self.context_parallel_group is None:
            return feature
        if feature.ndim != 3:
            raise ValueError(
                f"block {index} returned features of shape {tuple(feature.shape)} under context parallel; a tap "
                "gathers token features (B, S/P, D) along the tokens. Tap blocks that output tokens."
            )
        from distill_mixins.parallel.ulysses import gather_sequence  # lazily: parallel imports the core

        return gather_sequence(feature, 1, self.context_parallel_group)

    def __enter__(self) -> FeatureTaps:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


# ------------------------------------------------------------------------------------------------ heads


def _check_layout(owner: str, layout: str) -> None:
    check_choice(owner, "layout", layout, LAYOUTS)


def _channels_first(x: Tensor, layout: str) -> Tensor:
    """(B, C, T, H, W) view of a 5-D feature in ``layout``."""
    return x if layout == "channels_first" else x.permute(0, 4, 1, 2, 3)


def _to_tokens(x: Tensor, layout: str) -> Tensor:
    """(B, N, D) tokens: 3-D input as is; 2-D (B, D) as one token; 4-D image features (B, C, H, W) (or (B, H, W, C))
    flattened over (H, W) and 5-D over (T, H, W), D the channels."""
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x[:, None]
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2) if layout == "channels_first" else x.flatten(1, 2)
    if x.ndim == 5:
        return x.flatten(2).transpose(1, 2) if layout == "channels_first" else x.flatten(1, 3)
    raise ValueError(
        f"QueryAttentionHead got features of shape {tuple(x.shape)}; it takes tokens (B, N, D), vectors (B, D) "
        "4-D image features (B, C, H, W) / (B, H, W, C), or 5-D video features (B, C, T, H, W) / (B, T, H, W, C) "
        "(set layout)."
    )


class Conv3dHead(nn.Module):
    """Conv3d GAN head, Cosmos-Transfer1 style: (B, C, T, H, W) features -> logits (B,).

    A 1x1x1 projection to ``hidden`` channels, then ``num_layers`` 3x3x3 convolutions with spatial stride 2,
    each followed by GroupNorm and SiLU; a global mean over (T, H, W); a linear layer to one logit.
    ``layout="channels_last"`` takes (B, T, H, W, C) features instead.
    """

    def __init__(
        self, in_channels: int, hidden: int = 128, num_layers: int = 2, *, layout: str = "channels_first"
    ) -> None:
        super().__init__()
        _check_layout("Conv3dHead", layout)
        self.in_channels, self.layout = in_channels, layout
        layers: list[nn.Module] = [nn.Conv3d(in_channels, hidden, 1), _group_norm(hidden), nn.SiLU()]
        for _ in range(num_layers):
            layers += [nn.Conv3d(hidden, hidden, 3, stride=(1, 2, 2), padding=1), _group_norm(hidden), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, C, T, H, W) (or (B, T, H, W, C) with channels_last) -> logits (B,)."""
        if features.ndim != 5:
            raise ValueError(
                f"Conv3dHead got features of shape {tuple(features.shape)}; it takes 5-D video features "
                f"(layout={self.layout!r}). For token features (B, N, D) or image features (B, C, H, W) (e.g. a "
                "2D UNet that stacks frames as channels) use kind='attention'."
            )
        x = _channels_first(features, self.layout)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv3dHead(in_channels={self.in_channels}) got {x.shape[1]} channels (features "
                f"{tuple(features.shape)}, layout={self.layout!r}); set DiscriminatorConfig.feature_dim to the "
                "tapped blocks' width, or fix the layout."
            )
        return self.out(self.body(x).mean(dim=(2, 3, 4))).squeeze(-1)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class QueryAttentionHead(nn.Module):
    """Query-token attention GAN head, Cosmos-Predict2.5 style: tokens (B, N, D) -> logits (B,).

    ``num_queries`` learned query tokens cross-attend (``scaled_dot_product_attention``, ``heads`` heads of
    width ``hidden / heads``) to the layer-normed features; each attended query goes through an MLP to a logit;
    the logits are averaged over queries. 5-D features are flattened to ``T*H*W`` tokens (see ``layout``);
    2-D features (B, D) (e.g. an MLP's hidden layer) are one token.
    Attention uses PyTorch's math kernel: R1 differentiates the logits twice and the fused kernels (CPU flash,
    CUDA flash / memory-efficient) have no double backward; with few queries the cost is O(num_queries N).
    """

    def __init__(
        self, dim: int, num_queries: int = 1, heads: int = 4, hidden: int = 128, *, layout: str = "channels_first"
    ) -> None:
        super().__init__()
        _check_layout("QueryAttentionHead", layout)
        if hidden % heads != 0:
            raise ValueError(f"QueryAttentionHead: hidden={hidden} must be divisible by heads={heads}.")
        self.dim, self.heads, self.layout = dim, heads, layout
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * hidden)
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * hidden**-0.5)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor) -> Tensor:
        """features (B, N, D), (B, D), (B, C, T, H, W) or (B, T, H, W, C) -> logits (B,)."""
        tokens = _to_tokens(features, self.layout)
        if tokens.shape[-1] != self.dim:
            raise ValueError(
                f"QueryAttentionHead(dim={self.dim}) got features {tuple(features.shape)} with width "
                f"{tokens.shape[-1]} (layout={self.layout!r}); set DiscriminatorConfig.feature_dim to the tapped "
                "blocks' width, or fix the layout."
            )
        b, n, _ = tokens.shape
        k, v = self.kv(self.norm(tokens)).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, N, d) each
        q = self.queries.to(k.dtype).view(1, -1, self.heads, k.shape[-1]).transpose(1, 2).expand(b, -1, -1, -1)
        with sdpa_kernel(SDPBackend.MATH):
            attended = F.scaled_dot_product_attention(q, k, v)  # (B, h, Q, d)
        attended = self.proj(attended.transpose(1, 2).flatten(2))  # (B, Q, hidden)
        return self.mlp(attended).squeeze(-1).mean(dim=1)


class Discriminator(nn.Module):
    """One GAN head per tap; forward(features) -> logits (B,), the mean of the heads' logits (DMD2)."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(heads) == 0:
            raise ValueError("Discriminator needs at least one head (one per feature tap).")
        self.heads = nn.ModuleList(heads)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: one tensor per tap (as ``FeatureTaps.features``) -> logits (B,) averaged over taps.

        Each feature is cast to its head's parameter dtype (e.g. bf16 block outputs into a float32 head).
        """
        if len(features) != len(self.heads):
            raise ValueError(
                f"Discriminator has {len(self.heads)} heads but got {len(features)} features: give one feature "
                "per tap (DiscriminatorConfig.taps and feature_dim must have the same length)."
            )
        logits = []
        for head, feature in zip(self.heads, features, strict=True):
            param = next(head.parameters(), None)
            if param is not None and feature.is_floating_point():
                feature = feature.to(param.dtype)
            logits.append(head(feature))
        return torch.stack(logits).mean(dim=0)


# ----------------------------------------------------------------------------------------------- config


@dataclass(kw_only=True)
class DiscriminatorConfig:
    """GAN heads and feature taps of DMD2 (MATH.md section 4); one head per tap.

    ``kind``: ``conv3d`` (Cosmos-Transfer1) or ``attention`` (query tokens, Cosmos-Predict2.5).
    ``feature_dim``: width of the tapped blocks' features, one per tap (an int is used for every tap).
    ``taps``: block indices (negative counts from the end), e.g. Predict2.5's ``(11, 19, 27)`` of 28.
    ``block_path``: dotted path to the blocks (``None``: the host's ``feature_blocks(net)`` if defined,
    else the longest ``nn.ModuleList``). ``source``: tap the frozen ``teacher`` or the ``critic``.
    ``r1_weight``: weight of the R1 penalty on real inputs (StyleGAN2's ``gamma / 2``); 0 turns it off.
    ``time``: the GAN terms' own time law (``None``: the critic's time and re-noised sample, as the published
    recipes, sharing the tapped network's forward with the DMD term; set, the real and fake clips are re-noised at
    times drawn from it, one more forward of the tapped network per phase).
    """

    kind: str
    feature_dim: int | tuple[int, ...]
    taps: tuple[int, ...]
    block_path: str | None = None
    source: str = "teacher"
    layout: str = "channels_first"
    """5-D features: (B, C, T, H, W) ``channels_first`` or (B, T, H, W, C) ``channels_last`` (Cosmos DiT)."""
    hidden: int = 128
    num_layers: int = 2
    """Conv3d head: number of strided 3x3x3 convolutions after the 1x1x1 projection."""
    num_queries: int = 1
    """Attention head: number of learned query tokens."""
    heads: int = 4
    """Attention head: attention heads (``hidden`` must be divisible by it)."""
    r1_weight: float = 0.0
    time: TimeSamplerConfig | None = None

    def __post_init__(self) -> None:
        check_choice("DiscriminatorConfig", "kind", self.kind, KINDS)
        if self.time is not None and not isinstance(self.time, TimeSamplerConfig):
            raise TypeError(f"DiscriminatorConfig.time must be a TimeSamplerConfig or None (the critic's time), got "
                            f"{self.time!r}.")
        check_choice("DiscriminatorConfig", "source", self.source, SOURCES)
        check_choice("DiscriminatorConfig", "layout", self.layout, LAYOUTS)
        self.taps = _int_tuple("taps", self.taps)
        if not self.taps:
            raise ValueError("DiscriminatorConfig.taps is empty: give at least one block index, e.g. (11, 19, 27).")
        dims = (self.feature_dim,) * len(self.taps) if isinstance(self.feature_dim, int) else self.feature_dim
        self.feature_dim = _int_tuple("feature_dim", dims)
        if len(self.feature_dim) != len(self.taps):
            raise ValueError(
                f"DiscriminatorConfig.feature_dim={self.feature_dim} has {len(self.feature_dim)} entries for "
                f"{len(self.taps)} taps; give one width per tap, or a single int."
            )
        for name in ("hidden", "num_layers", "num_queries", "heads"):
            _check_positive_int(name, getattr(self, name))
        for dim in self.feature_dim:
            _check_positive_int("feature_dim", dim)
        if self.kind == "attention" and self.hidden % self.heads != 0:
            raise ValueError(f"DiscriminatorConfig.hidden={self.hidden} must be divisible by heads={self.heads}.")
        check_positive("DiscriminatorConfig", "r1_weight", self.r1_weight, allow_zero=True)
        if self.block_path is not None and (not isinstance(self.block_path, str) or not self.block_path):
            raise ValueError(f"DiscriminatorConfig.block_path={self.block_path!r} must be a dotted path or None.")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-ready values."""
        return config_to_dict(self)


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"DiscriminatorConfig.{name}={values!r} must be a tuple of ints.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"DiscriminatorConfig.{name}={values!r} must contain ints only.")
    return tuple(values)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DiscriminatorConfig.{name}={value!r} must be an int >= 1.")


def build_head(config: DiscriminatorConfig, feature_dim: int) -> nn.Module:
    """One GAN head of ``config.kind`` for features of width ``feature_dim``."""
    if config.kind == "conv3d":
        return Conv3dHead(feature_dim, config.hidden, config.num_layers, layout=config.layout)
    return QueryAttentionHead(feature_dim, config.num_queries, config.heads, config.hidden, layout=config.layout)


def build_discriminator(config: DiscriminatorConfig) -> Discriminator:
    """A :class:`Discriminator` with one head per tap of ``config``."""
    assert isinstance(config.feature_dim, tuple)  # normalized in __post_init__
    return Discriminator([build_head(config, dim) for dim in config.feature_dim])


# ----------------------------------------------------------------------------------------------- losses


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 or wider (half precision is promoted, float64 kept)."""
    return x if x.dtype == torch.float64 else x.float()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean softplus(-D(fake))`` (DMD2 eq. 6; Goodfellow et al. 2014)."""
    return F.softplus(-_wide(logits_fake)).mean()


def gan_discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """Discriminator loss ``mean softplus(D(fake)) + mean softplus(-D(real))`` (DMD2 eq. 7)."""
    return F.softplus(_wide(logits_fake)).mean() + F.softplus(-_wide(logits_real)).mean()


def r1_penalty(logits_real: Tensor, real_input: Tensor) -> Tensor:
    """R1 ``mean_b ||dD(x_b)/dx_b||^2`` (StyleGAN2, Karras et al. 2020), differentiable (``create_graph=True``).

    ``real_input`` is the noised real ``x_t`` (B, ...) fed to the tapped network; it must require grad before
    that forward (``x_real = add_noise(x0, eps, t, sigma_d).detach().requires_grad_(True)``). Per-sample
    gradients come from the gradient of ``sum_b D(x_b)``, exact when samples do not interact (no batch norm).
    """
    if not real_input.requires_grad:
        raise ValueError(
            "r1_penalty: real_input does not require grad; call .requires_grad_(True) on the noised real x_t "
            "before the tapped network's forward."
        )
    if not logits_real.requires_grad:
        raise ValueError("r1_penalty: logits_real has no graph (computed under torch.no_grad?); R1 needs it.")
    (grad,) = torch.autograd.grad(_wide(logits_real).sum(), real_input, create_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(
            "r1_penalty: logits_real do not depend on real_input; feed that very tensor to the tapped network."
        )
    return _wide(grad).pow(2).flatten(1).sum(dim=1).mean()


__all__ = [
    "Conv3dHead",
    "Discriminator",
    "DiscriminatorConfig",
    "FeatureTaps",
    "QueryAttentionHead",
    "build_discriminator",
    "build_head",
    "find_blocks",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "r1_penalty",
]
