"""Linear and LayerNorm with their own forward rules (distill_mixins/parallel/explicit_rules.py): known answers in
float64 against PyTorch's built-in derivatives, and the call counts that are the point of the rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from distill_mixins.parallel.explicit_rules import ExplicitRules, layer_norm, linear


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tangents", ["x", "x,w,b", "w"])
def test_linear_rule_equals_torchs_jvp_in_float64(with_bias, tangents):
    x, w = _randn(3, 5, 7, seed=0), _randn(4, 7, seed=1)
    b = _randn(4, seed=2) if with_bias else None
    dx, dw, db = _randn(3, 5, 7, seed=3), _randn(4, 7, seed=4), _randn(4, seed=5)
    zero = torch.zeros_like
    tan = (dx if "x" in tangents else zero(x), dw if "w" in tangents else zero(w))
    if with_bias:
        tan += (db if "b" in tangents else zero(b),)
    prim = (x, w) + ((b,) if with_bias else ())
    expected = torch.func.jvp(lambda *a: F.linear(*a), prim, tan)
    got = torch.func.jvp(lambda *a: linear(*a), prim, tan)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6,), (4, 6)])
def test_layer_norm_rule_equals_torchs_jvp_in_float64(affine, shape):
    x = _randn(3, 4, 6, seed=0) * 3 + 1
    dx = _randn(3, 4, 6, seed=1)
    prim, tan = [x], [dx]
    if affine:
        prim += [_randn(*shape, seed=2), _randn(*shape, seed=3)]
        tan += [_randn(*shape, seed=4), _randn(*shape, seed=5)]

    def ours(x, *wb):
        return layer_norm(x, shape, *wb, eps=1e-5)

    def torchs(x, *wb):
        return F.layer_norm(x, shape, *wb, eps=1e-5)

    expected, got = torch.func.jvp(torchs, tuple(prim), tuple(tan)), torch.func.jvp(ours, tuple(prim), tuple(tan))
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    # the input's tangent alone (the weights' tangents absent, not zero)
    only_x = torch.func.jvp(lambda x: ours(x, *prim[1:]), (x,), (dx,))[1]
    torch.testing.assert_close(only_x, torch.func.jvp(lambda x: torchs(x, *prim[1:]), (x,), (dx,))[1],
                               rtol=1e-12, atol=1e-12)


def test_backward_rules_pass_gradcheck():
    x = _randn(2, 3, 5, seed=0).requires_grad_()
    w, b = _randn(4, 5, seed=1).requires_grad_(), _randn(4, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear(x, w), (x, w))
    gamma, beta = _randn(5, seed=3).requires_grad_(), _randn(5, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, g, b: layer_norm(x, (5,), g, b), (x, gamma, beta))
    assert torch.autograd.gradcheck(lambda x: layer_norm(x, (5,)), (x,))


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 8, bias=False)).double()


def test_the_mode_routes_modules_and_keeps_jvp_and_jacfwd():
    net, x, dx = _net(), _randn(2, 5, 8, seed=0), _randn(2, 5, 8, seed=1)
    expected = torch.func.jvp(net, (x,), (dx,))
    calls = {"linear": 0, "layer_norm": 0}
    import distill_mixins.parallel.explicit_rules as rules

    def counted(name):
        original = getattr(rules, name)

        def run(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules, "linear", counted("linear"))
        mp.setattr(rules, "layer_norm", counted("layer_norm"))
        with ExplicitRules():
            got = torch.func.jvp(net, (x,), (dx,))
            jac = torch.func.jacfwd(net)(x[:1, :2])
    assert calls == {"linear": 2 + 2 * 1, "layer_norm": 1 + 1}  # jvp, then jacfwd's vmapped jvp
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, torch.func.jacfwd(net)(x[:1, :2]), rtol=1e-12, atol=1e-12)


def _products(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))


def test_a_linear_jvp_along_the_input_runs_one_product_for_the_tangent():
    """PyTorch's addmm rule also multiplies by the weight's (zero) tangent: two products for the tangent; the rule,
    one (plus the primal's)."""
    lin, x, dx = torch.nn.Linear(32, 64), torch.randn(4, 16, 32), torch.randn(4, 16, 32)

    def jvp() -> None:
        with torch.no_grad():
            torch.func.jvp(lin, (x,), (dx,))

    def jvp_with_rules() -> None:
        with ExplicitRules():
            jvp()

    assert _products(jvp_with_rules) == 2
    assert _products(jvp) > 2  # what the rule saves (3 with torch 2.13)


def test_calls_the_rules_do_not_take_run_as_called():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.MonkeyPatch.context() as mp, ExplicitRules():
        import distill_mixins.parallel.explicit_rules as rules

        def refuse(*_a, **_k):
            raise AssertionError("routed to the rule")
        mp.setattr(rules, "linear", refuse)
        mp.setattr(rules, "layer_norm", refuse)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert F.linear(x, w).dtype == torch.bfloat16  # autocast: as called
            F.layer_norm(x, (4,))
        with pytest.raises(RuntimeError):  # mixed dtypes: as called, so PyTorch's own error
            F.linear(x, w.double())
