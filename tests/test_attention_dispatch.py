"""The attention dispatch: flash-attn's path checked on CPU with a stand-in of flash-attn's signature and layout,
SDPA and its math backend, the auto choice and its log, forward-mode AD, and the errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from loguru import logger

import distill_mixins.parallel.attention as attn_mod
from distill_mixins.parallel.attention import (
    ATTENTION_BACKENDS,
    attention,
    check_attention_backend,
    forward_ad_active,
    get_attention_backend,
    resolve_attention_backend,
    set_attention_backend,
)

B, H, S, D = 2, 3, 7, 16


def stand_in_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's ``flash_attn_func`` signature and (B, S, H, D) layout, computed in plain torch."""
    assert dropout_p == 0.0
    assert q.dim() == 4 and q.shape[1] == k.shape[1] == v.shape[1]  # (B, S, H, D): S at dim 1
    scale = 1 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        keep = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.fixture
def flash_stand_in(monkeypatch):
    """Both flash backends point at the stand-in; the log memory is fresh."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return stand_in_flash_attn_func(*args, **kwargs)

    for name in ("flash2", "flash3"):
        monkeypatch.setitem(attn_mod.FLASH_IMPLEMENTATIONS, name, lambda: counted)
    monkeypatch.setattr(attn_mod, "_logged", set())
    return calls


@pytest.fixture
def no_flash(monkeypatch):
    def missing():
        raise ImportError("No module named 'flash_attn'")

    for name in ("flash2", "flash3"):
        monkeypatch.setitem(attn_mod.FLASH_IMPLEMENTATIONS, name, missing)
    monkeypatch.setattr(attn_mod, "_logged", set())


def qkv(layout, requires_grad=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def reference(q, k, v, layout, scale=None, causal=False):
    """SDPA's math backend in (B, H, S, D), returned in ``layout``."""
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2) if layout == "bshd" else out


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("scale,causal", [(None, False), (0.3, False), (None, True), (0.7, True)])
def test_flash_path_equals_sdpa(flash_stand_in, layout, scale, causal):
    q, k, v = qkv(layout, requires_grad=True)
    out = attention(q, k, v, layout=layout, scale=scale, causal=causal, backend="flash2")
    assert flash_stand_in == [{"softmax_scale": scale, "causal": causal}]  # the flash path ran
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference(q2, k2, v2, layout, scale, causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for a, b in ((q, q2), (k, k2), (v, v2)):  # float32 rounding of two summation orders
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math", "explicit", "flash3"])
def test_every_backend_gives_sdpa_result_in_both_layouts(flash_stand_in, layout, backend):
    q, k, v = qkv(layout)
    out = attention(q, k, v, layout=layout, scale=0.25, backend=backend)
    torch.testing.assert_close(out, reference(q, k, v, layout, 0.25), rtol=0, atol=1e-6)


def test_layouts_round_trip():
    q, k, v = qkv("bhsd")
    out_bhsd = attention(q, k, v, layout="bhsd")
    out_bshd = attention(*(t.transpose(1, 2).contiguous() for t in (q, k, v)), layout="bshd")
    assert out_bshd.shape == (B, S, H, D)
    torch.testing.assert_close(out_bshd.transpose(1, 2), out_bhsd, rtol=0, atol=1e-6)


def test_attn_mask_goes_to_sdpa_in_either_layout(flash_stand_in):
    q, k, v = qkv("bshd")
    mask = torch.rand(S, S, generator=torch.Generator().manual_seed(1)) > 0.3
    mask |= torch.eye(S, dtype=torch.bool)  # no fully masked row
    out = attention(q, k, v, layout="bshd", attn_mask=mask)  # auto: no flash with a mask
    assert flash_stand_in == []
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="takes no attn_mask"):
        attention(q, k, v, layout="bshd", attn_mask=mask, backend="flash2")


def test_auto_picks_sdpa_on_cpu_and_says_why(flash_stand_in):
    choice, reason = resolve_attention_backend("auto", "cpu", torch.bfloat16, 64)
    assert choice == "sdpa"
    assert "CUDA only" in reason


