"""The toy teacher's quality bar, for the shipped teachers and for one you train (``distill-mixins toy-teacher-eval``).

The bar (docs/toy.md): with 36 DDIM steps and CFG w = 3 on held-out conditions, the teacher follows the prompt
(prompt adherence >= 0.8: the tracked shape stays within 1.5 px of the prompt's bouncing trajectory in every frame),
keeps the shape (temporal consistency >= 0.8, and at least 0.1 above its own single step, which smears it), and is
far closer to held-out real clips than its single step (FD at most half of it; FD on fewer than 1,000 clips is
biased upward, so only the ratio is a goal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_mixins.precision import autocast
from distill_mixins.toy.clips import make_clips
from distill_mixins.toy.evalset import EVAL_SEED, REFERENCE_SEED, teacher_sampler


@dataclass
class TeacherQuality:
    """The bar's figures on ``clips`` held-out conditions: the teacher at ``steps`` steps and at 1 step (CFG)."""

    clips: int
    steps: int
    adherence: float
    consistency: float
    consistency_1step: float
    fd: float
    fd_1step: float

    def goals(self) -> list[tuple[str, bool, str]]:
        """(goal, met, measured) of the bar."""
        return [
            ("prompt adherence >= 0.8", self.adherence >= 0.8, f"{self.adherence:.3f}"),
            ("temporal consistency >= 0.8 and >= the 1-step one + 0.1",
             self.consistency >= max(0.8, self.consistency_1step + 0.1),
             f"{self.consistency:.3f} vs {self.consistency_1step:.3f}"),
            ("FD <= 0.5 x the 1-step FD", self.fd <= 0.5 * self.fd_1step, f"{self.fd:.3f} vs {self.fd_1step:.3f}"),
        ]

    @property
    def ok(self) -> bool:
        """Every goal met."""
        return all(met for _, met, _ in self.goals())


@torch.no_grad()
def teacher_quality(model: Any, *, clips: int = 96, steps: int = 36, guidance: float = 3.0,
                    precision: str = "auto") -> TeacherQuality:
    """:class:`TeacherQuality` of the teacher of a composed toy ``model`` (see :func:`sampling_model`)."""
    from distill_mixins.eval.motion import prompt_adherence, temporal_consistency
    from distill_mixins.eval.video import VideoFeatureNet, frechet_video_distance

    held, reference = make_clips(clips, EVAL_SEED), make_clips(clips, REFERENCE_SEED)
    x0, condition, uncondition = model.get_data_and_condition({"clip": held.video, "prompt": held.prompts})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for n in (steps, 1):
        with autocast(precision):
            out[n] = model.decode(teacher_sampler(model, n, guidance)(condition, uncondition, noise).float())
    net = VideoFeatureNet()
    return TeacherQuality(
        clips=clips, steps=steps, adherence=prompt_adherence(out[steps], held.prompts),
        consistency=temporal_consistency(out[steps], held.prompts),
        consistency_1step=temporal_consistency(out[1], held.prompts),
        fd=frechet_video_distance(out[steps], reference.video, net=net),
        fd_1step=frechet_video_distance(out[1], reference.video, net=net),
    )


def load_for_quality(path: str | Path) -> Any:
    """A composed model sampling the toy teacher in ``path``: a weights file (``toy-teacher`` output or a shipped
    one), or a training run's ``train_state.pt`` (its EMA, the arch from ``teacher_config.json`` beside it)."""
    from distill_mixins.toy.cli import sampling_model
    from distill_mixins.toy.host import ToyVideo2World
    from distill_mixins.toy.text import ToyTextEncoder
    from distill_mixins.toy.train import load_toy_teacher, make_network

    path = Path(path)
    if path.suffix != ".pt":
        return sampling_model(load_toy_teacher(path)).eval()
    config = path.with_name("teacher_config.json")
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no teacher_config.json beside it: give a run directory's "
                                "train_state.pt (`distill-mixins toy-teacher --out DIR` writes both).")
    arch = json.loads(config.read_text()).get("arch", "unet")
    host = ToyVideo2World(make_network(arch), ToyTextEncoder())
    host.load_state_dict(torch.load(path, weights_only=True)["ema"])
    if arch == "dit":
        from distill_mixins.toy.causal_dit import ToyCausalVideo2World

        host = ToyCausalVideo2World(host.net, host.text_encoder)
    return sampling_model(host).eval()
