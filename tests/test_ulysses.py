"""Ulysses attention at CP=2 (gloo, two CPU processes) against the same computation on one process.

All CP=2 cases run in one launch (:func:`_cp2`, a module-scoped fixture); each rank returns its local results and
the tests compare them with full-sequence references computed here, in the test process. The error cases run
first in that launch, so the later cases also show that no rank was left behind by an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distill_mixins.parallel.ulysses import (
    gather_sequence,
    head_to_seq,
    seq_to_head,
    split_sequence,
    ulysses_attention,
)
from tests.distributed import run_distributed

CP = 2
B, S, H, D = 2, 8, 4, 8
DIM = H * D
ATTENTION_CASES = {  # name: (causal, scale)
    "plain": (False, None), "causal": (True, None), "scale": (False, 0.3), "causal_scale": (True, 0.3),
}


def _data() -> dict[str, torch.Tensor]:
    """The full tensors, identical in every process."""
    g = torch.Generator().manual_seed(0)
    names = ["x", "w", "q", "k", "v", "g"]
    data = {n: torch.randn(B, S, H, D, generator=g) for n in names}
    data["tokens"] = torch.randn(B, S, DIM, generator=g)
    data["g_tokens"] = torch.randn(B, S, DIM, generator=g)
    return data


def _tokens(t: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s chunk of dim 1 (the reference for split_sequence)."""
    n = t.shape[1] // CP
    return t[:, rank * n : (rank + 1) * n]


def _heads(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = t.shape[2] // CP
    return t[:, :, rank * n : (rank + 1) * n]


def _sdpa(q, k, v, scale=None, causal=False):
    """Full attention on (B, S, H, D) tensors, on one process."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


class TinyBlock(nn.Module):
    """LayerNorm + qkv Linear + (Ulysses) attention + out Linear, with a residual; (B, S, DIM) tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x, group=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, H, D).unbind(2)
        return x + self.out(ulysses_attention(q, k, v, group, causal=True).reshape(b, s, DIM))


def _block() -> TinyBlock:
    torch.manual_seed(1)
    return TinyBlock()


