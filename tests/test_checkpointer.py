"""DistillCheckpointer: layout, atomicity under SIGKILL, damaged files, no teacher, selective loads, extract-weights."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from distill_mixins.checkpointer import (
    PAUSE_ENV,
    CheckpointError,
    DistillCheckpointer,
    capture_rng_state,
    extract_student_weights,
    load_networks,
    load_student_weights,
    restore_rng_state,
    student_file_metadata,
)
from distill_mixins.trainer import DistillationTrainer, FunctionData, TrainerConfig
from loguru import logger
from safetensors import safe_open
from safetensors.torch import load_file

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
from distill_mixins.cli import main as cli_main
from distill_mixins.testing import MLPDenoiser, ToyHost, mixture_batch, ring_mixture
from tests.conftest import SHAPE, NeuralDistill, make_neural_model, param_hash

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

MIXTURE = ring_mixture(shape=SHAPE)
ADAM = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0)


class NeuralKD(KDMixin, ToyHost):
    """KD on a tiny random MLP teacher."""


def mlp(hidden: int = 32, seed: int = 0) -> MLPDenoiser:
    return MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=hidden, depth=2, seed=seed)


def make_kd(**config_kwargs) -> NeuralKD:
    config_kwargs.setdefault("student_optimizer", ADAM)
    model = NeuralKD(mlp(), "edm_eps", distill=KDConfig(**config_kwargs))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def kd_batch(step: int, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    target = torch.randn(n, *SHAPE, generator=g)
    return {"noise": torch.randn(n, *SHAPE, generator=g), "teacher_x0": target, "x0": target,
            "label": torch.randint(0, 2, (n,), generator=g)}


def mixture_data(step: int) -> dict[str, torch.Tensor]:
    return mixture_batch(MIXTURE, 8, torch.Generator().manual_seed(step))


def plain_steps(model, data, iterations: int) -> None:
    for it in range(iterations):
        _, loss = model.training_step(data(it), it)
        loss.backward()
        model.optimizer_step(it)


def two_phase(**kwargs) -> NeuralDistill:
    return make_neural_model(student_optimizer=ADAM, critic_optimizer=ADAM, **kwargs)


def test_layout_manifest_and_latest_pointer(tmp_path):
    model = two_phase(ema=EMAConfig())
    plain_steps(model, mixture_data, 6)
    checkpointer = DistillCheckpointer(tmp_path)
    path = checkpointer.save(model, 6, trainer_state={"iteration": 6}, config={"note": "x"})
    assert path == tmp_path / "iter_000006"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "critic.safetensors", "ema.safetensors", "extra.safetensors", "manifest.json",
                     "optim.pt", "rng.pt", "student.safetensors", "trainer_state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["networks"] == {"net": "student.safetensors", "net_fake_score": "critic.safetensors",
                                    "net_ema": "ema.safetensors"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert (tmp_path / "latest").read_text() == "iter_000006\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000006", "latest"]  # no temporaries left
    assert load_file(str(path / "extra.safetensors"))["ema_num_updates"].item() == 2  # student phases 0 and 5
    with safe_open(str(path / "critic.safetensors"), "pt") as f:
        assert f.metadata()["network"] == "net_fake_score" and set(f.keys()) == set(model.net_fake_score.state_dict())


def test_keep_last_prunes_the_oldest(tmp_path):
    model = make_kd()
    checkpointer = DistillCheckpointer(tmp_path, keep_last=2)
    for it in range(1, 6):
        checkpointer.save(model, it)
    assert [p.name for p in checkpointer.list_checkpoints()] == ["iter_000004", "iter_000005"]


def test_saving_an_iteration_again_replaces_it_and_a_newer_abandoned_history_is_left_alone(tmp_path):
    model = make_kd()
    checkpointer = DistillCheckpointer(tmp_path, keep_last=2)
    for it in (2, 4, 6):
        plain_steps(model, kd_batch, 1)
        checkpointer.save(model, it)
    checkpointer.load(model, tmp_path / "iter_000004")  # go back, e.g. to branch off an older checkpoint
    plain_steps(model, lambda k: kd_batch(k + 50), 2)
    checkpointer.save(model, 5)
    assert [p.name for p in checkpointer.list_checkpoints()] == ["iter_000004", "iter_000005", "iter_000006"]
    assert checkpointer.find_resumable().name == "iter_000005"  # the pointer decides, not the largest number
    checkpointer.save(model, 6)
    assert [p.name for p in checkpointer.list_checkpoints()] == ["iter_000005", "iter_000006"]
    saved = load_file(str(tmp_path / "iter_000006" / "student.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.net.state_dict().items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_load_restores_networks_buffers_optimizers_schedulers_and_rng(tmp_path):
    model = two_phase(ema=EMAConfig(kind="power"))
    plain_steps(model, mixture_data, 7)
    DistillCheckpointer(tmp_path).save(model, 7, trainer_state={"iteration": 7, "seed": 3})
    expected_rand = torch.rand(4)
    fresh = two_phase(ema=EMAConfig(kind="power"))
    loaded = DistillCheckpointer(tmp_path).resume(fresh)
    assert torch.equal(torch.rand(4), expected_rand)  # RNG restored to the save point
    assert loaded.iteration == 7 and loaded.trainer_state == {"iteration": 7, "seed": 3}
    assert loaded.config["distill"]["student_update_freq"] == 5
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, opt in model.optimizers().items():
        sa, sb = opt.state_dict(), fresh.optimizers()[name].state_dict()
        assert sa["param_groups"] == sb["param_groups"]
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
        assert model.lr_schedulers()[name].state_dict() == fresh.lr_schedulers()[name].state_dict()


def test_rng_state_round_trip_covers_torch_numpy_and_python():
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    restore_rng_state(pickle.loads(pickle.dumps(state)))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


class NeuralDMD2(DMD2Mixin, ToyHost):
    """DMD2 on a tiny MLP teacher."""


@pytest.mark.parametrize("method", ["kd", "two_phase", "dmd2_gan"])
def test_no_teacher_tensor_appears_in_any_saved_file(method, tmp_path):
    """Size distillation makes the teacher recognizable: hidden width 40 appears nowhere, nor do its bytes."""
    torch.manual_seed(0)
    teacher = MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=40, depth=2)
    nets = {"student_net": mlp(16, seed=1), "student_optimizer": ADAM, "ema": EMAConfig()}
    if method == "kd":
        model = NeuralKD(teacher, "edm_eps", distill=KDConfig(**nets))
        plain_steps(model, kd_batch, 3)
    elif method == "two_phase":
        model = NeuralDistill(teacher, "edm_eps", distill=DistillConfig(
            critic_net=mlp(16, seed=2), critic_optimizer=ADAM, student_update_freq=5, **nets))
        plain_steps(model, mixture_data, 3)
    else:  # GAN heads on the critic's hidden layers (width 16)
        disc = DiscriminatorConfig(kind="attention", feature_dim=16, taps=(1,), block_path="body", source="critic",
                                   hidden=8)
        model = NeuralDMD2(teacher, "edm_eps", distill=DMD2Config(
            critic_net=mlp(16, seed=2), critic_optimizer=ADAM, discriminator_optimizer=ADAM, guidance_scale=2.0,
            gan_loss_weight=0.1, discriminator=disc, **nets))
        plain_steps(model, mixture_data, 3)
    path = DistillCheckpointer(tmp_path).save(model, 3)
    tensors = []
    for file in path.glob("*.safetensors"):
        weights = load_file(str(file))
        assert not any("teacher" in key for key in weights), file.name
        tensors += list(weights.values())
    optim = torch.load(path / "optim.pt", weights_only=True)
    tensors += [v for opt in optim["optimizers"].values() for s in opt["state"].values() for v in s.values()]
    assert tensors and not any(40 in t.shape for t in tensors)  # no teacher-sized tensor
    nets = ["net", "net_ema"] + {"kd": [], "two_phase": ["net_fake_score"]}.get(
        method, ["net_fake_score", "net_discriminator"])
    expected = sum(t.numel() for name in nets for t in getattr(model, name).state_dict().values()) + 1  # + EMA count
    expected += sum(torch.as_tensor(v).numel() for opt in model.optimizers().values()
                    for s in opt.state_dict()["state"].values() for v in s.values())
    assert sum(t.numel() for t in tensors) == expected  # student, EMA, critic and their optimizers: nothing else
    blobs = [file.read_bytes() for file in path.iterdir()]
    teacher_tensors = [t for t in model.net_teacher.state_dict().values() if t.numel() >= 8]
    hits = sum(t.contiguous().numpy().tobytes() in blob for t in teacher_tensors for blob in blobs)
    student_tensors = [t for t in model.net.state_dict().values() if t.numel() >= 8]
    assert all(any(t.numpy().tobytes() in blob for blob in blobs) for t in student_tensors)  # the search works
    print(f"{method}: {len(tensors)} saved tensors, {len(teacher_tensors)} teacher tensors searched, {hits} found")
    assert hits == 0


def test_a_network_sharing_storage_with_the_teacher_is_refused(tmp_path):
    model = make_kd()
    model.net_ema = model.net_teacher  # a mistake: an EMA aliasing the teacher
    with pytest.raises(CheckpointError, match="net_ema entry .* shares storage with the teacher"):
        DistillCheckpointer(tmp_path).save(model, 1)


@pytest.fixture
def warnings():
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(sink)


def two_checkpoints(tmp_path) -> tuple[DistillCheckpointer, NeuralKD]:
    model = make_kd()
    checkpointer = DistillCheckpointer(tmp_path)
    plain_steps(model, kd_batch, 2)
    checkpointer.save(model, 2)
    saved = make_kd()
    checkpointer.load(saved, tmp_path / "iter_000002")
    plain_steps(model, kd_batch, 2)
    checkpointer.save(model, 4)
    return checkpointer, saved


def test_a_truncated_file_is_named_and_auto_resume_falls_back_with_a_warning(tmp_path, warnings):
    checkpointer, at_2 = two_checkpoints(tmp_path)
    student = tmp_path / "iter_000004" / "student.safetensors"
    student.write_bytes(student.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"iter_000004/student.safetensors is truncated"):
        checkpointer.load(make_kd(), tmp_path / "iter_000004")
    fresh = make_kd()
    loaded = checkpointer.resume(fresh)
    assert loaded.iteration == 2 and param_hash(fresh.net) == param_hash(at_2.net)
    assert any("iter_000004" in m and "student.safetensors is truncated" in m for m in warnings)


def test_a_checksum_mismatch_is_named_and_auto_resume_falls_back(tmp_path, warnings):
    checkpointer, _ = two_checkpoints(tmp_path)
    optim = tmp_path / "iter_000004" / "optim.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    optim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"iter_000004/optim.pt fails its checksum"):
        checkpointer.load(make_kd(), tmp_path / "iter_000004")
    assert checkpointer.find_resumable().name == "iter_000002"
    assert any("optim.pt fails its checksum" in m for m in warnings)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    checkpointer, _ = two_checkpoints(tmp_path)
    for path in checkpointer.list_checkpoints():
        (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint .*manifest.json is missing"):
        checkpointer.find_resumable()


SAVE_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from distill_mixins import EMAConfig, KDConfig, KDMixin
from distill_mixins.testing import MLPDenoiser, ToyHost
from distill_mixins.checkpointer import DistillCheckpointer

class KD(KDMixin, ToyHost):
    pass

net = MLPDenoiser((2, 2, 1, 1), "edm_eps", num_labels=2, hidden=32, depth=2, seed=0)
model = KD(net, "edm_eps", distill=KDConfig(ema=EMAConfig()))
DistillCheckpointer(sys.argv[1]).save(model, 4)
"""


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    model = make_kd(ema=EMAConfig())
    plain_steps(model, kd_batch, 2)
    checkpointer = DistillCheckpointer(tmp_path)
    checkpointer.save(model, 2)
    script = tmp_path.parent / "save_and_pause.py"
    script.write_text(SAVE_SCRIPT)
    env = {**os.environ, PAUSE_ENV: "60"}
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".tmp-iter_000004-*/PAUSED")):
            assert process.poll() is None and time.monotonic() < deadline, "the save never reached its pause"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    (half,) = tmp_path.glob(".tmp-iter_000004-*")
    assert (half / "student.safetensors").exists() and not (half / "manifest.json").exists()
    assert not (tmp_path / "iter_000004").exists() and checkpointer.latest().name == "iter_000002"
    assert [p.name for p in checkpointer.list_checkpoints()] == ["iter_000002"]  # the half-written one is invisible
    fresh = make_kd(ema=EMAConfig())
    assert checkpointer.resume(fresh).iteration == 2 and param_hash(fresh.net) == param_hash(model.net)
    checkpointer.save(fresh, 3)  # the next save clears the dead process's temporary directory
    assert not half.exists() and checkpointer.latest().name == "iter_000003"


