"""KDMixin: the loss, its inputs and errors, and the acceptance figures on the exact mixture teacher."""

from __future__ import annotations

import math
import time

import pytest
import torch

from distill_mixins import KDConfig, KDMixin, OptimizerConfig
from distill_mixins.methods.kd import KD_NOISE, KD_PATH, KD_PATH_T, KD_TEACHER_X0
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, ring_mixture
from distill_mixins.trigflow import add_noise

torch.set_num_threads(1)  # tiny tensors: intra-op threads only add stalls (docs/development.md)

SHAPE = (2, 2, 1, 1)
GUIDANCE = 2.0


class AnalyticKD(KDMixin, ToyHost):
    """The exact mixture teacher with KD, composed as a user composes theirs."""


def make_kd(form: str = "rf_velocity", **config_kwargs) -> AnalyticKD:
    torch.manual_seed(0)
    mixture = ring_mixture(num_modes=8, num_labels=2, shape=SHAPE)
    config_kwargs.setdefault("student_net", MLPDenoiser(SHAPE, form, 2, hidden=256, depth=4))
    config_kwargs.setdefault("student_optimizer", OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0))
    return AnalyticKD(**analytic_host_args(mixture, form), distill=KDConfig(**config_kwargs))


def kd_batch(model: AnalyticKD, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n teacher pairs: labels, noise, the 36-step Heun CFG teacher sample."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    noise = torch.randn(n, *SHAPE, generator=generator)
    x0 = model.generate_teacher(labels, noise, uncondition=torch.full_like(labels, -1), guidance=GUIDANCE)
    return {"label": labels, KD_NOISE: noise, KD_TEACHER_X0: x0, "x0": x0}


def relative_mse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).sum() / ref.pow(2).sum())


