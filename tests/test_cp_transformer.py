"""TinyVideoDiT: single-process sanity, and context parallel at CP=2 (gloo, two CPU processes) against one process.

All CP=2 cases run in one launch (:func:`_cp2`, a module-scoped fixture); each rank returns its outputs and its
gradients after the all-reduce (SUM) over the CP group, and the tests compare them with the same computation on one
process without CP. The error cases run first, so the later cases also show that no rank was left behind.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from distill_mixins import DMD2Config, DMD2Mixin, OptimizerConfig
from distill_mixins.contract import check_host_instance
from distill_mixins.testing import ToyHost
from distill_mixins.testing.transformer import (
    TinyVideoDiT,
    apply_rope,
    patchify,
    rope_axis_dims,
    set_context_parallel,
    unpatchify,
)
from tests.distributed import run_distributed

CP = 2
B, C = 2, 4
CASES = {"frames": (4, 4, 4), "tokens": (3, 4, 4)}  # (T, H, W); patch (1, 2, 2): grids (4, 2, 2) and (3, 2, 2)
TOL = 1e-5
ADAM = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)


def _model(**kwargs) -> TinyVideoDiT:
    return TinyVideoDiT(C, seed=0, **kwargs)


def _inputs(size: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """x, time, labels (one unconditional) and the loss weights g, identical in every process."""
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(B, C, *size, generator=g), "time": torch.rand(B, generator=g) * 2,
        "labels": torch.tensor([1, -1]), "g": torch.randn(B, C, *size, generator=g),
    }


def _forward_backward(model: TinyVideoDiT, size: tuple[int, int, int]) -> dict[str, object]:
    """Output, d(loss)/dx and every parameter gradient of ``loss = (out * g).sum()``."""
    data = _inputs(size)
    x = data["x"].clone().requires_grad_()
    out = model(x, data["time"], data["labels"])
    (out * data["g"]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"out": out.detach(), "x_grad": x.grad, "grads": grads}


class DiTDMD2(DMD2Mixin, ToyHost):
    """DMD2 composed with ToyHost around a TinyVideoDiT."""


def _dmd2() -> DiTDMD2:
    config = DMD2Config(guidance_scale=2.0, student_optimizer=ADAM, critic_optimizer=ADAM)
    model = DiTDMD2(_model(), "rf_velocity", distill=config)
    with torch.no_grad():  # move the student and the critic off the teacher
        for p in [*model.net.parameters(), *model.net_fake_score.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return model


def _dmd2_steps(model: DiTDMD2, group=None) -> dict[int, tuple]:
    """Loss and trainable-parameter gradients of a student step (iteration 0) and a critic step (iteration 1)."""
    data = _inputs(CASES["frames"])
    batch = {"x0": data["x"], "label": data["labels"]}
    results = {}
    for iteration in (0, 1):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        _, loss = model.training_step(batch, iteration)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if group is not None:
            for grad in grads.values():
                dist.all_reduce(grad, group=group)
        results[iteration] = (loss.detach(), grads)
    return results


def _errors(group) -> dict[str, str]:
    messages = {}
    try:
        TinyVideoDiT(C, dim=24, heads=3).set_context_parallel(group)
    except ValueError as error:
        messages["heads"] = str(error)
    model = _model()
    model.set_context_parallel(group)
    data = _inputs((3, 2, 2))  # grid (3, 1, 1): 3 frames, 3 tokens
    try:
        model(data["x"], data["time"], data["labels"])
    except ValueError as error:
        messages["split"] = str(error)
    return messages


def _cp2(rank: int, world_size: int) -> dict[str, object]:
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world_size)))
    out: dict[str, object] = {"errors": _errors(group)}
    for name, size in CASES.items():
        model = _model()
        model.set_context_parallel(group)
        result = _forward_backward(model, size)
        for grad in result["grads"].values():
            dist.all_reduce(grad, group=group)  # each rank's gradient covers its own tokens only
        result["split"] = model.context_split(tuple(n // p for n, p in zip(size, model.patch, strict=True)))
        out[name] = result
    copied = copy.deepcopy(model)  # shares the group
    data = _inputs(CASES["tokens"])
    out["copy"] = (copied.context_parallel_group is group, copied(data["x"], data["time"], data["labels"]).detach())
    dmd2 = _dmd2()
    out["dmd2/nets"] = set_context_parallel(dmd2, group)
    out["dmd2"] = _dmd2_steps(dmd2, group)
    return out


@pytest.fixture(scope="module")
def cp2() -> list[dict[str, object]]:
    return run_distributed(_cp2, CP)


def _close(actual, expected, tol=TOL, msg=None):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0, msg=msg)


# ----------------------------------------------------------------------------------------------------- CP=2


@pytest.mark.parametrize("case, split", [("frames", "frames"), ("tokens", "tokens")])
def test_cp2_outputs_and_gradients_equal_one_process(cp2, case, split):
    expected = _forward_backward(_model(), CASES[case])
    assert expected["out"].shape == (B, C, *CASES[case])
    for result in cp2:
        assert result[case]["split"] == split
        _close(result[case]["out"], expected["out"])  # the full output on every rank
        assert result[case]["grads"].keys() == expected["grads"].keys()
        for name, grad in expected["grads"].items():
            assert grad.abs().sum() > 0, name
            _close(result[case]["grads"][name], grad, msg=name)
    # a replicated input: each rank has its chunk's part, the sum over the group is the whole gradient
    parts = [result[case]["x_grad"] for result in cp2]
    assert all((part != expected["x_grad"]).any() for part in parts)
    _close(sum(parts), expected["x_grad"])


def test_cp2_copies_share_the_group(cp2):
    data = _inputs(CASES["tokens"])
    expected = _model()(data["x"], data["time"], data["labels"]).detach()
    for result in cp2:
        shared, out = result["copy"]
        assert shared
        _close(out, expected)


def test_cp2_composed_dmd2_steps_equal_one_process(cp2):
    expected = _dmd2_steps(_dmd2())
    for result in cp2:
        assert result["dmd2/nets"] == 3  # student, critic, teacher
        for iteration, (loss, grads) in expected.items():
            cp_loss, cp_grads = result["dmd2"][iteration]
            _close(cp_loss, loss)
            assert cp_grads.keys() == grads.keys() and grads
            for name, grad in grads.items():
                _close(cp_grads[name], grad, msg=name)


def test_cp2_errors_on_every_rank(cp2):
    for result in cp2:
        errors = result["errors"]
        assert "heads=3" in errors["heads"] and "CP size 2" in errors["heads"] and "[1, 3]" in errors["heads"]
        assert "T'=3" in errors["split"] and "S=3 tokens" in errors["split"] and "P=2" in errors["split"]
        assert "clip length" in errors["split"]


# ------------------------------------------------------------------------------------------ single process


def test_shape_determinism_and_labels():
    model = _model()
    data = _inputs(CASES["tokens"])
    out = model(data["x"], data["time"], data["labels"])
    assert out.shape == data["x"].shape and out.dtype == data["x"].dtype
    assert torch.equal(out, model(data["x"], data["time"], data["labels"]))
    assert torch.equal(out, _model()(data["x"], data["time"], data["labels"]))
    null = torch.tensor([model.num_labels] * B)  # -1 is the extra (unconditional) label
    assert torch.equal(model(data["x"], data["time"], -torch.ones(B, dtype=torch.long)),
                       model(data["x"], data["time"], null))
    assert not torch.allclose(out, model(data["x"], data["time"], torch.zeros(B, dtype=torch.long)))
    assert not torch.allclose(out, model(data["x"], data["time"] + 0.5, data["labels"]))
    assert set(model.state_dict()) == set(dict(model.named_parameters()))  # no buffers: RoPE is computed
    model.double()
    assert model(data["x"].double(), data["time"].double(), data["labels"]).dtype == torch.float64
    model.to(torch.bfloat16)  # the angles are computed in float32, then cast
    _close(model(data["x"], data["time"], data["labels"]), out, 0.25)


def test_context_parallel_off_by_default_and_with_none():
    model = _model()
    assert model.context_parallel_group is None and model.context_parallel_size == 1
    model.set_context_parallel(None)
    assert model.context_split((3, 1, 1)) == "none"


def test_patchify_order_and_round_trip():
    x = torch.randn(B, C, 2, 4, 6)
    tokens, grid = patchify(x, (1, 2, 2))
    assert grid == (2, 2, 3) and tokens.shape == (B, 12, C * 4)
    t, h, w = 1, 0, 2  # token index (t * H' + h) * W' + w; its patch flattened in (C, pt, ph, pw) order
    assert torch.equal(tokens[:, (t * 2 + h) * 3 + w], x[:, :, t, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].flatten(1))
    assert torch.equal(unpatchify(tokens, grid, (1, 2, 2)), x)
    tokens, grid = patchify(x, (2, 1, 3))
    assert torch.equal(unpatchify(tokens, grid, (2, 1, 3)), x)


def test_rope_is_relative_in_each_axis():
    model = _model()
    grid = (4, 4, 4)
    cos, sin = model.rope(grid, torch.float64)
    assert cos.shape == (64, 4) and rope_axis_dims(8) == (4, 2, 2)
    q, k = torch.randn(2, 1, 1, 8, dtype=torch.float64).unbind(0)  # (1, 1 head, D) each

    def score(i: tuple, j: tuple) -> torch.Tensor:
        a, b = ((p[0] * 4 + p[1]) * 4 + p[2] for p in (i, j))
        return (apply_rope(q, cos[a : a + 1], sin[a : a + 1]) * apply_rope(k, cos[b : b + 1], sin[b : b + 1])).sum()

    _close(score((0, 0, 0), (1, 2, 3)), score((2, 1, 0), (3, 3, 3)), 1e-12)  # the same offset
    for axis in range(3):  # an offset along each axis changes the score
        j = [0, 0, 0]
        j[axis] = 1
        assert not torch.allclose(score((0, 0, 0), (0, 0, 0)), score((0, 0, 0), tuple(j)))


def test_rope_complex_form_equals_the_elementwise_form():
    """Without a backward graph apply_rope takes one complex product; it equals the elementwise rotation (the path
    with a graph) in float64 and float32, on a strided q as the attention layers pass it."""
    qkv = torch.randn(2, 6, 3, 2, 8, dtype=torch.float64)
    angles = torch.rand(6, 4, dtype=torch.float64) * 6
    for dtype in (torch.float64, torch.float32):
        q = qkv.to(dtype).unbind(2)[0]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        with torch.no_grad():
            fast = apply_rope(q, cos, sin)
        graph = apply_rope(q.clone().requires_grad_(True), cos, sin)
        x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
        reference = torch.stack((x1 * cos[:, None] - x2 * sin[:, None], x1 * sin[:, None] + x2 * cos[:, None]), -1)
        assert graph.grad_fn is not None and fast.dtype == dtype
        for out in (fast, graph):
            _close(out, reference.flatten(-2), 1e-14 if dtype == torch.float64 else 1e-6)


def test_rope_rotation_derivatives_equal_the_elementwise_forms():
    """With a graph apply_rope runs the complex product with its own backward (the gradient rotated back) and forward
    derivative: gradcheck and gradgradcheck in float64 on a strided q, gradients and a JVP equal to the elementwise
    form's, and jacfwd through it (vmap of the rule)."""
    from torch.autograd import forward_ad
    from torch.func import jacfwd, jvp

    qkv = torch.randn(2, 6, 3, 2, 8, dtype=torch.float64)
    angles = torch.rand(6, 4, dtype=torch.float64) * 6
    cos, sin = angles.cos(), angles.sin()
    q = qkv.unbind(2)[0].requires_grad_(True)  # strided, as the attention layers pass it
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (q,))
    assert torch.autograd.gradgradcheck(lambda x: apply_rope(x, cos, sin), (q,))

    def elementwise(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[:, None], sin[:, None]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)

    weight = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad((apply_rope(q, cos, sin) * weight).sum(), q)
    (expected,) = torch.autograd.grad((elementwise(q) * weight).sum(), q)
    _close(grad, expected, 1e-14)
    assert "Rotation" in type(apply_rope(q, cos, sin).grad_fn).__name__  # the rule, not the elementwise graph
    tangent = torch.randn_like(q)
    with forward_ad.dual_level():  # the rule's jvp (q needs a gradient too)
        out = apply_rope(forward_ad.make_dual(q, tangent), cos, sin)
        _close(forward_ad.unpack_dual(out).tangent, elementwise(tangent), 1e-14)
    _close(jvp(lambda x: apply_rope(x, cos, sin), (q.detach(),), (tangent,))[1], elementwise(tangent), 1e-14)
    jacobian = jacfwd(lambda x: apply_rope(x, cos, sin))(q.detach()[:1])
    _close(jacobian, jacfwd(elementwise)(q.detach()[:1]), 1e-14)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        model(torch.randn(1, C, 2, 3, 4), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_size"):
        model(torch.randn(1, C, 17, 2, 2), torch.rand(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="head_dim=4"):
        TinyVideoDiT(C, dim=16, heads=4)
    with pytest.raises(ValueError, match="not divisible by heads=3"):
        TinyVideoDiT(C, dim=32, heads=3)


def test_toy_host_fits():
    host = ToyHost(_model(), "edm_eps")
    check_host_instance(host)
    data = _inputs(CASES["frames"])
    out = host.predict(host.net, data["x"], data["time"].double(), data["labels"])
    assert out.shape == data["x"].shape and out.dtype == data["x"].dtype
    assert set_context_parallel(host, None) == 1