def test_selective_load_takes_a_kd_student_into_a_two_phase_run(tmp_path):
    kd = NeuralKD(mlp(), "edm_eps", distill=KDConfig(student_optimizer=ADAM))  # same architecture as conftest's
    with torch.no_grad():
        kd.net.head.bias.add_(1.0)
    path = DistillCheckpointer(tmp_path).save(kd, 10)
    target = two_phase(ema=EMAConfig())
    critic = param_hash(target.net_fake_score)
    with pytest.raises(CheckpointError, match=r"no weights for \['net_fake_score', 'net_ema'\].*load_networks"):
        DistillCheckpointer(tmp_path).load(target, path)
    loaded = load_networks(target, path, ("student",))
    assert loaded.iteration == 10
    assert param_hash(target.net) == param_hash(kd.net) == param_hash(target.net_ema)  # EMA reset to the student
    assert param_hash(target.net_fake_score) == critic  # the critic keeps its initialization
    with pytest.raises(CheckpointError, match="has no 'critic' weights; it holds \\['student'\\]"):
        load_networks(target, path, ("critic",))


def test_loading_never_unpickles_code(tmp_path):
    model = make_kd()
    path = DistillCheckpointer(tmp_path).save(model, 1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizers": Evil()}, path / "optim.pt")
    manifest = json.loads((path / "manifest.json").read_text())  # a consistent manifest: only the unpickler is left
    data = (path / "optim.pt").read_bytes()
    manifest["files"]["optim.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):
        DistillCheckpointer(tmp_path).load(make_kd(), path)
    assert not marker.exists()


def test_extract_weights_then_load_gives_identical_student_outputs(tmp_path, capsys):
    model = make_kd(ema=EMAConfig(halflife_steps=2))
    config = TrainerConfig(iterations=5, run_dir=str(tmp_path / "run"), progress=False, autocast="none")
    DistillationTrainer(model, FunctionData(kd_batch), config).fit()
    out, out_ema = tmp_path / "student.safetensors", tmp_path / "ema.safetensors"
    assert cli_main(["extract-weights", "--input", str(tmp_path / "run"), "--output", str(out)]) == 0
    assert cli_main(["extract-weights", "--input", str(tmp_path / "run" / "checkpoints" / "iter_000005"),
                     "--output", str(out_ema), "--ema"]) == 0
    assert student_file_metadata(out)["iteration"] == "5" and student_file_metadata(out_ema)["network"] == "net_ema"
    x = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(5))
    sigma = torch.linspace(0.1, 20.0, 16)
    labels = torch.arange(16) % 3 - 1
    for file, net in ((out, model.net), (out_ema, model.net_ema)):
        host = ToyHost(mlp(seed=7), "edm_eps")  # plain host for inference: no mixin
        load_student_weights(host, file)
        with torch.no_grad():
            assert torch.equal(host.predict(host.net, x, sigma, labels), model.predict(net, x, sigma, labels))
    fresh = make_kd()
    load_student_weights(fresh, out)  # into a distillation model (e.g. the next stage)
    noise = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fresh.generate(labels[:8], noise), model.generate(labels[:8], noise))


def test_extract_weights_errors_name_the_problem(tmp_path):
    model = make_kd()
    DistillCheckpointer(tmp_path / "checkpoints").save(model, 1)
    with pytest.raises(CheckpointError, match=r"no EMA weights \(it holds: net\): the run had no EMA"):
        extract_student_weights(tmp_path, tmp_path / "x.safetensors", ema=True)
    assert cli_main(["extract-weights", "--input", str(tmp_path), "--output", str(tmp_path / "y"), "--ema"]) == 2
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        extract_student_weights(tmp_path / "nothing", tmp_path / "x.safetensors")
    extract_student_weights(tmp_path, tmp_path / "s.safetensors")
    with pytest.raises(CheckpointError, match="does not fit ToyHost's student network"):
        load_student_weights(ToyHost(mlp(hidden=8), "edm_eps"), tmp_path / "s.safetensors")