def train(model: AnalyticKD, pool: dict[str, torch.Tensor], iterations: int, seed: int = 0) -> float:
    """Plain loop over random minibatches of 256, learning rate decayed linearly to 5%; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    n = pool[KD_NOISE].shape[0]
    (optimizer,) = model.get_optimizers(0)
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for it in range(iterations):
        optimizer.param_groups[0]["lr"] = lr * (1.0 - 0.95 * it / iterations)
        index = torch.randint(0, n, (256,), generator=g)
        _, loss = model.training_step({k: v[index] for k, v in pool.items()}, it)
        loss.backward()
        model.optimizer_step(it)
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ unit tests


def test_loss_is_half_mse_of_the_one_step_prediction():
    model = make_kd()
    batch = kd_batch(model, 8, torch.Generator().manual_seed(0))
    out, loss = model.training_step(batch, 0)
    with torch.no_grad():
        t = model.student_times()[0]
        x0 = model.trigflow_denoise(model.net, math.sin(float(t)) * batch[KD_NOISE], t, batch["label"]).x0
    assert torch.allclose(loss, 0.5 * (x0 - batch[KD_TEACHER_X0]).pow(2).mean(), atol=1e-7)
    assert out["loss_kd"] == loss.detach()


def test_zero_loss_when_the_student_reproduces_the_targets():
    model = make_kd()
    batch = kd_batch(model, 8, torch.Generator().manual_seed(0))
    batch[KD_TEACHER_X0] = model.generate(batch["label"], batch[KD_NOISE])
    _, loss = model.training_step(batch, 0)
    assert loss.item() == 0.0


def test_multistep_path_input_takes_the_state_of_the_drawn_time():
    model = make_kd(student_schedule="cosmos_4step")
    ts = model.student_times()
    n = 64
    path = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1, 1, 1, 1).expand(n, 4, *SHAPE).clone()
    batch = {KD_NOISE: torch.zeros(n, *SHAPE), KD_TEACHER_X0: torch.zeros(n, *SHAPE), KD_PATH: path}
    with model.drawing(0, n):  # the step's draws pick each sample's time
        x_t, t = model.kd_inputs(batch)
    k = x_t[:, 0, 0, 0, 0].long()
    assert torch.equal(t, ts[k])
    assert set(k.tolist()) == {0, 1, 2, 3}  # every student time is drawn


def test_multistep_interpolated_input_is_the_renoised_teacher_sample():
    model = make_kd(student_schedule="cosmos_4step", multistep_input="interpolated")
    assert model.distill_config.renoise == "initial"
    g = torch.Generator().manual_seed(0)
    batch = {KD_NOISE: torch.randn(32, *SHAPE, generator=g), KD_TEACHER_X0: torch.randn(32, *SHAPE, generator=g)}
    with model.drawing(0, 32):
        x_t, t = model.kd_inputs(batch)
    assert torch.allclose(x_t, add_noise(batch[KD_TEACHER_X0], batch[KD_NOISE], t, model.sigma_data))


def test_kd_has_no_critic_and_defaults_follow_the_recipe():
    model = make_kd()
    assert "net_fake_score" not in model._modules
    assert set(model.trainable_networks()) == {"net"}
    config = KDConfig()
    assert config.student_optimizer.lr == 1e-5  # Cosmos-Transfer1 KD
    assert config.renoise == "ode" and KDConfig(multistep_input="interpolated").renoise == "initial"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"student_update_freq": 5}, "KDConfig.student_update_freq=5"),
        ({"multistep_input": "ode_path"}, "KDConfig.multistep_input='ode_path' is not known"),
        ({"renoise": "sde"}, "KDConfig.renoise='sde' is not known"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDConfig(**kwargs)


def test_batch_errors_name_the_missing_key_and_the_fix():
    model = make_kd(student_schedule="cosmos_4step")
    noise = torch.zeros(4, *SHAPE)
    with pytest.raises(KeyError, match="no 'kd/path'.*ODE states"):
        model.training_step({KD_NOISE: noise, KD_TEACHER_X0: noise, "x0": noise, "label": torch.zeros(4).long()}, 0)
    with pytest.raises(ValueError, match=r"needs \(B, 4, 2, 2, 1, 1\)"):
        model.kd_inputs({KD_NOISE: noise, KD_TEACHER_X0: noise, KD_PATH: torch.zeros(4, 3, *SHAPE)})
    path_t = model.student_times().expand(4, 4).clone()
    path_t[:, 2] += 1e-3
    with pytest.raises(ValueError, match="differs from the student's times"):
        model.kd_inputs({KD_NOISE: noise, KD_TEACHER_X0: noise, KD_PATH: torch.zeros(4, 4, *SHAPE), KD_PATH_T: path_t})
    with pytest.raises(KeyError, match="no 'kd/teacher_x0'"):
        make_kd().training_step({KD_NOISE: noise, "x0": noise, "label": torch.zeros(4).long()}, 0)


# ----------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def pairs():
    """16,384 training pairs and 2,048 held-out pairs of the 36-step Heun CFG (w = 2) exact teacher."""
    model = make_kd()
    train_pool = kd_batch(model, 16384, torch.Generator().manual_seed(1))
    held_out = kd_batch(model, 2048, torch.Generator().manual_seed(2))
    return train_pool, held_out


@pytest.mark.acceptance
def test_one_step_kd_matches_the_36_step_teacher(pairs):
    train_pool, held_out = pairs
    model = make_kd()
    seconds = train(model, train_pool, 3000)
    student = model.generate(held_out["label"], held_out[KD_NOISE])
    teacher_1 = model.generate_teacher(
        held_out["label"], held_out[KD_NOISE], uncondition=torch.full_like(held_out["label"], -1),
        guidance=GUIDANCE, steps=1,
    )
    rel, rel_teacher = relative_mse(student, held_out[KD_TEACHER_X0]), relative_mse(teacher_1, held_out[KD_TEACHER_X0])
    print(f"\n1-step KD student: relative MSE {rel:.4f} to the 36-step teacher (goal <= 0.01) after {seconds:.1f} s; "
          f"teacher at 1 step: {rel_teacher:.4f}")
    assert rel <= 0.01
    assert rel_teacher > 50 * rel


def train_and_compare(model: AnalyticKD, train_pool: dict, held_out: dict, iterations: int, what: str, note: str):
    """Train, sample the held-out noise with the student, print and return its relative MSE to the teacher."""
    seconds = train(model, train_pool, iterations)
    rel = relative_mse(model.generate(held_out["label"], held_out[KD_NOISE]), held_out[KD_TEACHER_X0])
    print(f"\n4-step KD student ({what}): relative MSE {rel:.4f} to the teacher ({note}) after {seconds:.1f} s")
    return rel


@pytest.mark.acceptance
def test_four_step_kd_matches_the_36_step_teacher(pairs):
    train_pool, held_out = pairs
    model = make_kd(student_schedule="cosmos_4step", multistep_input="interpolated")
    rel = train_and_compare(model, train_pool, held_out, 4000, "interpolated input, renoise 'initial'", "goal <= 0.005")
    assert rel <= 0.005


def generated_pool(model: AnalyticKD, out_dir, n: int, seed: int, batches_seed: int) -> dict[str, torch.Tensor]:
    """KD data through the library pipeline: generate_kd_data shards (with the ODE path), read by KDShardDataset."""
    from distill_mixins.data import KDDataConfig, KDShardDataset, generate_kd_data
    from distill_mixins.data.examples import analytic_batches

    config = KDDataConfig(num_samples=n, guidance=GUIDANCE, seed=seed, shard_size=4096, batch_size=4096,
                          path_times=tuple(model.student_times().tolist()))
    generate_kd_data(model, analytic_batches(4096, seed=batches_seed), out_dir, config)
    dataset = KDShardDataset(out_dir)
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


@pytest.mark.acceptance
def test_four_step_kd_on_the_teacher_ode_path_from_generated_shards(tmp_path):
    """``multistep_input="path"`` end to end (generate_kd_data -> KDShardDataset -> KD). A student fed the ODE path
    cannot beat the gap of an exact flow-map student (about 1%, benchmarks/kd_multistep_bound.py)."""
    model = make_kd(student_schedule="cosmos_4step")
    train_pool = generated_pool(model, tmp_path / "train", 16384, seed=1, batches_seed=1)
    held_out = generated_pool(model, tmp_path / "held_out", 2048, seed=2, batches_seed=2)
    assert train_pool[KD_PATH].shape == (16384, 4, *SHAPE) and torch.equal(
        train_pool[KD_PATH][:, 0], math.sin(float(model.student_times()[0])) * train_pool[KD_NOISE]
    )
    rel = train_and_compare(model, train_pool, held_out, 4000, "ODE path input, renoise 'ode'",
                            "an exact flow-map student: ~0.010")
    assert rel <= 0.03
