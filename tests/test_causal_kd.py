"""CausalKD with known answers: the inputs it gathers from the ODE pairs, its loss, the frames it leaves out, the
context noise, and the contract checks of a causal method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill_mixins.causal import chunk_bounds
from distill_mixins.methods.causal_kd import CausalKDConfig, CausalKDMixin
from distill_mixins.methods.kd import KD_PATH, KD_PATH_T, KD_TEACHER_X0
from distill_mixins.testing import ToyHost

B, C, T, H, W = 6, 2, 7, 2, 2


class Scale(nn.Module):
    """x0 = a * x (rectified-flow state in, clean estimate out); records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor, time: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.a * x


class ProbeCausalHost(ToyHost):
    """A causal host whose block-causal forward records (x, time) and returns the velocity of x0 = a x."""

    chunk_size = 3

    def __init__(self) -> None:
        super().__init__(Scale(), "rf_velocity")
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def predict_causal(self, net, x, time, condition):
        self.calls.append((x.detach().clone(), time.detach().clone()))
        tau = time[:, None, :, None, None].to(x.dtype)
        x0 = net(x, time, condition)
        return (x - x0) / tau.clamp(min=1e-12)  # velocity; at tau = 0 x0 = x whatever it is

    def predict_chunk(self, net, x, time, condition, start_frame, store_kv):
        raise NotImplementedError

    def clear_kv_cache(self, net):
        pass


class ProbeCausalKD(CausalKDMixin, ProbeCausalHost):
    pass


def batch(seed: int = 0, K: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        KD_TEACHER_X0: torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64),
        KD_PATH: torch.randn(B, K, C, T, H, W, generator=g, dtype=torch.float64),
        "x0": torch.zeros(B, C, T, H, W, dtype=torch.float64), "label": torch.zeros(B, dtype=torch.long),
    }


def model(**kwargs) -> ProbeCausalKD:
    return ProbeCausalKD(distill=CausalKDConfig(**kwargs))


def test_inputs_are_the_path_state_of_each_chunks_step():
    m = model()
    data = batch()
    with m.drawing(3, B):
        x_in, t, clean = m.causal_kd_inputs(data)
    ts = m.student_times()
    grid = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
    states = torch.cat([data[KD_PATH], data[KD_TEACHER_X0][:, None]], dim=1)
    seen = set()
    for b in range(B):
        for start, end in chunk_bounds(T, 3):
            k = int(torch.nonzero(grid == t[b, start])[0])
            seen.add(k)
            assert torch.equal(t[b, start:end], grid[k].expand(end - start))  # constant within the chunk
            assert torch.equal(x_in[b, :, start:end], states[b, k, :, start:end])
            assert bool(clean[b, start]) == (k == 4)
    assert seen == set(range(5))  # 18 chunk draws of this seed cover every step, clean included


def test_loss_known_answer_and_clean_frames_left_out():
    """x0_hat = a x for the native rectified-flow state x = x_t / (cos t + sin t) (a clean frame: x_t itself), so the
    loss is 0.5 mean over the non-clean frames of (x0_hat - latent)^2; with the clean frames kept, their error
    enters the mean too."""
    data = batch(1)
    for keep in (False, True):
        m = model(clean_frames_in_loss=keep)
        with m.drawing(0, B):
            x_in, t, clean = m.causal_kd_inputs(data)
        _, loss = m.training_step(data, 0)
        a = 0.5
        native = x_in / (t.cos() + t.sin())[:, None, :, None, None]
        x0 = torch.where(clean[:, None, :, None, None], x_in, a * native)
        err = (x0 - data[KD_TEACHER_X0]).pow(2)
        w = torch.ones_like(t) if keep else (~clean).double()
        expected = 0.5 * (err * w[:, None, :, None, None]).sum() / (w.sum() * C * H * W)
        assert clean.any() and (~clean).any()
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
        loss.backward()
        assert m.net.a.grad is not None and m.net.a.grad != 0


def test_zero_loss_when_the_student_returns_the_latent():
    """An oracle student (x0_hat = latent on every frame) has loss exactly 0."""
    data = batch(2)
    m = model()
    latent = data[KD_TEACHER_X0]
    m.predict_causal = lambda net, x, time, condition: (x - latent) / time[:, None, :, None, None].clamp(min=1e-300)
    _, loss = m.training_step(data, 0)
    assert float(loss) < 1e-20


def test_one_block_causal_forward_per_step_with_per_frame_times():
    m = model()
    m.training_step(batch(), 0)
    assert len(m.calls) == 1
    x, time = m.calls[0]
    assert x.shape == (B, C, T, H, W) and time.shape == (B, T)


def test_context_noise_renoises_clean_frames():
    data = batch(4)
    m = model(context_noise=0.1)
    with m.drawing(5, B):
        x_in, t, clean = m.causal_kd_inputs(data)
    assert clean.any()
    assert torch.all(t[clean] == 0.1)
    cos, sin = math.cos(0.1), math.sin(0.1)
    with m.drawing(5, B):  # the same draws again: the steps, then the context noise
        m.draws.randint(0, 5, B, 3)
        eps = m.draws.randn_like(data[KD_TEACHER_X0])
    expected = cos * data[KD_TEACHER_X0] + sin * eps
    mask = clean[:, None, :, None, None].expand_as(x_in)
    assert torch.allclose(x_in[mask], expected[mask], atol=1e-12)
    plain = model()
    with plain.drawing(5, B):
        x_plain, t_plain, _ = plain.causal_kd_inputs(data)
    assert torch.equal(x_in[~mask], x_plain[~mask]) and torch.equal(t[~clean], t_plain[~clean])


def test_path_shape_and_times_are_checked():
    m = model()
    data = batch(K=3)
    with pytest.raises(ValueError, match="the 4-step student needs"), m.drawing(0, B):
        m.causal_kd_inputs(data)
    data = batch()
    data[KD_PATH_T] = torch.tensor([[1.0, 0.9, 0.8, 0.5]], dtype=torch.float64).expand(B, 4)
    with pytest.raises(ValueError, match="differs from the student's times"), m.drawing(0, B):
        m.causal_kd_inputs(data)


def test_config_errors():
    with pytest.raises(ValueError, match="context_noise"):
        CausalKDConfig(context_noise=2.0)
    with pytest.raises(ValueError, match="multistep_input"):
        CausalKDConfig(multistep_input="interpolated")


def test_a_causal_method_needs_a_causal_host():
    with pytest.raises(TypeError, match="lacks `predict_causal`"):
        type("Bad", (CausalKDMixin, ToyHost), {})
    with pytest.raises(TypeError, match="chunk_size"):
        type("NoChunk", (CausalKDMixin, ProbeCausalHost), {"chunk_size": None})(distill=CausalKDConfig())


def test_bridge_extracts_the_causal_students_weights(tmp_path):
    """extract-weights on a CausalKD checkpoint: the file loads into the next stage's causal student."""
    from distill_mixins.checkpointer import DistillCheckpointer, extract_student_weights, load_student_weights

    m = model()
    _, loss = m.training_step(batch(), 0)
    loss.backward()
    m.optimizer_step(0)
    out = extract_student_weights(DistillCheckpointer(tmp_path / "ckpt").save(m, 1), tmp_path / "student.safetensors")
    fresh = model()
    assert not torch.equal(fresh.net.a, m.net.a)
    load_student_weights(fresh, out)
    assert torch.equal(fresh.net.a, m.net.a)
    assert torch.equal(fresh.net_teacher.a, torch.tensor(0.5, dtype=torch.float64))  # the teacher is untouched