def test_auto_on_cuda(monkeypatch, flash_stand_in):
    """The auto rules on a CUDA device, with the capability faked (no GPU needed: nothing runs)."""
    capability = [(9, 0)]
    monkeypatch.setattr(attn_mod, "_cuda_capability", lambda device: capability[0])
    resolve = resolve_attention_backend
    assert resolve("auto", "cuda:0", torch.bfloat16, 128)[0] == "flash3"
    assert resolve("auto", "cuda:0", torch.bfloat16, 100)[0] == "flash2"  # FA3 wants a multiple of 8
    assert resolve("auto", "cuda:0", torch.float32, 128) == (
        "sdpa",
        "torch.float32: flash-attn computes in float16/bfloat16 only",
    )
    assert resolve("auto", "cuda:0", torch.float16, 512)[0] == "sdpa"
    assert resolve("auto", "cuda:0", torch.float16, 128, has_mask=True)[0] == "sdpa"
    assert resolve("auto", "cuda:0", torch.float16, 128, needs_forward_ad=True)[0] == "explicit"
    assert resolve("sdpa", "cuda:0", torch.float16, 128, needs_forward_ad=True)[0] == "math"
    capability[0] = (8, 0)
    assert resolve("auto", "cuda:0", torch.float16, 128)[0] == "flash2"
    capability[0] = (7, 5)
    choice, reason = resolve("auto", "cuda:0", torch.float16, 128)
    assert choice == "sdpa" and "compute capability >= 8.0" in reason


def test_auto_on_cuda_without_flash_attn_names_the_extra(monkeypatch, no_flash):
    monkeypatch.setattr(attn_mod, "_cuda_capability", lambda device: (9, 0))
    choice, reason = resolve_attention_backend("auto", "cuda:0", torch.bfloat16, 128)
    assert choice == "sdpa"
    assert "not installed" in reason and "distill-mixins[flash]" in reason


@pytest.mark.parametrize("backend", ["flash2", "flash3"])
def test_flash_without_flash_attn_raises_with_install_hint(no_flash, backend):
    q, k, v = qkv("bshd")
    hint = "distill-mixins\\[flash\\]" if backend == "flash2" else "hopper/"
    with pytest.raises(ImportError, match=hint):
        attention(q, k, v, layout="bshd", backend=backend)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_real_registry_without_flash_attn(monkeypatch):
    monkeypatch.setattr(attn_mod, "_logged", set())
    assert attn_mod.flash_function("flash2") is None
    with pytest.raises(ImportError, match="pip install 'distill-mixins\\[flash\\]'"):
        resolve_attention_backend("flash2", "cpu", torch.bfloat16, 64)


def test_bad_backend_names_raise_with_the_field():
    assert check_attention_backend("sdpa", "ParallelConfig.attention_backend") == "sdpa"
    with pytest.raises(ValueError, match=r"ParallelConfig\.attention_backend='flash' is not .*flash3, flash2"):
        check_attention_backend("flash", "ParallelConfig.attention_backend")
    q, k, v = qkv("bhsd")
    with pytest.raises(ValueError, match="attention_backend='xformers'"):
        attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="layout='sbhd'"):
        attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="causal needs equal lengths"):
        attention(q, k[:, :, :3], v[:, :, :3], causal=True)
    assert set(ATTENTION_BACKENDS) == {"auto", "flash3", "flash2", "sdpa", "math", "explicit"}


def test_process_default_backend(flash_stand_in):
    q, k, v = qkv("bshd")
    previous = set_attention_backend("flash2")
    try:
        assert get_attention_backend() == "flash2"
        attention(q, k, v, layout="bshd")
        assert len(flash_stand_in) == 1
        attention(q, k, v, layout="bshd", backend="sdpa")  # an explicit backend wins
        assert len(flash_stand_in) == 1
    finally:
        set_attention_backend(previous)
    with pytest.raises(ValueError, match="not an attention backend"):
        set_attention_backend("fast")


def test_choice_is_logged_once(flash_stand_in):
    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="INFO")
    try:
        q, k, v = qkv("bhsd")
        for _ in range(3):
            attention(q, k, v)
        attention(q, k, v, backend="flash2")
        attention(q, k, v, backend="flash2")
    finally:
        logger.remove(sink)
    lines = [m for m in messages if "attention " in m]
    assert len(lines) == 2, lines
    assert "attention auto -> sdpa on cpu (float32): cpu device: flash-attn runs on CUDA only" in lines[0]
    assert "attention flash2 -> flash2 on cpu (float32): requested" in lines[1]


