"""Context parallel (Ulysses) of the diffusers Wan and Cosmos hosts at CP=2 (gloo, two CPU processes) against one
process, through ``host.predict``.

All CP=2 cases run in one launch (:func:`_cp2`, a module-scoped fixture): the error cases first (so the later cases
also show that no rank was left behind), then forward and backward of each host for T' divisible by 2 ("frames")
and T' odd with S even ("tokens"); each rank returns its output and its parameter gradients after the all-reduce
(SUM) over the CP group, compared with the same computation on one process without CP.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")  # the [diffusers] extra (installed by `make test`)

from distill_mixins.hosts import CosmosVideo2WorldHost, WanVideo2WorldHost
from distill_mixins.hosts.context_parallel import (
    CosmosUlyssesProcessor,
    WanUlyssesProcessor,
    context_parallel_group,
)
from distill_mixins.shared_ref import SharedRef
from tests.distributed import run_distributed
from tests.hosts_helpers import TAU_C, TEXT_DIM, TEXT_LEN, B, C, hooks_left, tiny_cosmos, tiny_wan

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

CP = 2
TOL = 1e-5
CASES = {"frames": (4, 4, 4), "tokens": (3, 4, 4)}  # (T, H, W); patch (1, 2, 2): grids (4, 2, 2), (3, 2, 2)
HOSTS = {"wan": (WanVideo2WorldHost, tiny_wan), "cosmos": (CosmosVideo2WorldHost, tiny_cosmos)}
PROCESSORS = {"wan": WanUlyssesProcessor, "cosmos": CosmosUlyssesProcessor}


def _host(name: str, **overrides):
    """A host around a tiny random transformer. Cosmos' learnable positional embeddings start at zero, where their
    normalisation has gradients ~1e7 (float32 round-off ~1): they get random values, as trained ones have."""
    cls, make = HOSTS[name]
    net = make(**overrides)
    if name == "cosmos":
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in net.learnable_pos_embed.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return cls(net)


def _inputs(size: tuple[int, int, int], per_frame: bool = True) -> dict[str, torch.Tensor]:
    """x, RF time (per frame, the first frame conditioning at TAU_C; or per sample), text, frames and loss weights."""
    g = torch.Generator().manual_seed(1)
    shape = (B, C, *size)
    time = torch.rand(B, size[0], generator=g).double()
    time[:, 0] = TAU_C
    return {
        "x": torch.randn(shape, generator=g), "time": time if per_frame else time[:, 1],
        "embeds": torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g), "frames": torch.randn(shape, generator=g),
        "g": torch.randn(shape, generator=g),
    }


def _predict(host, net, data: dict[str, torch.Tensor]) -> torch.Tensor:
    condition = host.build_condition(data["embeds"], data["frames"], 1)
    return host.predict(net, data["x"], data["time"], condition)


def _forward_backward(host, size: tuple[int, int, int], per_frame: bool = True) -> dict[str, object]:
    """Output and every parameter gradient of ``loss = (predict * g).sum()``."""
    data = _inputs(size, per_frame)
    out = _predict(host, host.net, data)
    (out * data["g"]).sum().backward()
    return {"out": out.detach(), "grads": {n: p.grad for n, p in host.net.named_parameters()}}


# --------------------------------------------------------------------------------------------- CP=2 launch


def _errors(name: str, group) -> dict[str, str]:
    messages = {}
    try:
        host = _host(name, num_attention_heads=3)
        host.enable_context_parallel(host.net, group)
    except ValueError as error:
        messages["heads"] = str(error)
    host = _host(name)
    host.enable_context_parallel(host.net, group)
    try:
        _predict(host, host.net, _inputs((3, 2, 2)))  # grid (3, 1, 1): 3 frames, 3 tokens
    except ValueError as error:
        messages["split"] = str(error)
    return messages


def _copy_after_enable(host, group) -> dict[str, object]:
    """A deepcopy of a CP network shares the group, computes the same, and runs on its own parameters."""
    data = _inputs(CASES["tokens"])
    with torch.no_grad():
        out = _predict(host, host.net, data)
        copied = copy.deepcopy(host.net)
        same = _predict(host, copied, data)
        copied.proj_out.weight.zero_()
        changed = _predict(host, copied, data)
        original = _predict(host, host.net, data)
    return {
        "shared": context_parallel_group(copied) is group, "same": torch.equal(out, same),
        "copy_moves": not torch.equal(changed, out), "original_kept": torch.equal(original, out),
    }


def _off_again(name: str, group) -> bool:
    """enable(group) then enable(None): bit-identical to a network that never had CP."""
    host, plain = _host(name), _host(name)
    host.enable_context_parallel(host.net, group)
    host.enable_context_parallel(host.net, None)
    data = _inputs(CASES["frames"])
    with torch.no_grad():
        same = torch.equal(_predict(host, host.net, data), _predict(plain, plain.net, data))
    return same and hooks_left(host.net) == 0


def _cp2(rank: int, world_size: int) -> dict[str, object]:
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world_size)))
    out: dict[str, object] = {name: {"errors": _errors(name, group)} for name in HOSTS}
    for name in HOSTS:
        for case, size in CASES.items():
            host = _host(name)
            host.enable_context_parallel(host.net, group)
            taps: list[tuple[int, ...]] = []
            tap = host.feature_blocks(host.net)[0].register_forward_hook(
                lambda m, a, o, taps=taps: taps.append(tuple(o.shape))
            )
            result = _forward_backward(host, size)
            tap.remove()
            for grad in result["grads"].values():
                dist.all_reduce(grad, group=group)  # each rank's gradient covers its own tokens only
            out[name][case] = {**result, "tap": taps[0]}
        out[name]["copy"] = _copy_after_enable(host, group)
        out[name]["off"] = _off_again(name, group)
    host = _host("wan")  # a per-sample timestep (B,): not split
    host.enable_context_parallel(host.net, group)
    result = _forward_backward(host, CASES["tokens"], per_frame=False)
    for grad in result["grads"].values():
        dist.all_reduce(grad, group=group)
    out["wan"]["per_sample"] = result
    return out


@pytest.fixture(scope="module")
def cp2() -> list[dict[str, object]]:
    return run_distributed(_cp2, CP)


def _max_diff(actual: dict[str, object], expected: dict[str, object]) -> tuple[float, float]:
    """Largest |difference| of the outputs and of the parameter gradients (all must be nonzero somewhere)."""
    assert actual["grads"].keys() == expected["grads"].keys()
    out = float((actual["out"] - expected["out"]).abs().max())
    grads = max(float((actual["grads"][n] - g).abs().max()) for n, g in expected["grads"].items() if g is not None)
    assert all(actual["grads"][n] is not None for n, g in expected["grads"].items() if g is not None)
    return out, grads


def test_cp2_errors_on_every_rank(cp2):
    for result in cp2:
        for name in HOSTS:
            errors = result[name]["errors"]
            assert "3 attention heads" in errors["heads"] and "CP size 2" in errors["heads"]
            assert "[1, 3]" in errors["heads"]
            assert "T'=3" in errors["split"] and "S=3" in errors["split"] and "P=2" in errors["split"]
            assert "clip length or the resolution" in errors["split"]


@pytest.mark.parametrize("name", list(HOSTS))
@pytest.mark.parametrize("case", list(CASES))
def test_cp2_outputs_and_gradients_equal_one_process(cp2, name, case):
    expected = _forward_backward(_host(name), CASES[case])
    tokens = (CASES[case][0] * CASES[case][1] * CASES[case][2]) // 4
    for result in cp2:
        out_diff, grad_diff = _max_diff(result[name][case], expected)
        assert out_diff <= TOL and grad_diff <= TOL, (out_diff, grad_diff)
        assert result[name][case]["tap"][:2] == (B, tokens // CP)  # block outputs: the local chunk


def test_cp2_wan_per_sample_timestep(cp2):
    expected = _forward_backward(_host("wan"), CASES["tokens"], per_frame=False)
    for result in cp2:
        out_diff, grad_diff = _max_diff(result["wan"]["per_sample"], expected)
        assert out_diff <= TOL and grad_diff <= TOL, (out_diff, grad_diff)


@pytest.mark.parametrize("name", list(HOSTS))
def test_cp2_deepcopy_and_off(cp2, name):
    for result in cp2:
        assert result[name]["copy"] == {"shared": True, "same": True, "copy_moves": True, "original_kept": True}
        assert result[name]["off"]


# ------------------------------------------------------------------------------------------ single process


@pytest.mark.parametrize("name", list(HOSTS))
def test_enable_none_is_bit_identical(name):
    host, plain = _host(name), _host(name)
    processors = [type(m.processor) for m in host.net.modules() if hasattr(m, "processor")]
    host.enable_context_parallel(host.net, None)
    assert hooks_left(host.net) == 0 and context_parallel_group(host.net) is None
    assert processors == [type(m.processor) for m in host.net.modules() if hasattr(m, "processor")]
    data = _inputs(CASES["tokens"])
    with torch.no_grad():
        assert torch.equal(_predict(host, host.net, data), _predict(plain, plain.net, data))


@pytest.mark.parametrize("name", list(HOSTS))
def test_library_processor_equals_model_processor_without_cp(name):
    """The library's self-attention processor (no group: plain attention) computes what the model's does."""
    host, plain = _host(name), _host(name)
    for attn in (block.attn1 for block in host.feature_blocks(host.net)):
        attn.set_processor(PROCESSORS[name](SharedRef(None), attn.processor))
    expected, actual = _forward_backward(plain, CASES["tokens"]), _forward_backward(host, CASES["tokens"])
    out_diff, grad_diff = _max_diff(actual, expected)
    assert out_diff <= 1e-6 and grad_diff <= 1e-6, (out_diff, grad_diff)