def _errors(rank: int, group) -> dict[str, str]:
    messages = {}
    try:  # 3 heads at CP=2
        t = torch.randn(B, S // CP, 3, D)
        ulysses_attention(t, t, t, group)
    except ValueError as error:
        messages["heads"] = str(error)
    try:  # rank 0 holds 4 tokens, rank 1 holds 3
        t = torch.randn(B, 4 - rank, H, D)
        ulysses_attention(t, t, t, group)
    except ValueError as error:
        messages["lengths"] = str(error)
    try:
        split_sequence(torch.randn(B, 7, DIM), 1, group)
    except ValueError as error:
        messages["split"] = str(error)
    return messages


def _cp2(rank: int, world_size: int) -> dict[str, object]:
    group = dist.new_group(list(range(world_size)))
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank takes part in creating each group
    data = _data()
    out: dict[str, object] = {"errors": _errors(rank, group)}

    # 1. seq_to_head / head_to_seq: values and gradients of a nonlinear loss on the output
    x = _leaf(split_sequence(data["x"], 1, group))
    y = seq_to_head(x, group)
    (y.pow(3) * _heads(data["w"], rank)).sum().backward()
    out["seq_to_head"] = (y.detach(), head_to_seq(y.detach(), group), x.grad)
    z = _leaf(_heads(data["x"], rank))
    y = head_to_seq(z, group)
    (y.pow(3) * _tokens(data["w"], rank)).sum().backward()
    out["head_to_seq"] = (y.detach(), seq_to_head(y.detach(), group), z.grad)

    # 2. ulysses_attention: local outputs and q/k/v gradients of a loss on the local outputs
    def attend(name, group=group, layout="bshd", **kwargs):
        q, k, v = (_leaf(split_sequence(data[n], 1, group)) for n in "qkv")
        args = [t.transpose(1, 2) if layout == "bhsd" else t for t in (q, k, v)]
        o = ulysses_attention(*args, group, layout=layout, **kwargs)
        o = o.transpose(1, 2) if layout == "bhsd" else o
        (o * split_sequence(data["g"], 1, group)).sum().backward()
        out[f"attention/{name}"] = (o.detach(), q.grad, k.grad, v.grad)

    for name, (causal, scale) in ATTENTION_CASES.items():
        attend(name, causal=causal, scale=scale)
    attend("default_group", group=None, causal=True)
    attend("bhsd", layout="bhsd", causal=True, scale=0.3)
    calls = []

    def custom(q, k, v, *, layout, scale, causal):
        calls.append((layout, tuple(q.shape), scale, causal))
        return _sdpa(q, k, v, scale=scale, causal=causal)

    attend("callable", attention=custom, causal=True, scale=0.3)
    out["calls"] = calls
    attend("single", group=singles[rank], causal=True)  # a group of one: the whole sequence, no exchange

    # kv replicated (cross-attention): q sharded, k and v whole on every rank
    q = _leaf(split_sequence(data["q"], 1, group))
    k, v = _leaf(data["k"]), _leaf(data["v"])
    o = ulysses_attention(q, k, v, group, kv_sharded=False, scale=0.3)
    (o * split_sequence(data["g"], 1, group)).sum().backward()
    out["attention/kv_replicated"] = (o.detach(), q.grad, k.grad, v.grad)

    # 3. a tiny transformer block on sequence-sharded tokens; parameter gradients summed over the CP group
    for loss_on in ("local", "gathered"):
        block = _block()
        tokens = _leaf(split_sequence(data["tokens"], 1, group))
        y = block(tokens, group)
        if loss_on == "local":  # the loss of the whole sequence is the sum of the per-chunk terms
            (y * split_sequence(data["g_tokens"], 1, group)).sum().backward()
        else:  # every rank computes the same loss on the gathered output
            (gather_sequence(y, 1, group) * data["g_tokens"]).sum().backward()
        grads = {}
        for n, p in block.named_parameters():
            dist.all_reduce(p.grad, group=group)  # each rank's gradient covers its own tokens only: sum them
            grads[n] = p.grad
        out[f"block/{loss_on}"] = (y.detach(), tokens.grad, grads)

    # gather_sequence: the same loss on every rank from the gathered tensor; dims 1 and -1
    for dim in (1, -1):
        x = _leaf(data["x"].chunk(CP, dim)[rank])
        y = gather_sequence(x, dim, group)
        (y.pow(3) * data["w"]).sum().backward()
        out[f"gather/{dim}"] = (y.detach(), x.grad)
    return out


@pytest.fixture(scope="module")
def cp2() -> list[dict[str, object]]:
    return run_distributed(_cp2, CP)


def _close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def test_seq_to_head_round_trip_and_gradients(cp2):
    data = _data()
    x = _leaf(data["x"])
    (x.pow(3) * data["w"]).sum().backward()  # the sum of the ranks' losses, on the full tensor
    for rank, result in enumerate(cp2):
        y, back, grad = result["seq_to_head"]
        assert y.shape == (B, S, H // CP, D)
        assert torch.equal(y, _heads(data["x"], rank))  # every token of this rank's heads
        assert torch.equal(back, _tokens(data["x"], rank))  # the round trip is exact
        _close(grad, _tokens(x.grad, rank), 1e-6)
        y, back, grad = result["head_to_seq"]
        assert y.shape == (B, S // CP, H, D)
        assert torch.equal(y, _tokens(data["x"], rank))
        assert torch.equal(back, _heads(data["x"], rank))
        _close(grad, _heads(x.grad, rank), 1e-6)


def _reference(scale=None, causal=False, kv_sharded=True):
    data = _data()
    q, k, v = (_leaf(data[n]) for n in "qkv")
    o = _sdpa(q, k, v, scale=scale, causal=causal)
    (o * data["g"]).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    "name, causal, scale",
    [(n, c, s) for n, (c, s) in ATTENTION_CASES.items()]
    + [("default_group", True, None), ("bhsd", True, 0.3), ("callable", True, 0.3)],
)
def test_ulysses_attention_matches_one_process(cp2, name, causal, scale):
    expected = _reference(scale=scale, causal=causal)
    for rank, result in enumerate(cp2):
        for actual, full, what in zip(result[f"attention/{name}"], expected, ("output", "dq", "dk", "dv"), strict=True):
            assert actual.shape == (B, S // CP, H, D), what
            _close(actual, _tokens(full, rank), 1e-6)


def test_attention_callable_gets_local_heads_of_the_whole_sequence(cp2):
    for result in cp2:
        assert result["calls"] == [("bshd", (B, S, H // CP, D), 0.3, True)]


def test_group_of_one_is_plain_attention(cp2):
    expected = _reference(causal=True)
    for result in cp2:  # split_sequence over a group of one keeps the whole sequence
        for actual, full in zip(result["attention/single"], expected, strict=True):
            _close(actual, full, 1e-6)


def test_replicated_kv(cp2):
    o, dq, dk, dv = _reference(scale=0.3)
    for rank, result in enumerate(cp2):
        _close(result["attention/kv_replicated"][0], _tokens(o, rank), 1e-6)
        _close(result["attention/kv_replicated"][1], _tokens(dq, rank), 1e-6)
    # each rank has the gradient of its heads of k and v: their sum over the group is the full gradient
    _close(sum(r["attention/kv_replicated"][2] for r in cp2), dk, 1e-6)
    _close(sum(r["attention/kv_replicated"][3] for r in cp2), dv, 1e-6)


@pytest.mark.parametrize("loss_on", ["local", "gathered"])
def test_block_outputs_and_parameter_gradients(cp2, loss_on):
    data = _data()
    block = _block()
    tokens = _leaf(data["tokens"])
    y = block(tokens)
    (y * data["g_tokens"]).sum().backward()
    for rank, result in enumerate(cp2):
        local_y, local_grad, grads = result[f"block/{loss_on}"]
        _close(local_y, _tokens(y.detach(), rank), 1e-5)
        _close(local_grad, _tokens(tokens.grad, rank), 1e-5)
        assert grads.keys() == dict(block.named_parameters()).keys()
        for name, p in block.named_parameters():
            _close(grads[name], p.grad, 1e-5)


@pytest.mark.parametrize("dim", [1, -1])
def test_gather_sequence_keeps_the_local_gradient(cp2, dim):
    data = _data()
    x = _leaf(data["x"])
    (x.pow(3) * data["w"]).sum().backward()  # one process computes the loss once
    for rank, result in enumerate(cp2):
        y, grad = result[f"gather/{dim}"]
        assert torch.equal(y, data["x"])
        _close(grad, x.grad.chunk(CP, dim)[rank], 1e-6)  # not CP times it


def test_errors_are_raised_on_every_rank(cp2):
    for result in cp2:
        errors = result["errors"]
        assert "4 heads" not in errors["heads"] and "3 heads" in errors["heads"]
        assert "group size 2" in errors["heads"] and "[1, 3]" in errors["heads"]
        assert "rank 0: 4, rank 1: 3" in errors["lengths"] and "split_sequence" in errors["lengths"]
        assert "size 7" in errors["split"] and "group size 2" in errors["split"]


def test_single_process_without_a_process_group():
    data = _data()
    q, k, v = (data[n] for n in "qkv")
    _close(ulysses_attention(q, k, v, causal=True, scale=0.3), _sdpa(q, k, v, scale=0.3, causal=True), 0)
    assert torch.equal(seq_to_head(q), q) and torch.equal(head_to_seq(q), q)
    assert torch.equal(split_sequence(q, 1), q) and gather_sequence(q, 1) is q
    with pytest.raises(ValueError, match="layout"):
        ulysses_attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="4-D"):
        ulysses_attention(q[0], k[0], v[0])
