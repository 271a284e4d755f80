"""DistillationTrainer: bit-exact resume, phases under accumulation, the existing-loop snippet, non-finite
losses, signals, autocast, callbacks and data order."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from distill_mixins.checkpointer import DistillCheckpointer
from distill_mixins.trainer import (
    Callback,
    DistillationTrainer,
    FunctionData,
    IterableData,
    MapStyleData,
    NonFiniteLossError,
    TensorBoardLogger,
    TrainerConfig,
    ValidationCallback,
    VisualCallback,
    distillation_rows,
    seed_everything,
    student_sample_validation,
)

from distill_mixins import (
    DiscriminatorConfig,
    DistillConfig,
    DMD2Config,
    DMD2Mixin,
    EMAConfig,
    KDConfig,
    KDMixin,
    OptimizerConfig,
)
from distill_mixins.testing import MLPDenoiser, ToyHost, mixture_batch, ring_mixture
from tests.conftest import SHAPE, make_neural_model, param_hash

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

DOCS = Path(__file__).resolve().parents[1] / "docs"
MIXTURE = ring_mixture(shape=SHAPE)


class NeuralKD(KDMixin, ToyHost):
    """KD on a tiny random MLP teacher."""


def make_kd(**config_kwargs) -> NeuralKD:
    torch.manual_seed(0)
    teacher = MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=32, depth=2)
    config_kwargs.setdefault("student_optimizer", OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0))
    model = NeuralKD(teacher, "edm_eps", distill=KDConfig(**config_kwargs))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def kd_batch(step: int, n: int = 8) -> dict[str, torch.Tensor]:
    """A synthetic KD batch, a pure function of ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    target = torch.randn(n, *SHAPE, generator=g)
    return {"noise": torch.randn(n, *SHAPE, generator=g), "teacher_x0": target, "x0": target,
            "label": torch.randint(0, 2, (n,), generator=g)}


def mixture_data(step: int) -> dict[str, torch.Tensor]:
    return mixture_batch(MIXTURE, 8, torch.Generator().manual_seed(step))


class NeuralDMD2(DMD2Mixin, ToyHost):
    """DMD2 on a tiny random MLP teacher."""


def make_dmd2(gan: bool = False, **config_kwargs) -> NeuralDMD2:
    """DMD2 with student_update_freq=5 (the default); with ``gan``, attention heads on two hidden layers of the
    teacher and an R1 penalty."""
    torch.manual_seed(0)
    teacher = MLPDenoiser(SHAPE, "rf_velocity", num_labels=2, hidden=32, depth=3)
    opt = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)
    if gan:
        config_kwargs["gan_loss_weight"] = 0.1
        config_kwargs["discriminator"] = DiscriminatorConfig(
            kind="attention", feature_dim=32, taps=(1, 3), block_path="body", hidden=16, r1_weight=0.1
        )
    distill = DMD2Config(student_optimizer=opt, critic_optimizer=opt, discriminator_optimizer=opt, guidance_scale=2.0,
                         **config_kwargs)
    return NeuralDMD2(teacher, "rf_velocity", distill=distill)


def make_two_phase(**config_kwargs):
    opt = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)
    config_kwargs.setdefault("student_optimizer", opt)
    config_kwargs.setdefault("critic_optimizer", opt)
    return make_neural_model(**config_kwargs)


# Each entry: (model factory, data function). Both methods use EMA; the two-phase one alternates a student phase
# every 5 iterations with critic phases (student_update_freq=5), like DMD2.
METHODS = {
    "kd": (lambda: make_kd(ema=EMAConfig(kind="power")), kd_batch),
    "two_phase": (lambda: make_two_phase(student_update_freq=5, ema=EMAConfig(halflife_steps=3)), mixture_data),
    "dmd2": (lambda: make_dmd2(ema=EMAConfig(halflife_steps=3)), mixture_data),
    "dmd2_gan": (lambda: make_dmd2(gan=True, ema=EMAConfig(kind="power")), mixture_data),
}


def train(model, data, run_dir: Path, iterations: int, callbacks=(), **config) -> DistillationTrainer:
    """Float32 unless asked (``autocast="none"``): the known answers here (bit-exact resume, the docs' loop, 1e-6
    accumulation) must not depend on whether this machine's ``auto`` means bf16; tiny MLPs gain nothing from it."""
    config.setdefault("progress", False)
    config.setdefault("autocast", "none")
    trainer = DistillationTrainer(
        model, FunctionData(data), TrainerConfig(iterations=iterations, run_dir=str(run_dir), **config), callbacks
    )
    trainer.result = trainer.fit()
    return trainer


