"""Self-Forcing on the toy causal transformer (small, float64): the training rollout is the inference rollout, one
gradient-carrying student call per chunk, no gradient through the cache, causality of the noise, what the teacher
and the critic see, the DMD gradient, the critic phase, exit steps alike on every rank, the student's init."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from distill_mixins.causal import chunk_bounds, extend_condition, generate_causal, window_condition
from distill_mixins.methods.dmd2 import dmd_loss
from distill_mixins.methods.self_forcing import SelfForcingConfig, SelfForcingMixin
from distill_mixins.toy.causal_dit import ToyCausalDiT, ToyCausalVideo2World
from distill_mixins.toy.text import ToyTextEncoder
from tests.distributed import run_distributed

SMALL = {"dim": 32, "depth": 2, "heads": 4, "text_dim": 16, "max_frames": 12, "image_size": 8, "chunk_size": 3}
B, C, T, HW = 2, 3, 7, 8  # T = 7: chunks of 1, 3, 3 frames


class ToySelfForcing(SelfForcingMixin, ToyCausalVideo2World):
    pass


def model(**overrides) -> ToySelfForcing:
    torch.manual_seed(0)
    net = ToyCausalDiT(**SMALL).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = SelfForcingConfig(**{"guidance_scale": 2.0, "student_update_freq": 2, **overrides})
    return ToySelfForcing(net, ToyTextEncoder(dim=16, layers=1, heads=2), distill=config).double()


def batch(seed: int = 1) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"clip": torch.rand(B, C, T, HW, HW, generator=g, dtype=torch.float64) * 2 - 1,
            "prompt": ["red square moving left", "blue circle moving up"]}


def prepared(m: ToySelfForcing, seed: int = 1):
    data = m.prepare_data(batch(seed))
    data.condition.text = data.condition.text.double()
    data.uncondition.text = data.uncondition.text.double()
    return data


def test_training_rollout_equals_generate_causal():
    """All exits at the last step, no context noise, the same draws: the rollout is the inference sampler's."""
    m = model(exit_mode="last")
    data = prepared(m)
    with m.drawing(0, B) as draws:
        noise = draws.randn_like(data.x0)
        G = m.student_sample(data, noise, grad=False)
    with m.drawing(0, B) as draws:
        draws.randn_like(data.x0)  # the noise's stream, as above
        reference = generate_causal(m, data.condition, noise, randn_like=draws.randn_like, renoise="fresh")
    assert G.shape == (B, C, T, HW, HW) and torch.equal(G, reference)


def _grad_calls(m: ToySelfForcing) -> list[tuple[int, bool]]:
    calls: list[tuple[int, bool]] = []
    m.net.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        (kwargs.get("start_frame", 0), torch.is_grad_enabled())) if kwargs.get("attention") == "cached" else None,
        with_kwargs=True)
    return calls


@pytest.mark.parametrize("first, expected", [(0, [0, 1, 4]), (2, [4])])
def test_one_gradient_carrying_call_per_chunk(first, expected):
    m = model(start_gradient_frame=first)
    calls = _grad_calls(m)
    data = prepared(m)
    drawn = []
    exit_steps = m.exit_steps
    m.exit_steps = lambda frames: drawn.append(exit_steps(frames)) or drawn[-1]  # record the rollout's exits
    with m.drawing(3, B) as draws:
        G = m.student_sample(data, draws.randn_like(data.x0), grad=True)
    (exits,) = drawn
    with_grad = [start for start, enabled in calls if enabled]
    assert with_grad == expected
    steps = {s: sum(1 for start, _ in calls if start == s) for s, _ in chunk_bounds(T, 3)}
    assert steps == {s: exits[i] + 2 for i, (s, _) in enumerate(chunk_bounds(T, 3))}  # exit + 1 steps, 1 refresh
    assert G.requires_grad == bool(expected)


