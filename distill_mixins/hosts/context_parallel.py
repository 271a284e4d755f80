"""Context parallel (CP, Ulysses) for the diffusers video transformers the hosts drive.

:func:`enable_context_parallel` makes ``net``'s forward context-parallel over a process group of size ``P``, with the
library's CP convention (:mod:`distill_mixins.parallel.ulysses`, the same as ``TinyVideoDiT``):

- every rank gets the same full inputs and returns the same full output (B, C, T, H, W);
- inside, the tokens (B, S, D) after the patch embedding, S = T'*H'*W' in T'-major order, are split into contiguous
  chunks in rank order (rank r holds ``[r S/P, (r+1) S/P)``), together with everything per token: the rotary
  embeddings, Wan's per-token timestep (B, S) (``expand_timesteps``), Cosmos' per-token time embeddings
  (B, S, D) and learnable positional embedding. Text tokens (cross-attention keys/values) are not split;
- self-attention is :func:`~distill_mixins.parallel.ulysses.ulysses_attention` over the group (``P`` must divide
  the number of heads: a ValueError at enable time); cross-attention runs locally (local queries, whole text);
- the output of ``proj_out`` (the last layer with parameters) is gathered along the tokens before unpatchify;
- split rule: along the frames when ``P`` divides T', else along the flattened tokens when ``P`` divides S (both
  are the same contiguous chunks, T' being the slowest axis), else a ValueError at forward time.

Gradients: each rank's parameter gradients cover its local tokens only; their SUM over the CP group is the
single-process gradient (the split is a slice, the gather's backward takes the local slice of the gradient,
:func:`~distill_mixins.parallel.ulysses.gather_sequence`). Block outputs (GAN feature taps) are the local chunk
(B, S/P, D).

Mechanism, both models: the library's own. Forward pre-hooks / forward hooks (callable objects, never a patched
``forward``) split the inputs and outputs a :class:`ContextParallelPlan` names, and a library attention processor
(:class:`WanUlyssesProcessor`, :class:`CosmosUlyssesProcessor`, which compute what the model's own self-attention
processor computes, with :func:`ulysses_attention` as the attention) replaces the self-attention processors.

Why not diffusers' own context parallel (``ModelMixin.enable_parallelism(config=ContextParallelConfig(...))`` with
the Wan ``_cp_plan``), checked with diffusers 0.42.1:

- Cosmos has no ``_cp_plan``, and its processors pass no ``parallel_config`` to the attention dispatch;
- on a machine without an accelerator ``enable_parallelism`` fails before doing anything
  (``ModelMixin._resolve_parallel_config`` computes ``rank % torch.accelerator.device_count()``: ZeroDivisionError),
  so it cannot be used or tested on CPU / gloo;
- its hooks (``HookRegistry``) replace ``module.forward`` on the instance with a closure over the original
  module's forward: ``copy.deepcopy`` of a hooked network gives a copy whose forward runs the *original*'s
  parameters (checked with a plain ``nn.Linear``), which breaks the student / critic / EMA copies; the library's
  activation checkpointing also sets ``block.forward`` on the instance;
- an indivisible sequence fails with an ``assert`` inside the sharder, not a ValueError saying what to change.

Its pieces are otherwise training-correct (slice split, gather whose backward takes the local chunk, a Ulysses
autograd function whose backward is the reverse all-to-all); this module follows the same plan layout.

The library hooks are deep-copied with the network (the group is shared:
:class:`~distill_mixins.shared_ref.SharedRef`), survive FSDP2's ``fully_shard`` (it only adds its own hooks and
swaps the class; the argument positions are resolved at enable time) and the library's activation checkpointing
(hooks on a checkpointed block run once, outside the recomputation).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from diffusers import CosmosTransformer3DModel, WanTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from distill_mixins.hosts.wan_attention import wan_self_attention_qkv
from distill_mixins.parallel.ulysses import gather_sequence, group_size, split_sequence, token_split, ulysses_attention
from distill_mixins.shared_ref import SharedRef

__all__ = [
    "COSMOS_PLAN",
    "WAN_PLAN",
    "ContextParallelPlan",
    "CosmosUlyssesProcessor",
    "Split",
    "WanUlyssesProcessor",
    "context_parallel_group",
    "enable_context_parallel",
    "plan_for",
]


@dataclass(frozen=True)
class Split:
    """Split a per-token tensor along ``dim`` when it has ``ndim`` dimensions (else it is not per token: left as is)."""

    dim: int
    ndim: int


@dataclass(frozen=True)
class ContextParallelPlan:
    """Where a transformer is split and gathered. Module paths are dotted (``""`` the network, ``*`` every child of
    a ModuleList); a path whose module is None (an optional layer) is skipped.

    inputs: ``{path: {forward argument name: Split}}``, split before the module runs (``path`` ``""``: the network's
    own inputs); outputs: ``{path: Split}``, split the module's output (each tensor of a tuple); gather: the module
    whose output (B, S/P, D) is gathered along dim 1; self_attention: the self-attention modules, and
    processor/original: the library processor class set on them and the model's processor class it replaces.
    """

    inputs: dict[str, dict[str, Split]]
    outputs: dict[str, Split]
    gather: str
    self_attention: str
    processor: type
    original: type
    patch_size: str = "patch_size"
    heads: str = "num_attention_heads"


# ---------------------------------------------------------------------------------------------------- processors


class _UlyssesProcessor:
    """Base of the library's self-attention processors: holds the group and the processor it replaced."""

    def __init__(self, group: SharedRef, original: Any) -> None:
        self.cp = group
        self.original = original

    def attend(self, q: Tensor, k: Tensor, v: Tensor, layout: str) -> Tensor:
        """Attention of the local tokens over the whole sequence (q, k, v (B, S/P, H, D) or (B, H, S/P, D))."""
        return ulysses_attention(q, k, v, self.cp.value, layout=layout)