def test_forward_mode_ad_uses_the_explicit_rule_and_matches_finite_differences(flash_stand_in):
    q, k, v = qkv("bshd", dtype=torch.float64)
    tq, tk, tv = qkv("bshd", dtype=torch.float64, seed=1)
    f = lambda q, k, v: attention(q, k, v, layout="bshd", scale=0.4, causal=True)  # noqa: E731
    assert not forward_ad_active(q)
    out, tangent = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, f(q, k, v), rtol=0, atol=1e-12)
    eps = 1e-6
    fd = (f(q + eps * tq, k + eps * tk, v + eps * tv) - f(q - eps * tq, k - eps * tk, v - eps * tv)) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=0, atol=1e-7)
    assert ("auto", "explicit") in {key[:2] for key in attn_mod._logged}
    # SDPA's default CPU kernel has no forward derivative: the dispatch is what makes this work
    with pytest.raises(NotImplementedError):
        torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, q, q), (q.float(),), (tq.float(),))
    # and under vmap (jacfwd), where a dual tensor cannot be unpacked
    jac = torch.func.jacfwd(lambda q: f(q, k, v).sum(), argnums=0)(q)
    assert jac.shape == q.shape
    with pytest.raises(ValueError, match="no forward derivative"):
        torch.func.jvp(lambda q: attention(q, k, v, layout="bshd", backend="flash2"), (q,), (tq,))


def _masks(seed=2):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, S, S, generator=g) > 0.3
    keep[..., 0] = True  # every row keeps a key, except the one made empty below
    empty = keep.clone()
    empty[0, 0, 3] = False  # a fully masked row: SDPA's math backend gives zeros there
    additive = torch.randn(B, H, S, S, generator=g, dtype=torch.float64)
    return {"none": (None, False), "causal": (None, True), "bool": (keep, False), "empty row": (empty, False),
            "additive": (additive, False)}


@pytest.mark.parametrize("mask", list(_masks()))
def test_explicit_attention_and_its_forward_rule_equal_sdpas_math_backend_in_float64(mask):
    from distill_mixins.parallel.explicit_attention import explicit_attention

    attn_mask, causal = _masks()[mask]
    q, k, v = qkv("bhsd", dtype=torch.float64)
    tq, tk, tv = qkv("bhsd", dtype=torch.float64, seed=1)

    def math_sdpa(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=0.3)

    def explicit(q, k, v):
        return explicit_attention(q, k, v, attn_mask=attn_mask, causal=causal, scale=0.3)

    out, tangent = torch.func.jvp(explicit, (q, k, v), (tq, tk, tv))
    ref, ref_tangent = torch.func.jvp(math_sdpa, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(tangent, ref_tangent, rtol=0, atol=1e-12)
    if mask == "empty row":
        assert out[0, :, 3].abs().max() == 0 and tangent[0, :, 3].abs().max() == 0
    # one argument's tangent at a time (the rule's None branches)
    primals, tangents = (q, k, v), (tq, tk, tv)

    def only(fn, i):
        return lambda x: fn(*primals[:i], x, *primals[i + 1:])

    for i in range(3):
        torch.testing.assert_close(torch.func.jvp(only(explicit, i), (primals[i],), (tangents[i],))[1],
                                   torch.func.jvp(only(math_sdpa, i), (primals[i],), (tangents[i],))[1],
                                   rtol=0, atol=1e-12)
    # the backward, against finite differences (empty rows have no gradient through the softmax's NaN-free zeros)
    small = [t[:1, :1, :5, :4].clone().requires_grad_() for t in (q, k, v)]
    small_mask = None if attn_mask is None or mask == "empty row" else attn_mask[:1, :1, :5, :5]
    assert torch.autograd.gradcheck(
        lambda q, k, v: explicit_attention(q, k, v, attn_mask=small_mask, causal=causal, scale=0.3), small)


def test_forward_mode_ad_with_math_asked_for_runs_sdpas_math_backend(flash_stand_in):
    q, k, v = qkv("bhsd", dtype=torch.float64)
    tq = qkv("bhsd", dtype=torch.float64, seed=1)[0]
    _, tangent = torch.func.jvp(lambda q: attention(q, k, v, backend="math"), (q,), (tq,))
    _, explicit = torch.func.jvp(lambda q: attention(q, k, v), (q,), (tq,))
    torch.testing.assert_close(tangent, explicit, rtol=0, atol=1e-12)
    assert ("math", "math") in {key[:2] for key in attn_mod._logged}
    assert ("auto", "explicit") in {key[:2] for key in attn_mod._logged}
