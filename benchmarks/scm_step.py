"""Cost of an sCM student step against a plain diffusion training step of the same network.

For a tiny video DiT (:class:`~distill_mixins.testing.TinyVideoDiT`: patch embedding, RoPE self-attention, MLP
blocks) and a fixed batch, prints the median wall time (``--reps`` interleaved rounds after a warm-up) of:

- a plain diffusion training step: rectified-flow denoising loss, forward + backward + optimizer step;
- an sCM step (``training_step`` + ``backward`` + ``optimizer_step``) with ``torch.func.jvp`` (the attention
  dispatch's explicit attention with its forward rule), with CFG (w = 6, two teacher passes) and without (w = 1),
  and with CFG through SDPA's math backend instead (what the dispatch ran before the explicit rule);
- the same with the finite-difference fallback (two extra student forwards instead of the JVP);
- the JVP alone (explicit rules; without the linear / LayerNorm rules of :mod:`~distill_mixins.parallel.explicit_rules`,
  i.e. PyTorch's own derivatives there; SDPA's math backend) and one forward alone, for reference;

each as a ratio to the plain step (goal: sCM with the JVP <= 2.6x). An sCM step runs the teacher (1 or 2 forwards),
the student's JVP (a forward with tangents, no graph) and the student's forward + backward.

    python benchmarks/scm_step.py [--device cpu|cuda] [--batch 4] [--dim 128] [--depth 4] [--reps 5] [--threads N]
        [--malloc tuned|default]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

import distill_mixins.methods.scm as scm_module
from distill_mixins import OptimizerConfig, SCMConfig, SCMMixin
from distill_mixins.allocator import tune_cpu_allocator
from distill_mixins.methods.scm import velocity_jvp
from distill_mixins.parallel.attention import set_attention_backend
from distill_mixins.parallel.explicit_attention import ExplicitSDPA
from distill_mixins.testing import TinyVideoDiT, ToyHost
from distill_mixins.trigflow import add_noise


class BenchSCM(SCMMixin, ToyHost):
    """The benchmark host composed with sCM."""


def build(args: argparse.Namespace, **config) -> BenchSCM:
    def dit(seed: int) -> TinyVideoDiT:
        return TinyVideoDiT(args.channels, dim=args.dim, depth=args.depth, heads=args.heads, seed=seed)

    opt = OptimizerConfig(name="adamw", lr=1e-5, weight_decay=0.0, grad_clip=1.0)
    distill = SCMConfig(student_net=dit(1), student_optimizer=opt, tangent_warmup=0, **config)
    return BenchSCM(dit(0), "rf_velocity", distill=distill).to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                        help="glibc malloc: distill_mixins.allocator's settings (as the CLI runs) or glibc's own")
    args = parser.parse_args()
    tuned = args.malloc == "tuned" and tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.frames, args.size, args.size)
    batch = {"x0": torch.randn(shape, generator=g).to(device), "label": torch.randint(0, 2, (args.batch,)).to(device)}

    models = {
        "sCM, jvp, CFG w=6": build(args, guidance_scale=6.0, derivative="jvp"),
        "sCM, jvp, no CFG": build(args, guidance_scale=1.0, derivative="jvp"),
        "sCM, finite difference, CFG w=6": build(args, guidance_scale=6.0, derivative="finite_difference"),
        "sCM, finite difference, no CFG": build(args, guidance_scale=1.0, derivative="finite_difference"),
    }
    plain = build(args, guidance_scale=1.0)
    plain.set_phase(True)
    plain_opt = plain.optimizers()["net"]
    counter = {"it": 0}

    def plain_step() -> None:
        x0, labels = batch["x0"], batch["label"]
        t = torch.rand(x0.shape[0], dtype=torch.float64) * 1.5 + 0.05
        x0_hat = plain.trigflow_denoise(plain.net, add_noise(x0, torch.randn_like(x0), t, 1.0), t, labels).x0
        loss = (x0_hat.float() - x0.float()).pow(2).mean()
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def scm_step(model: BenchSCM) -> Callable[[], None]:
        def run() -> None:
            counter["it"] += 1
            _, loss = model.training_step(batch, counter["it"])
            loss.backward()
            model.optimizer_step(counter["it"])
        return run

    def with_math_sdpa(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            previous = set_attention_backend("math")
            try:
                fn()
            finally:
                set_attention_backend(previous)
        return run

    def without_linear_rules(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with mock.patch.object(scm_module, "ExplicitRules", ExplicitSDPA):  # the attention rule only
                fn()
        return run

    probe = models["sCM, jvp, no CFG"]
    x_t = torch.randn(shape, generator=g).to(device)
    t = torch.full((args.batch,), 0.8, dtype=torch.float64, device=device)
    velocity = probe.student_velocity(probe.prepare_data(batch))

    def jvp_only() -> None:
        velocity_jvp(velocity, x_t, t, x_t)

    def forward_only() -> None:
        with torch.no_grad():
            velocity(x_t, t)

    fns: dict[str, Callable[[], None]] = {"plain diffusion step": plain_step}
    fns.update({name: scm_step(model) for name, model in models.items()})
    fns["sCM, jvp via SDPA math, CFG w=6"] = with_math_sdpa(scm_step(build(args, guidance_scale=6.0,
                                                                            derivative="jvp")))
    fns["sCM, jvp w/o linear+LN rules, CFG"] = without_linear_rules(scm_step(models["sCM, jvp, CFG w=6"]))
    fns.update({"student JVP alone (no grad)": jvp_only,
                "student JVP w/o linear+LN rules": without_linear_rules(jvp_only),
                "student JVP via SDPA math": with_math_sdpa(jvp_only),
                "student forward alone (no grad)": forward_only})
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(args.reps + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = median["plain diffusion step"]
    params = sum(p.numel() for p in plain.net.parameters())
    print(f"device {device}, CPU capability {torch.backends.cpu.get_cpu_capability()}, threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, glibc malloc {'tuned' if tuned else 'default'}")
    print(f"TinyVideoDiT dim {args.dim}, depth {args.depth}, heads {args.heads} ({params / 1e6:.2f}M params), batch "
          f"{tuple(shape)}, float32, median of {args.reps} interleaved rounds")
    for name, seconds in median.items():
        print(f"  {name:34s} {1000 * seconds:9.1f} ms   {seconds / base:5.2f}x the plain step")
    ratio = median["sCM, jvp, CFG w=6"] / base
    print(f"sCM step with the JVP and CFG: {ratio:.2f}x a plain diffusion step (goal <= 2.6x): "
          f"{'met' if ratio <= 2.6 else 'NOT met'}")


if __name__ == "__main__":
    main()
