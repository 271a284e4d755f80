"""How much of a bidirectional teacher's sample is decided by noise a causal student never sees?

CausalKD regresses the teacher's clean clip x0(z) from the noise z, chunk by chunk, but chunk c of a causal student
sees only the noise of chunks <= c, while the teacher's chunk c also depends on the noise of later chunks. Every
figure is in CausalKD's loss unit, 0.5 E|prediction - x0(z)|^2 over the frames up to a chunk boundary, on the shipped
toy transformer teacher (36-step CFG, the causal demo's sampler):

- the best causal predictor, E[x0 | z of those frames]: 0.25 E|x0(z) - x0(z')|^2, z' redrawing only later frames' noise;
- the condition's mean clip (no use of the noise): 0.25 E|x0(z) - x0(z'')|^2, z'' redrawing every frame's noise;
- an independent sample of the condition (the noise -> clip map not learnt at all): 0.5 E|x0(z) - x0(z'')|^2;
- with ``--student``, causal students streamed from z (e.g. a CausalKD stage's ``student.safetensors``).

    python -m benchmarks.causal_future_noise [--clips 48] [--student runs/demo-causal/causal_kd/student.safetensors]
"""

from __future__ import annotations

import argparse

import torch
from distill_mixins.checkpointer import load_student_weights
from torch import Tensor

from distill_mixins.causal import chunk_bounds, generate_causal
from distill_mixins.toy.causal_kd import CausalKDRunConfig, causal_kd_model
from distill_mixins.toy.evalset import NOISE_SEED, eval_noise, held_out, teacher_sampler


def half_mse(a: Tensor, b: Tensor) -> float:
    """0.5 mean (a - b)^2 over every element."""
    return 0.5 * float((a - b).double().pow(2).mean())


def main() -> None:
    """Print, per chunk boundary, the three reference errors and each student's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=48, help="held-out conditions")
    parser.add_argument("--steps", type=int, default=36, help="teacher DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--student", nargs="*", default=[], help="causal students' weights (extract-weights output)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = causal_kd_model(CausalKDRunConfig(precision="fp32")).eval()
    clips = held_out(args.clips)
    frames = clips.video.shape[2]
    z = eval_noise(args.clips, tuple(clips.video.shape[1:]), NOISE_SEED)
    fresh = torch.randn(z.shape, generator=torch.Generator().manual_seed(12345))
    sample = teacher_sampler(model, args.steps, args.guidance)

    def teacher(noise: Tensor) -> Tensor:
        return torch.cat([sample(*condition(i), noise[i : i + args.batch]) for i in range(0, args.clips, args.batch)])

    def condition(i: int) -> tuple:
        batch = {"clip": clips.video[i : i + args.batch], "prompt": clips.prompts[i : i + args.batch]}
        _, cond, uncond = model.get_data_and_condition(batch)
        return cond, uncond

    bounds = chunk_bounds(frames, model.chunk_size)
    print(f"toy transformer teacher, {args.steps}-step CFG w={args.guidance}, {args.clips} held-out conditions, "
          f"{frames} frames in chunks {bounds}; CPU threads {torch.get_num_threads()}")
    with torch.no_grad():
        x0, redrawn = teacher(z), teacher(fresh)
        students = {}
        for path in args.student:
            load_student_weights(model.net, path)
            students[path] = torch.cat([generate_causal(model, condition(i)[0], z[i : i + args.batch])
                                        for i in range(0, args.clips, args.batch)])
        for _, end in bounds[:-1]:
            later = z.clone()
            later[:, :, end:] = fresh[:, :, end:]
            other = teacher(later)
            print(f"frames 0-{end - 1} (chunks up to frame {end - 1}), 0.5 MSE against the teacher's clip:")
            print(f"  best causal predictor {0.5 * half_mse(x0[:, :, :end], other[:, :, :end]):.6f}, the condition's "
                  f"mean clip {0.5 * half_mse(x0[:, :, :end], redrawn[:, :, :end]):.6f}, an independent sample "
                  f"{half_mse(x0[:, :, :end], redrawn[:, :, :end]):.6f}")
            for path, student in students.items():
                print(f"  student {path}: {half_mse(student[:, :, :end], x0[:, :, :end]):.6f}", flush=True)


if __name__ == "__main__":
    main()
