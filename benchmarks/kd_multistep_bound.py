"""How close can a multi-step KD student trained on the teacher's ODE path get to the teacher's sample?

An *exact* flow-map student returns, from any state x at time t, the end point of the teacher's ODE
through (x, t): the best a student trained on ODE-path inputs (KDConfig(multistep_input="path")) can
learn. Sampled with the 4-step Cosmos schedule it still misses the teacher's 36-step sample, because
its re-noised states leave the teacher's curved trajectory. This prints that gap (relative MSE) on the
exact 8-mode mixture teacher (36 Heun steps, CFG w = 2), for each re-noising rule.

    python benchmarks/kd_multistep_bound.py [--samples 4096] [--guidance 2]
"""

from __future__ import annotations

import argparse
import math

import torch

from distill_mixins import KDConfig, KDMixin
from distill_mixins.sampling import sample_heun, time_grid
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, ring_mixture
from distill_mixins.trigflow import add_noise


class AnalyticKD(KDMixin, ToyHost):
    """The exact mixture teacher, composed with KD (only its teacher and schedule are used here)."""


def main() -> None:
    """Print the relative MSE of an exact flow-map 4-step student to the teacher's 36-step sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--flow-steps", type=int, default=200, help="Heun steps of the exact flow map")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mixture = ring_mixture(num_modes=8, num_labels=2, shape=(2, 2, 1, 1))
    model = AnalyticKD(
        **analytic_host_args(mixture, "rf_velocity"),
        distill=KDConfig(student_net=MLPDenoiser(mixture.shape, "rf_velocity", 2), student_schedule="cosmos_4step"),
    )
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (args.samples,), generator=g)
    noise = torch.randn(args.samples, *mixture.shape, generator=g)
    sd, ts = model.sigma_data, model.student_times()
    denoise = model.guided_denoiser(model.net_teacher, labels, torch.full_like(labels, -1), args.guidance)
    teacher = model.generate_teacher(labels, noise, uncondition=torch.full_like(labels, -1), guidance=args.guidance)

    def flow_map(x: torch.Tensor, t: float) -> torch.Tensor:
        """End point of the teacher's ODE through state x at time t."""
        grid = time_grid(args.flow_steps, "uniform", sd, t_max=t)
        return sample_heun(denoise, x / (sd * math.sin(t)), grid, sigma_data=sd)

    print(f"exact flow-map student, 4 Cosmos steps {[round(t, 4) for t in ts.tolist()]}, {args.samples} samples")
    print(f"  1 step (t = pi/2): relative MSE {rel(flow_map(sd * noise, float(ts[0])), teacher):.5f}")
    for renoise in ("ode", "initial", "fresh"):
        x = sd * noise
        gen = torch.Generator().manual_seed(1)
        for k, t in enumerate(ts.tolist()):
            x0 = flow_map(x, t)
            if k + 1 < len(ts):
                if renoise == "ode":
                    eps = (x - math.cos(t) * x0) / (sd * math.sin(t))
                else:
                    eps = noise if renoise == "initial" else torch.randn(noise.shape, generator=gen)
                x = add_noise(x0, eps, ts[k + 1], sd)
        print(f"  4 steps, renoise {renoise!r:9s}: relative MSE {rel(x0, teacher):.5f}")


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative squared error sum |x - ref|^2 / sum |ref|^2."""
    return float((x - ref).pow(2).sum() / ref.pow(2).sum())


if __name__ == "__main__":
    main()