def test_a_late_chunks_loss_reaches_only_its_own_call():
    """The gradient of a loss on the last chunk is the same whether earlier chunks carried gradient or not: the
    cache holds detached keys and values."""
    grads = []
    for first in (0, 4):
        m = model(start_gradient_frame=first, exit_mode="last")
        data = prepared(m)
        with m.drawing(2, B) as draws:
            G = m.student_sample(data, draws.randn_like(data.x0), grad=True)
        G[:, :, 4:].pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-12, rtol=0)


def test_noise_of_a_later_chunk_leaves_earlier_chunks_unchanged():
    m = model(exit_mode="per_chunk")
    data = prepared(m)
    outs = []
    for bump in (0.0, 1.0):
        with m.drawing(4, B) as draws:
            noise = draws.randn_like(data.x0)
            noise[:, :, 4:] += bump
            outs.append(m.student_sample(data, noise, grad=False))
    assert torch.equal(outs[0][:, :, :4], outs[1][:, :, :4])
    assert not torch.equal(outs[0][:, :, 4:], outs[1][:, :, 4:])


def test_teacher_and_critic_see_the_whole_clip_once_at_one_time():
    m = model()
    seen: dict[str, list[tuple[int, torch.Tensor]]] = {"teacher": [], "critic": []}
    for name, net in (("teacher", m.net_teacher), ("critic", m.net_fake_score)):
        net.register_forward_hook(lambda mod, args, out, name=name: seen[name].append((args[0].shape[2], args[1])))
    m.training_step(batch(), 0)  # iteration 0: a student phase (student_update_freq 2)
    assert [frames for frames, _ in seen["teacher"]] == [T, T]  # conditional and unconditional branch (CFG)
    assert [frames for frames, _ in seen["critic"]] == [T]
    times = [tau for _, tau in seen["teacher"] + seen["critic"]]
    for tau in times:  # one time per sample: every frame but the given first one at the same critic time
        assert torch.equal(tau[:, 1:], times[0][:, 1:]) and bool((tau[:, 1:] == tau[:, 1:2]).all())


def test_dmd_gradient_on_the_rollout_is_analytic():
    m = model()
    data = prepared(m)
    with m.drawing(5, B) as draws:
        G = m.student_sample(data, draws.randn_like(data.x0), grad=False).requires_grad_()
    g = torch.Generator().manual_seed(6)
    x0_teacher, x0_fake = (torch.randn(G.shape, generator=g, dtype=torch.float64) for _ in range(2))
    (grad,) = torch.autograd.grad(dmd_loss(G, x0_teacher, x0_fake), G)
    w = (G.detach() - x0_teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grad, (x0_fake - x0_teacher) / w / G.numel(), atol=1e-12, rtol=0)


def test_critic_phase_leaves_the_student_without_gradients():
    m = model()
    _, loss = m.training_step(batch(), 1)  # iteration 1: a critic phase
    loss.backward()
    assert all(p.grad is None for p in m.net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net_fake_score.parameters())


def test_student_starts_from_the_given_weights(tmp_path):
    torch.manual_seed(3)
    other = ToyCausalDiT(**SMALL).double()
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    m = model(student_weights=str(path))
    for name, value in other.state_dict().items():
        assert torch.equal(m.net.state_dict()[name], value)
        assert torch.equal(m.net_fake_score.state_dict()[name], m.net_teacher.state_dict()[name])
    with pytest.raises(ValueError, match="extract-weights"):
        SelfForcingConfig(student_weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="exit_mode"):
        SelfForcingConfig(exit_mode="random")


def _exits(rank: int, world_size: int) -> dict[str, list[list[int]]]:
    out = {}
    for mode in ("shared", "per_chunk", "last"):
        m = model(exit_mode=mode)
        m.set_data_parallel(rank, world_size)
        draws = []
        for iteration in range(6):
            with m.drawing(iteration, 1):
                draws.append(m.exit_steps(T))
        out[mode] = draws
    return out


def test_exit_steps_agree_across_ranks():
    ranks = run_distributed(_exits, 2)
    assert ranks[0] == ranks[1]
    shared, per_chunk = ranks[0]["shared"], ranks[0]["per_chunk"]
    assert all(len(set(e)) == 1 for e in shared) and len({e[0] for e in shared}) > 1  # one step a clip, varying
    assert any(len(set(e)) > 1 for e in per_chunk)
    assert all(e == [3, 3, 3] for e in ranks[0]["last"])


