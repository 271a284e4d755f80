#!/usr/bin/env bash
# GPU smoke check of the attention dispatch (distill_mixins/parallel/attention.py). Run by a person on a CUDA
# machine, never by CI or the tests:
#
#     bash benchmarks/gpu_smoke.sh            # from anywhere; uses $PYTHON (default: python)
#
# It installs nothing. For the flash paths, first install flash-attn into the same environment:
#     pip install flash-attn --no-build-isolation                  # FlashAttention-2 (or: pip install '.[flash]')
#     (cd flash-attention/hopper && python setup.py install)       # FlashAttention-3, Hopper (sm90) only
#
# For every available backend (auto, sdpa, math, flash2, flash3) and a few shapes it calls `attention` on CUDA in
# bfloat16, compares the output and the q/k/v gradients with SDPA's math backend in float32 (max error relative to
# the reference's largest value), times forward and forward+backward, and checks a torch.func.jvp through `auto`
# (the math backend). Exits 1 on a mismatch (tolerance SMOKE_TOL, default 0.02), 2 without CUDA.
# SMOKE_DEVICE=cpu runs tiny shapes on the CPU: a dry run of this script itself, not a check of any GPU path.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
else
    echo "nvidia-smi not found"
fi

exec "$PYTHON" - <<'EOF'
import os
import sys
import time

import torch

from distill_mixins.parallel.attention import attention, flash_function, resolve_attention_backend

device = torch.device(os.environ.get("SMOKE_DEVICE", "cuda"))
tol = float(os.environ.get("SMOKE_TOL", "0.02"))
if device.type == "cuda" and not torch.cuda.is_available():
    print("no CUDA device: this smoke check needs a GPU (SMOKE_DEVICE=cpu for a dry run)")
    sys.exit(2)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}")
if device.type == "cuda":
    print(f"GPU {torch.cuda.get_device_name(device)}, capability {torch.cuda.get_device_capability(device)}")

backends = ["auto", "sdpa", "math"]
for name in ("flash2", "flash3"):
    if flash_function(name) is None:
        print(f"{name}: not installed, skipped")
    elif name == "flash3" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9):
        print("flash3: installed but this is not a Hopper GPU, skipped")
    else:
        backends.append(name)

# (B, H, S, D, causal, layout)
if device.type == "cuda":
    shapes = [
        (2, 12, 2048, 128, False, "bhsd"),
        (1, 24, 4680, 128, False, "bshd"),
        (1, 16, 8192, 64, True, "bhsd"),
        (4, 8, 1024, 64, True, "bshd"),
    ]
    warmup, iters = 3, 10
else:
    shapes = [(1, 2, 64, 32, False, "bhsd"), (1, 2, 48, 64, True, "bshd")]
    warmup, iters = 1, 2


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn):
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def rel_err(x, ref):
    return ((x.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


failures = []
for b, h, s, d, causal, layout in shapes:
    shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_in, layout=layout, causal=causal, backend="math")
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
    ref = ref.detach()
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    print(f"\nshape {layout} {shape} causal={causal}")
    for backend in backends:
        choice, reason = resolve_attention_backend(backend, device, torch.bfloat16, d)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, layout=layout, causal=causal, backend=backend)
        grads = torch.autograd.grad(out, inputs, grad_out)
        err = rel_err(out, ref)
        grad_err = max(rel_err(g, r) for g, r in zip(grads, ref_grads))
        fwd_ms = timed(lambda: attention(q, k, v, layout=layout, causal=causal, backend=backend))  # noqa: B023

        def step():
            out = attention(*inputs, layout=layout, causal=causal, backend=backend)  # noqa: B023
            torch.autograd.grad(out, inputs, grad_out)  # noqa: B023

        step_ms = timed(step)
        ok = err <= tol and grad_err <= tol
        print(
            f"  {backend:>6} -> {choice:<6} out err {err:.2e}  grad err {grad_err:.2e}  "
            f"fwd {fwd_ms:8.3f} ms ({flops / fwd_ms / 1e9:7.1f} TFLOP/s)  fwd+bwd {step_ms:8.3f} ms  "
            f"{'ok' if ok else 'MISMATCH'}  [{reason}]"
        )
        if not ok:
            failures.append((backend, layout, shape, causal, err, grad_err))
        del inputs, out, grads
    del ref, ref_in, ref_grads
    if device.type == "cuda":
        torch.cuda.empty_cache()

# forward-mode AD (the consistency methods): auto must take the math backend and agree with a finite difference
gen = torch.Generator(device=device).manual_seed(1)
q, k, v, tq = (torch.randn(1, 4, 256, 64, generator=gen, device=device, dtype=torch.float32) for _ in range(4))
f = lambda q: attention(q, k, v, causal=True)  # noqa: E731
_, tangent = torch.func.jvp(f, (q,), (tq,))
eps = 1e-3
fd = (f(q + eps * tq) - f(q - eps * tq)) / (2 * eps)
jvp_err = rel_err(tangent, fd)
print(f"\njvp through auto (float32): rel err vs finite difference {jvp_err:.2e}")
if jvp_err > 1e-2:
    failures.append(("jvp", "bhsd", (1, 4, 256, 64), True, jvp_err, 0.0))

if failures:
    print(f"\nFAILED: {len(failures)} mismatch(es) above tolerance {tol}:")
    for failure in failures:
        print("  ", failure)
    sys.exit(1)
print(f"\nall backends agree with SDPA math in float32 (tolerance {tol})")
EOF