class WanUlyssesProcessor(_UlyssesProcessor):
    """Self-attention of a ``WanAttention`` (``attn1``) with Ulysses attention: what ``WanAttnProcessor`` computes
    for self-attention (projections, RMS norm of q and k across heads, rotary embedding, attention, output)."""

    def __call__(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """hidden_states (B, S/P, dim) local tokens, rotary_emb cos/sin (1, S/P, 1, head_dim) -> (B, S/P, dim)."""
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("WanUlyssesProcessor is for unmasked self-attention (attn1) only.")
        q, k, v = wan_self_attention_qkv(attn, hidden_states, rotary_emb)
        out = self.attend(q, k, v, "bshd").flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class CosmosUlyssesProcessor(_UlyssesProcessor):
    """Self-attention of a Cosmos block (``attn1``) with Ulysses attention: what ``CosmosAttnProcessor2_0`` computes
    for self-attention (projections, per-head RMS norm of q and k, rotary embedding, attention, output)."""

    def __call__(
        self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None, image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """hidden_states (B, S/P, dim) local tokens, image_rotary_emb cos/sin (S/P, head_dim) -> (B, S/P, dim)."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("CosmosUlyssesProcessor is for unmasked self-attention (attn1) only.")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, S/P, D)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            k = apply_rotary_emb(k, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        out = self.attend(q, k, v, "bhsd").transpose(1, 2).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


# ---------------------------------------------------------------------------------------------------- hooks


class _Hook:
    """Base of the library's CP hooks (recognised by :func:`_remove`); holds the shared group."""

    def __init__(self, group: SharedRef) -> None:
        self.cp = group

    def split(self, value: Any, split: Split) -> Any:
        """``value``'s local chunk (each tensor of a tuple/list) when it is a per-token tensor of ``split.ndim``."""
        if isinstance(value, (tuple, list)):
            return type(value)(self.split(v, split) for v in value)
        if isinstance(value, Tensor) and value.ndim == split.ndim:
            return split_sequence(value, split.dim, self.cp.value)
        return value


class _CheckTokens(_Hook):
    """Network pre-hook: ValueError unless the CP size divides T' or S of ``hidden_states`` (B, C, T, H, W)."""

    def __init__(self, group: SharedRef, position: int, patch_attribute: str) -> None:
        super().__init__(group)
        self.position, self.patch_attribute = position, patch_attribute

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[self.position]
        patch = tuple(getattr(module.config, self.patch_attribute))
        token_split(tuple(n // p for n, p in zip(x.shape[2:], patch, strict=True)), group_size(self.cp.value))


class _SplitInputs(_Hook):
    """Pre-hook: split the named per-token arguments (keyword, or positional at the resolved positions)."""

    def __init__(self, group: SharedRef, splits: dict[str, Split], positions: dict[str, int]) -> None:
        super().__init__(group)
        self.splits, self.positions = splits, positions

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        args = list(args)
        for name, split in self.splits.items():
            if name in kwargs:
                kwargs[name] = self.split(kwargs[name], split)
            elif self.positions[name] < len(args):
                args[self.positions[name]] = self.split(args[self.positions[name]], split)
        return tuple(args), kwargs


class _SplitOutput(_Hook):
    """Forward hook: split the module's per-token output (e.g. the rotary embedding's (cos, sin))."""

    def __init__(self, group: SharedRef, split: Split) -> None:
        super().__init__(group)
        self.split_spec = split

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.split(output, self.split_spec)


class _GatherOutput(_Hook):
    """Forward hook: gather the module's output (B, S/P, D) along the tokens into (B, S, D), in rank order."""

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return gather_sequence(output, 1, self.cp.value)


# ------------------------------------------------------------------------------------------------------ plans

WAN_PLAN = ContextParallelPlan(
    inputs={"": {"timestep": Split(1, 2)}, "blocks.0": {"hidden_states": Split(1, 3)}},
    outputs={"rope": Split(1, 4)},
    gather="proj_out",
    self_attention="blocks.*.attn1",
    processor=WanUlyssesProcessor,
    original=WanAttnProcessor,
)
"""Wan: the per-token timestep (B, S) (``expand_timesteps``; a (B,) timestep is left whole) at the network's
input, so its time embeddings and the final modulation are per local token; the tokens at block 0; the rotary
embedding's (cos, sin) (1, S, 1, head_dim); gather after ``proj_out``."""

_COSMOS_PER_TOKEN = {"embedded_timestep": Split(1, 3), "temb": Split(1, 3), "controlnet_residual": Split(1, 3)}
COSMOS_PLAN = ContextParallelPlan(
    inputs={
        "transformer_blocks.0": {"hidden_states": Split(1, 3)},
        "transformer_blocks.*": _COSMOS_PER_TOKEN,
        "norm_out": {"embedded_timestep": Split(1, 3), "temb": Split(1, 3)},
    },
    outputs={"rope": Split(0, 2), "learnable_pos_embed": Split(1, 3)},
    gather="proj_out",
    self_attention="transformer_blocks.*.attn1",
    processor=CosmosUlyssesProcessor,
    original=CosmosAttnProcessor2_0,
)
"""Cosmos: the forward expands per-frame time embeddings to per-token (B, S, D) tensors that it passes to every block
and to ``norm_out``, so those inputs are split at each of them (a (B, D) embedding of a (B,) timestep is left
whole); the tokens at block 0; the rotary (cos, sin) (S, head_dim) and the learnable positional embedding
(B, S, D) at their modules' outputs; gather after ``proj_out``."""

PLANS: dict[type, ContextParallelPlan] = {WanTransformer3DModel: WAN_PLAN, CosmosTransformer3DModel: COSMOS_PLAN}


def plan_for(net: nn.Module) -> ContextParallelPlan:
    """The CP plan of ``net``'s class (a TypeError naming the supported classes otherwise)."""
    for cls, plan in PLANS.items():
        if isinstance(net, cls):
            return plan
    names = ", ".join(cls.__name__ for cls in PLANS)
    raise TypeError(f"no context-parallel plan for {type(net).__name__}; supported: {names}.")


# ------------------------------------------------------------------------------------------------- apply


def _modules_at(net: nn.Module, path: str) -> list[nn.Module]:
    """The modules at dotted ``path`` (``*``: every child); none where an attribute is None."""
    modules = [net]
    for atom in filter(None, path.split(".")):
        found = []
        for module in modules:
            children = list(module.children()) if atom == "*" else [getattr(module, atom, None)]
            found += [child for child in children if child is not None]
        modules = found
    return modules


def _positions(module: nn.Module, names: list[str]) -> dict[str, int]:
    """Positional indices (self excluded) of ``names`` in ``type(module).forward``."""
    parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    missing = [n for n in names if n not in parameters]
    if missing:
        raise TypeError(f"{type(module).__name__}.forward has no argument {missing} (parameters: {parameters}).")
    return {n: parameters.index(n) for n in names}


def _check_heads(net: nn.Module, plan: ContextParallelPlan, p: int) -> None:
    heads = int(getattr(net.config, plan.heads))
    if heads % p:
        divisors = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(
            f"context parallel (Ulysses) for {type(net).__name__}: its {heads} attention heads are not divisible by "
            f"the CP size {p} (Ulysses splits the heads over the CP group); use a CP size that divides {heads} (one "
            f"of {divisors})."
        )


def _remove(net: nn.Module) -> None:
    """Remove every library CP hook and processor from ``net`` (restoring the model's processors)."""
    for module in net.modules():
        for hooks, kwargs in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                              (module._forward_hooks, module._forward_hooks_with_kwargs)):
            for key in [k for k, hook in hooks.items() if isinstance(hook, _Hook)]:
                hooks.pop(key)
                kwargs.pop(key, None)
        processor = getattr(module, "processor", None)
        if isinstance(processor, _UlyssesProcessor):
            module.set_processor(processor.original)
    net.__dict__.pop("_context_parallel", None)


def _install(net: nn.Module, plan: ContextParallelPlan, cp: SharedRef) -> None:
    """Register the plan's hooks and processors on ``net``."""
    net.register_forward_pre_hook(_CheckTokens(cp, _positions(net, ["hidden_states"])["hidden_states"],
                                               plan.patch_size), with_kwargs=True)
    for path, splits in plan.inputs.items():
        for module in _modules_at(net, path):
            hook = _SplitInputs(cp, splits, _positions(module, list(splits)))
            module.register_forward_pre_hook(hook, with_kwargs=True)
    for path, split in plan.outputs.items():
        for module in _modules_at(net, path):
            module.register_forward_hook(_SplitOutput(cp, split))
    for module in _modules_at(net, plan.gather):
        module.register_forward_hook(_GatherOutput(cp))
    for attn in _modules_at(net, plan.self_attention):
        if type(attn.processor) is not plan.original:
            raise TypeError(
                f"context parallel replaces {plan.original.__name__} on the self-attention of {type(net).__name__}; "
                f"found {type(attn.processor).__name__} (reset it with set_processor({plan.original.__name__}()))."
            )
        attn.set_processor(plan.processor(cp, attn.processor))
    net._context_parallel = cp


def context_parallel_group(net: nn.Module) -> ProcessGroup | None:
    """The CP group ``net`` runs over (None when context parallel is off)."""
    cp = net.__dict__.get("_context_parallel")
    return None if cp is None else cp.value


def enable_context_parallel(
    net: nn.Module, group: ProcessGroup | None, plan: ContextParallelPlan | None = None
) -> None:
    """Run ``net``'s forward context-parallel (Ulysses) over ``group``; None or a size-1 group: off (the network is
    left, or put back, exactly as without CP). ``plan``: default :func:`plan_for` ``net``.

    Idempotent: a second call replaces the first. A ValueError when the CP size does not divide the number of
    heads; at forward time, when it divides neither T' nor S of the input.
    """
    plan = plan or plan_for(net)
    p = 1 if group is None else group_size(group)
    if p > 1:
        _check_heads(net, plan, p)
    _remove(net)
    if p > 1:
        _install(net, plan, SharedRef(group))