# ------------------------------------------------------------------------------ longer training rollouts

LONG = 10  # chunks of 1, 3, 3, 3 frames; the window is frames 3..9


def test_a_longer_rollout_is_the_inference_rollout_and_scores_its_last_window():
    """With ``rollout_frames`` L the student rolls out L frames exactly as ``generate_causal`` does on the extended
    condition (the clip's noise continued by fresh draws), and the clip scored is its last T frames, on conditions
    whose given first frame is the window's own."""
    m = model(exit_mode="last", rollout_frames=LONG)
    data = prepared(m)
    with m.drawing(0, B) as draws:
        G, window = m.student_clip(data, draws.randn_like(data.x0), grad=False)
    with m.drawing(0, B) as draws:
        noise = draws.randn_like(data.x0)
        noise = torch.cat([noise, draws.randn_like(noise.new_empty(B, C, LONG - T, HW, HW))], dim=2)
        reference = generate_causal(m, extend_condition(data.condition, LONG), noise, randn_like=draws.randn_like,
                                    renoise="fresh")
    assert G.shape == (B, C, T, HW, HW) and torch.equal(G, reference[:, :, -T:])
    for condition, original in ((window.condition, data.condition), (window.uncondition, data.uncondition)):
        assert torch.equal(condition.gt_frames, G) and torch.equal(condition.frame_mask, original.frame_mask)
        assert torch.equal(condition.text, original.text)
    assert window.x0 is data.x0


def test_a_longer_rollout_trains_through_the_window_only_with_the_teacher_on_the_window():
    m = model(rollout_frames=LONG)
    seen = []
    m.net_teacher.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[2]))
    output, loss = m.training_step(batch(), 0)  # a student phase
    loss.backward()
    assert seen == [T, T] and torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.parameters())
    _, loss = m.training_step(batch(), 1)  # a critic phase on a longer rollout's window
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("values", "message"), [
    ({"rollout_frames": 1}, "rollout_frames=1"),
    ({"rollout_frames": True}, "rollout_frames=True"),
    ({"rollout_frames": 12, "refine_weight": 1.0}, "refine term"),
    ({"rollout_frames": 12, "energy_weight": 1.0}, "energy-score term"),
])
def test_longer_rollout_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        SelfForcingConfig(**values)


def test_a_rollout_shorter_than_the_clip_is_refused():
    m = model(rollout_frames=5)
    data = prepared(m)
    with m.drawing(0, B) as draws, pytest.raises(ValueError, match="shorter than the clip's 7 frames"):
        m.student_clip(data, draws.randn_like(data.x0), grad=False)


def test_extend_and_window_conditions_known_answers():
    m = model()
    condition = prepared(m).condition
    long = extend_condition(condition, LONG)
    assert long.gt_frames.shape[2] == long.frame_mask.shape[2] == LONG
    assert torch.equal(long.gt_frames[:, :, :T], condition.gt_frames) and not long.gt_frames[:, :, T:].any()
    assert torch.equal(long.frame_mask[:, :, :T], condition.frame_mask) and not long.frame_mask[:, :, T:].any()
    clip = torch.randn(B, C, T, HW, HW, dtype=torch.float64, requires_grad=True)
    windowed = window_condition(condition, clip)
    assert torch.equal(windowed.gt_frames, clip) and not windowed.gt_frames.requires_grad
    text_only = torch.zeros(B, 4)
    assert extend_condition(text_only, LONG) is text_only and window_condition(text_only, clip) is text_only
    with pytest.raises(ValueError, match="score windows of the clip's length"):
        window_condition(condition, clip[:, :, :3])
    with pytest.raises(ValueError, match="shorter than the condition's 7 frames"):
        extend_condition(condition, 3)

    class NotADataclass:
        gt_frames, frame_mask = condition.gt_frames, condition.frame_mask

    with pytest.raises(TypeError, match="make the condition a dataclass"):
        extend_condition(NotADataclass(), LONG)