def full_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of every trained network, the EMA, the model's buffers, optimizers and schedulers."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, opt in model.optimizers().items():
        for index, state in opt.state_dict()["state"].items():
            out.update({f"optim.{name}.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
    for name, sched in model.lr_schedulers().items():
        out[f"sched.{name}"] = torch.tensor([sched.last_epoch, *sched.get_last_lr()], dtype=torch.float64)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bit_exact(method, tmp_path):
    build, data = METHODS[method]
    n, m = 7, 6  # crosses student/critic phases of the two-phase method on both sides of the stop
    whole = train(build(), data, tmp_path / "whole", n + m, grad_accum=2)
    first = train(build(), data, tmp_path / "split", n, grad_accum=2)
    resumed = train(build(), data, tmp_path / "split", n + m, grad_accum=2)
    assert first.result.iteration == n and resumed.result.start_iteration == n and resumed.result.iteration == n + m
    a, b = full_state(whole.model), full_state(resumed.model)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    print(f"{method}: {len(a)} tensors compared after {n}+{m} iterations, {len(differing)} differ")
    assert differing == []
    assert any(k.startswith("model.net_ema.") for k in a) and any(k.startswith("optim.net.") for k in a)
    assert whole.model.state_dict()["ema_num_updates"] == resumed.model.state_dict()["ema_num_updates"]


class PhaseRecorder(Callback):
    """Hashes of the student and the critic after every iteration."""

    def __init__(self) -> None:
        self.hashes: list[tuple[str, str, str]] = []

    def on_step_end(self, trainer, step) -> None:
        self.hashes.append((step.phase, param_hash(trainer.model.net), param_hash(trainer.model.net_fake_score)))


def test_phase_is_fixed_for_the_accumulation_window_and_only_its_networks_step(tmp_path):
    model = make_two_phase(student_update_freq=5)
    calls: list[tuple[int, bool]] = []
    step = model.training_step

    def recording_step(batch, iteration):
        out = step(batch, iteration)
        calls.append((iteration, model.net.training and model.net.head.weight.requires_grad))
        return out

    model.training_step = recording_step
    recorder = PhaseRecorder()
    before = (param_hash(model.net), param_hash(model.net_fake_score))
    train(model, mixture_data, tmp_path, 10, [recorder], grad_accum=3)
    assert [it for it, _ in calls] == [it for it in range(10) for _ in range(3)]
    assert [student for _, student in calls] == [it % 5 == 0 for it in range(10) for _ in range(3)]
    previous = before
    for phase, net, critic in recorder.hashes:
        if phase == "student":
            assert net != previous[0] and critic == previous[1]
        else:
            assert net == previous[0] and critic != previous[1]
        previous = (net, critic)
    assert [p for p, _, _ in recorder.hashes] == ["student" if it % 5 == 0 else "critic" for it in range(10)]


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    sgd = OptimizerConfig(name="sgd", lr=0.1, betas=(0.0, 0.999), weight_decay=0.0, grad_clip=None)
    small = train(make_kd(student_optimizer=sgd), lambda k: kd_batch(k, 4), tmp_path / "a", 3, grad_accum=2)

    def large(k):
        parts = [kd_batch(2 * k, 4), kd_batch(2 * k + 1, 4)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    big = train(make_kd(student_optimizer=sgd), large, tmp_path / "b", 3)
    a, b = small.model.net.state_dict(), big.model.net.state_dict()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"accumulation 2x4 vs batch 8, 3 SGD steps: max weight difference {gap:.2e}")
    assert gap < 1e-6


def existing_loop_snippet() -> str:
    text = (DOCS / "existing_loop.md").read_text()
    match = re.search(r"<!-- snippet: existing-loop -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/existing_loop.md lost its snippet marker"
    return match.group(1)


@pytest.mark.parametrize("method", ["kd", "two_phase"])
def test_existing_loop_snippet_from_the_docs_matches_the_trainer(method, tmp_path):
    build, data = METHODS[method]
    model = build()
    seed_everything(0)  # what the trainer does at a fresh start
    exec(existing_loop_snippet(), {"model": model, "batches": map(data, itertools.count()), "num_iterations": 8})
    trainer = train(build(), data, tmp_path, 8)
    a, b = full_state(model), full_state(trainer.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert param_hash(model.net) != param_hash(build().net)  # the loop trained


def nan_from(steps: set[int] | int):
    def data(step: int) -> dict[str, torch.Tensor]:
        batch = kd_batch(step)
        if (step in steps) if isinstance(steps, set) else step >= steps:
            batch["teacher_x0"] = torch.full_like(batch["teacher_x0"], float("nan"))
        return batch

    return data


class Hashes(Callback):
    def __init__(self) -> None:
        self.student: list[str] = []

    def on_step_end(self, trainer, step) -> None:
        self.student.append(param_hash(trainer.model.net))


def test_a_nonfinite_loss_skips_its_iteration_and_is_logged(tmp_path):
    hashes = Hashes()
    trainer = train(make_kd(), nan_from({3}), tmp_path, 6, [hashes], log_every=1)
    assert trainer.result.skipped_iterations == 1
    assert hashes.student[3] == hashes.student[2] and hashes.student[4] != hashes.student[3]
    state = json.loads((trainer.result.checkpoint / "trainer_state.json").read_text())
    assert state["nonfinite_loss_total"] == 1 and state["nonfinite_loss_in_row"] == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 0, 1, 0, 0]
    assert "loss/student" not in records[3] and records[4]["loss/student"] > 0


def test_nonfinite_losses_in_a_row_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    trainer = DistillationTrainer(
        make_kd(), FunctionData(nan_from(5)),
        TrainerConfig(iterations=20, run_dir=str(tmp_path), save_every=2, max_nonfinite_in_row=3, progress=False,
                      autocast="none"),
    )
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row \(iterations 5-7\).*iter_000004"):
        trainer.fit()
    checkpointer = DistillCheckpointer(tmp_path / "checkpoints")
    assert checkpointer.latest().name == "iter_000004" and checkpointer.find_resumable().name == "iter_000004"


class SendSignal(Callback):
    def __init__(self, at: int, sig: int = signal.SIGTERM) -> None:
        self.at, self.sig = at, sig

    def on_step_end(self, trainer, step) -> None:
        if step.iteration == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_stops_cleanly_and_the_run_resumes_exactly(sig, tmp_path):
    build, data = METHODS["two_phase"]
    previous = signal.getsignal(sig)
    stopped = train(build(), data, tmp_path / "split", 12, [SendSignal(3, sig)], grad_accum=2)
    assert stopped.result.stop_reason == f"signal {signal.Signals(sig).name}"
    assert stopped.result.signal_number == sig and stopped.result.iteration == 4
    assert stopped.result.checkpoint.name == "iter_000004"
    assert signal.getsignal(sig) is previous  # handlers restored
    resumed = train(build(), data, tmp_path / "split", 12, grad_accum=2)
    whole = train(build(), data, tmp_path / "whole", 12, grad_accum=2)
    assert resumed.result.start_iteration == 4 and resumed.result.completed
    a, b = full_state(whole.model), full_state(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    build, data = METHODS["two_phase"]
    model = build()
    before = param_hash(model.net), param_hash(model.net_fake_score)
    trainer = train(model, data, tmp_path, 6, autocast="bf16")
    assert trainer.result.skipped_iterations == 0 and trainer.scaler is None
    assert (param_hash(model.net), param_hash(model.net_fake_score)) != before[0:2]


def test_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path):
    build, data = METHODS["two_phase"]
    first = train(build(), data, tmp_path, 6, autocast="fp16")
    saved = torch.load(first.result.checkpoint / "optim.pt", weights_only=True)["grad_scaler"]
    assert saved["scale"] == first.scaler.get_scale() and saved["_growth_tracker"] == 6
    resumed = DistillationTrainer(build(), FunctionData(data), TrainerConfig(
        iterations=6, run_dir=str(tmp_path), autocast="fp16", progress=False))
    assert resumed.scaler.state_dict()["_growth_tracker"] == 0  # fresh: the checkpoint's 6 must come from loading
    resumed.fit()
    assert resumed.scaler.get_scale() == saved["scale"]
    assert resumed.scaler.state_dict()["_growth_tracker"] == 6


def test_callbacks_write_metrics_validation_and_visuals_without_changing_training(tmp_path):
    build, data = METHODS["kd"]
    written = []
    visual = VisualCallback(lambda model, it: [model.generate(kd_batch(0)["label"], kd_batch(0)["noise"])],
                            writer=lambda out, it, rows: written.append((out, it, rows[0].shape)))
    validation = ValidationCallback(student_sample_validation(kd_batch(99)))
    logged = train(build(), data, tmp_path / "a", 6, [visual, validation], log_every=2, visual_every=2,
                   validate_every=3)
    plain = train(build(), data, tmp_path / "b", 6)
    assert param_hash(logged.model.net) == param_hash(plain.model.net)  # callbacks leave the RNG alone
    assert [(it, shape) for _, it, shape in written] == [(2, (8, *SHAPE)), (4, (8, *SHAPE)), (6, (8, *SHAPE))]
    assert written[0][0] == tmp_path / "a" / "visuals"
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss/student" in r]
    val_records = [r for r in records if "val/sample_mse" in r]
    assert [r["iteration"] for r in train_records] == [1, 3, 5]
    assert all(r["it_per_s"] > 0 and "grad_norm/net" in r and r["lr/net"] == 1e-3 for r in train_records)
    assert [r["iteration"] for r in val_records] == [2, 5] and all(r["val/sample_mse"] > 0 for r in val_records)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["trainer"]["iterations"] == 6 and config["distill"]["type"] == "KDConfig"


def test_metrics_of_an_interrupted_run_are_not_duplicated_on_resume(tmp_path):
    build, data = METHODS["kd"]
    train(build(), data, tmp_path, 6, [SendSignal(3)], log_every=1)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:  # a record written after the checkpoint, before the process died
        f.write(json.dumps({"iteration": 4, "loss/student": 1.0}) + "\n")
    train(build(), data, tmp_path, 6, log_every=1)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]


def test_tensorboard_is_optional_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(make_kd(), kd_batch, tmp_path, 1, [TensorBoardLogger()])


def test_map_style_data_is_a_function_of_seed_and_step():
    dataset = [{"i": torch.tensor(i)} for i in range(10)]
    a, b = MapStyleData(dataset, 4, seed=3), MapStyleData(dataset, 4, seed=3)
    stream = [i for step in range(5) for i in a.indices(step)]  # 20 samples = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation per epoch
    assert [b.indices(step) for step in (4, 0, 2)] == [a.indices(step) for step in (4, 0, 2)]  # any order
    assert MapStyleData(dataset, 4, seed=4).indices(0) != a.indices(0)
    assert torch.equal(a.batch(1)["i"], torch.tensor(a.indices(1)))
    assert MapStyleData(dataset, 4, shuffle=False).indices(2) == [8, 9, 0, 1]


def test_iterable_data_restarts_the_factory_at_the_requested_step():
    starts = []

    def factory(start):
        starts.append(start)
        return iter(range(start, 100))

    data = IterableData(factory)
    assert [data.batch(k) for k in (5, 6, 7, 9)] == [5, 6, 7, 9]  # sequential reads and a skip forward
    assert data.batch(2) == 2  # backward: a new iterator
    assert starts == [5, 2]
    with pytest.raises(RuntimeError, match="ran out"):
        IterableData(lambda start: iter(range(start, 3))).batch(3)
    with pytest.raises(TypeError, match="wrap a step -> batch function in FunctionData"):
        IterableData(kd_batch).batch(0)


def test_trainer_config_and_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="TrainerConfig.autocast='fp8'"):
        TrainerConfig(autocast="fp8")
    with pytest.raises(ValueError, match="TrainerConfig.grad_accum=0"):
        TrainerConfig(grad_accum=0)
    train(make_kd(), kd_batch, tmp_path, 2)
    with pytest.raises(ValueError, match="resume='never' but .* holds checkpoints"):
        train(make_kd(), kd_batch, tmp_path, 2, resume="never")
    with pytest.raises(ValueError, match="map-style dataset needs TrainerConfig.batch_size"):
        DistillationTrainer(make_kd(), [kd_batch(0)], TrainerConfig(run_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="compose a method mixin"):
        DistillationTrainer(torch.nn.Linear(2, 2), kd_batch, TrainerConfig(run_dir=str(tmp_path)))


def test_resume_from_an_explicit_checkpoint_continues_in_a_new_run_dir(tmp_path):
    build, data = METHODS["kd"]
    first = train(build(), data, tmp_path / "a", 4)
    branch = train(build(), data, tmp_path / "b", 7, resume=str(first.result.checkpoint))
    whole = train(build(), data, tmp_path / "c", 7)
    assert branch.result.start_iteration == 4 and param_hash(branch.model.net) == param_hash(whole.model.net)
    assert DistillCheckpointer(tmp_path / "b" / "checkpoints").latest().name == "iter_000007"


def test_a_config_without_critic_trains_only_the_student(tmp_path):
    model = make_kd()
    assert list(model.optimizers()) == ["net"]
    trainer = train(model, kd_batch, tmp_path, 3)
    assert trainer.result.completed and isinstance(model.distill_config, DistillConfig)


def test_the_default_training_visual_writes_a_png_and_a_gif_of_the_four_rows(tmp_path):
    build, data = METHODS["kd"]
    batch = kd_batch(0)
    rows_fn = distillation_rows(batch, guidance=2.0)
    model = build()
    rows = rows_fn(model, 0)
    assert list(rows) == ["student 1-step", "teacher 1-step", "condition", "ground truth"]
    assert torch.equal(rows["student 1-step"], model.generate(batch["label"], batch["noise"]))
    assert rows["condition"] is None and torch.equal(rows["ground truth"], batch["x0"])
    train(model, data, tmp_path, 2, [VisualCallback(rows_fn)], visual_every=2)
    png, gif = tmp_path / "visuals" / "visual-000002.png", tmp_path / "visuals" / "visual-000002.gif"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and gif.read_bytes()[:6] == b"GIF89a"
