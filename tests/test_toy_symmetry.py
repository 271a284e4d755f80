"""The toy world's symmetries: moving a rendered clip equals rendering the moved clip; KD batches move whole."""

from dataclasses import replace

import pytest
import torch
from distill_mixins.trainer import FunctionData

from distill_mixins.toy.clips import SIZE, ClipSpec, make_clips, render_specs
from distill_mixins.toy.symmetry import SYMMETRIES, SymmetricPairs, Symmetry, move_batch


def moved_spec(spec: ClipSpec, g: Symmetry) -> ClipSpec:
    x, y = spec.start
    if g.transpose:
        x, y = y, x
    x, y = (SIZE - x if g.flip_x else x), (SIZE - y if g.flip_y else y)
    return replace(spec, direction=g.direction(spec.direction), start=(x, y))


def test_eight_distinct_symmetries_identity_first():
    assert len(set(SYMMETRIES)) == 8 and SYMMETRIES[0] == Symmetry(False, False, False)
    x = torch.arange(16.0).view(4, 4)
    assert len({tuple(g.apply(x).flatten().tolist()) for g in SYMMETRIES}) == 8


def test_known_directions():
    assert Symmetry(False, True, False).prompt("red square moving left") == "red square moving right"
    assert Symmetry(False, False, True).prompt("red square moving up") == "red square moving down"
    assert Symmetry(True, False, False).prompt("blue circle moving left") == "blue circle moving up"


@pytest.mark.parametrize("g", SYMMETRIES)
def test_moving_a_clip_renders_the_moved_world(g):
    clips = make_clips(16, seed=3)
    moved = [moved_spec(s, g) for s in clips.specs]
    torch.testing.assert_close(g.apply(clips.video), render_specs(moved), atol=1e-5, rtol=0)
    assert [g.prompt(p) for p in clips.prompts] == [s.prompt for s in moved]


def test_move_batch_moves_every_tensor_of_a_sample_alike():
    clips = make_clips(4, seed=5)
    noise = torch.randn(clips.video.shape, generator=torch.Generator().manual_seed(0))
    batch = {"clip": clips.video, "noise": noise, "teacher_x0": clips.video * 0.5, "prompt": clips.prompts,
             "sample_index": torch.arange(4)}
    moves = [SYMMETRIES[i] for i in (0, 3, 5, 7)]
    out = move_batch(batch, moves, ("clip", "noise", "teacher_x0", "path"))
    for i, g in enumerate(moves):
        for key in ("clip", "noise", "teacher_x0"):
            torch.testing.assert_close(out[key][i], g.apply(batch[key][i]), atol=0, rtol=0)
        assert out["prompt"][i] == g.prompt(batch["prompt"][i])
    assert torch.equal(out["sample_index"], batch["sample_index"]) and torch.equal(out["clip"][0], clips.video[0])


def test_symmetric_pairs_are_a_pure_function_of_the_step():
    clips = make_clips(32, seed=9)
    base = FunctionData(lambda step: {"clip": clips.video, "prompt": clips.prompts})
    source = SymmetricPairs(base, seed=1)
    first, again, other = source.batch(4), source.batch(4), source.batch(5)
    assert torch.equal(first["clip"], again["clip"]) and first["prompt"] == again["prompt"]
    assert not torch.equal(first["clip"], other["clip"])
    assert first["prompt"] != clips.prompts  # 32 samples: some moved


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="square frames"):
        SYMMETRIES[1].apply(torch.zeros(2, 4, 5))
    with pytest.raises(KeyError, match="prompt"):
        SymmetricPairs(FunctionData(lambda step: {"clip": torch.zeros(1)})).batch(0)


def test_demo_moves_kd_pairs_when_asked():
    from distill_mixins.cli import build_parser, demo_config

    assert not demo_config(build_parser().parse_args(["demo"])).kd_symmetries
    assert demo_config(build_parser().parse_args(["demo", "--kd-symmetries", "--quick"])).kd_symmetries
