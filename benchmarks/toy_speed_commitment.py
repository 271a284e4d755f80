"""Where along the teacher's sampler does a toy sample choose its speed, and does it choose one of the data's two?

A toy condition leaves two futures (speeds 2 and 3 px a frame); a sample that keeps to the prompt must commit to
one. For each toy teacher (default: the shipped UNet and the shipped transformer) this prints

- along the 36-step DDIM CFG sampler, at every 4th step: the histogram of the constant speed (2, 2.25, ..., 3)
  that best fits the tracked shape of the step's x0 prediction, and the share of predictions within adherence's
  1.5 px of one of them;
- on held-out real clips noised at rectified-flow time tau: the network's MSE to the exact denoiser
  (:func:`distill_mixins.toy.oracle.exact_x0`, the posterior mean over the condition's two futures) and, for scale,
  the exact denoiser's own MSE to the clean clip; and how the prediction weighs the condition's two futures
  (:func:`distill_mixins.toy.oracle.future_weights`, frame by frame): the spread of that weight over a clip's frames
  (the exact denoiser: 0, it weighs whole futures), how far it leans from 0.5, and the correlation of each clip's
  mean weight with the exact denoiser's (does the network lean towards the right future?).

    python -m benchmarks.toy_speed_commitment [--clips 48] [--teacher PATH ...]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from distill_mixins.eval.motion import speed_errors
from distill_mixins.sampling import SAMPLERS, time_grid
from distill_mixins.toy.clips import ToyClips, make_clips
from distill_mixins.toy.evalset import EVAL_SEED
from distill_mixins.toy.oracle import exact_x0, future_weights, futures
from distill_mixins.toy.quality import load_for_quality
from distill_mixins.toy.train import (
    DIT_WEIGHTS,
    WEIGHTS,
    TeacherTrainConfig,
    first_frame_mask,
    frame_times,
    noised_clip,
)
from distill_mixins.trigflow import max_time, trigflow_to_native_time

GRID = (2.0, 2.25, 2.5, 2.75, 3.0)
TAUS = (0.97, 0.93, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3)
GIVEN_SIGMA = TeacherTrainConfig().conditional_sigma  # the given frame's noise level, as the teachers trained


def commitment(model: Any, clips: ToyClips, steps: int, guidance: float) -> None:
    """Print the best-fit speed histogram of the x0 predictions along the teacher's DDIM sampler."""
    x0, condition, uncondition = model.get_data_and_condition({"clip": clips.video, "prompt": clips.prompts})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sd, cfg = model.sigma_data, model.distill_config
    grid = time_grid(steps, "shifted_rf", sd, sigma_max=cfg.sigma_max, t_max=max_time(model.scaling, sd, cfg.sigma_max))
    guided = model.guided_denoiser(model.net_teacher, condition, uncondition, guidance)
    seen = []

    def denoise(x, t):
        out = guided(x, t)
        seen.append((float(t.reshape(-1)[0]), out))
        return out

    SAMPLERS["ddim"](denoise, noise, grid, sigma_data=sd)
    for step, (t, out) in enumerate(seen):
        if step % 4 and step != len(seen) - 1:
            continue
        errors = speed_errors(model.decode(out.float()), clips.prompts, GRID)  # (speeds, N)
        best, fits = errors.argmin(dim=0), errors.min(dim=0).values
        hist = torch.bincount(best[torch.isfinite(fits)], minlength=len(GRID)).tolist()
        tau = float(trigflow_to_native_time(torch.tensor(t, dtype=torch.float64), model.scaling, sd))
        print(f"  step {step:2d}  tau {tau:.3f}  best speed {' '.join(f'{h:3d}' for h in hist)}"
              f"  within 1.5 px {float((fits <= 1.5).double().mean()):.2f}")


@torch.no_grad()
def exact_gap(host: Any, clips: ToyClips) -> None:
    """Print the network's MSE to the exact denoiser on noised held-out clips, per tau."""
    x0 = host.encode(clips.video)
    n, frames = x0.shape[0], x0.shape[2]
    candidates = futures(clips.specs)
    mask = first_frame_mask(n, frames)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    text = host.embed_prompts(clips.prompts)
    for tau_value in TAUS:
        tau = torch.full((n,), tau_value)
        x = noised_clip(x0, eps, tau, mask, GIVEN_SIGMA)
        exact = exact_x0(x, tau, candidates)
        out = host.net(x, frame_times(host.net, tau, mask, GIVEN_SIGMA), mask, text)
        w, w_exact = future_weights(out, candidates), future_weights(exact, candidates)  # (N, T - 1)
        spread, spread_exact = (float(v.std(dim=1).median()) for v in (w, w_exact))
        lean, lean_exact = (float((v.mean(1) - 0.5).abs().median()) for v in (w, w_exact))
        agreement = float(torch.corrcoef(torch.stack([w.mean(1), w_exact.mean(1)]))[0, 1])
        print(f"  tau {tau_value:.2f}  network vs exact {float((out - exact)[:, :, 1:].pow(2).mean()):.5f}"
              f"  (exact vs clean clip {float((exact - x0)[:, :, 1:].pow(2).mean()):.5f})  future weight: spread over"
              f" frames {spread:.3f} (exact {spread_exact:.3f}), |w - 0.5| {lean:.3f} (exact {lean_exact:.3f}),"
              f" correlation with exact {agreement:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48, help="held-out conditions")
    parser.add_argument("--teacher", nargs="*", default=[str(WEIGHTS), str(DIT_WEIGHTS)], help="toy teacher weights")
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    clips = make_clips(args.clips, EVAL_SEED)
    print(f"{args.clips} held-out conditions; speeds {GRID} px/frame; CPU {torch.backends.cpu.get_cpu_capability()}, "
          "float32")
    for path in args.teacher:
        model = load_for_quality(path)
        print(f"{path}: x0 predictions along {args.steps}-step DDIM, CFG w = {args.guidance}")
        commitment(model, clips, args.steps, args.guidance)
        print("  on real clips noised at tau:")
        exact_gap(model, clips)


if __name__ == "__main__":
    main()
