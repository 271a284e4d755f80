"""Sharded checkpoints (FSDP2 networks, torch.distributed.checkpoint): resume at world size 2 bit-exact, load at
world size 1, extract-weights, no teacher, fallback from a damaged shard. CPU, gloo, 2 processes.

One module-scoped run on 2 processes (``sharded_job``) does every distributed part and returns gathered states;
the tests check them and do the single-process parts.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distill_mixins.checkpointer import (
    CheckpointError,
    DistillCheckpointer,
    extract_student_weights,
    load_student_weights,
    verify_checkpoint,
)
from distill_mixins.checkpointer.sharded import is_sharded, load_dcp, read_full_state, saved_keys
from safetensors.torch import load_file
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

from distill_mixins import DistillConfig, EMAConfig, OptimizerConfig
from distill_mixins.cli import main as cli_main
from distill_mixins.testing import MLPDenoiser, mixture_batch, ring_mixture
from tests.conftest import SHAPE, NeuralDistill
from tests.distributed import run_distributed

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

ADAM = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0, warmup_iters=5)  # lr changes every step
MIXTURE = ring_mixture(shape=SHAPE)
NETWORKS = ("net", "net_fake_score", "net_ema")
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SAVE_AT, STOP, GLOBAL_BATCH = (2, 4), 6, 8
TEACHER_WIDTH = 40


def mlp(hidden: int, seed: int) -> MLPDenoiser:
    return MLPDenoiser(SHAPE, "edm_eps", num_labels=2, hidden=hidden, depth=2, seed=seed)


def make_model(student_width: int = 16) -> NeuralDistill:
    """A teacher of width 40 (recognizable), student and critic of width 16, an EMA, student and critic phases
    alternating (student at even iterations)."""
    config = DistillConfig(
        student_net=mlp(student_width, 1), critic_net=mlp(16, 2), student_optimizer=ADAM, critic_optimizer=ADAM,
        ema=EMAConfig(halflife_steps=2.0), student_update_freq=2,
    )
    return NeuralDistill(mlp(TEACHER_WIDTH, 0), "edm_eps", distill=config)


def shard(model: NeuralDistill) -> NeuralDistill:
    """FSDP2 per network, as the parallel layer does: each linear layer, then the network; the teacher too. The
    critic is replicated instead (the DDP mode: DTensors with Replicate placements)."""
    for attr in ("net", "net_ema", "net_teacher"):
        net = getattr(model, attr)
        for layer in (*net.body, net.head):
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
    replicate(model.net_fake_score)
    return model


def batch(iteration: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """This rank's part of the fixed global batch of ``iteration``."""
    data = mixture_batch(MIXTURE, GLOBAL_BATCH, torch.Generator().manual_seed(iteration))
    size = GLOBAL_BATCH // world_size
    return {key: value[rank * size:(rank + 1) * size] for key, value in data.items()}


def train(model: NeuralDistill, start: int, stop: int, rank: int = 0, world_size: int = 1) -> list[float]:
    losses = []
    for it in range(start, stop):
        _, loss = model.training_step(batch(it, rank, world_size), it)
        loss.backward()
        model.optimizer_step(it)
        losses.append(float(loss.detach()))
    return losses


def gather(model: NeuralDistill) -> dict[str, Any]:
    """Full (unsharded) networks, optimizer states (parameter names as keys), schedulers and the EMA count.

    Sharded: collective, the result is complete on rank 0 only. Unsharded: local copies.
    """
    options = GATHER if is_sharded(model.net) else StateDictOptions()
    state = {
        "nets": {attr: get_model_state_dict(getattr(model, attr), options=options) for attr in NETWORKS},
        "optims": {name: get_optimizer_state_dict(getattr(model, name), opt, options=options)
                   for name, opt in model.optimizers().items()},
        "schedulers": {name: s.state_dict() for name, s in model.lr_schedulers().items()},
        "ema_num_updates": model.ema_num_updates,
    }
    return _copy(state)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copy(v) for v in value)
    return value


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-exact equality of nested states (tensors: same dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def fresh(rank: int, seed: int) -> NeuralDistill:
    model = shard(make_model())
    torch.manual_seed(seed + rank)  # each rank its own noise, as in a real run
    return model


def sharded_job(rank: int, world_size: int, root_name: str) -> dict[str, Any]:
    """Everything that runs on 2 processes; rank 0 returns the gathered states."""
    root = Path(root_name)
    out: dict[str, Any] = {}
    model = fresh(rank, 10)  # the uninterrupted run, never saved
    train(model, 0, STOP, rank, world_size)
    out["uninterrupted"] = gather(model)

    model, checkpointer, out["saved"] = fresh(rank, 10), DistillCheckpointer(root / "sharded"), {}
    for start, stop in zip((0, *SAVE_AT[:-1]), SAVE_AT, strict=True):
        train(model, start, stop, rank, world_size)
        checkpointer.save(model, stop, trainer_state={"iteration": stop})
        out["saved"][stop] = gather(model)

    model = fresh(rank, 999)  # another RNG state: the checkpoint must restore each rank's
    out["resumed_at"] = checkpointer.resume(model).iteration
    train(model, out["resumed_at"], STOP, rank, world_size)
    out["resumed"] = gather(model)

    if rank == 0:
        shutil.copytree(root / "sharded", root / "damaged")
        flip_a_byte(root / "damaged" / "iter_000004" / "critic.dcp" / "__1_0.distcp")
    dist.barrier()
    model = fresh(rank, 0)
    out["fallback_at"] = DistillCheckpointer(root / "damaged").resume(model).iteration
    out["fallback"] = gather(model)

    model = fresh(rank, 0)  # an unsharded (single-process) checkpoint and student file into sharded models
    DistillCheckpointer(root / "plain").resume(model)
    out["from_plain"] = gather(model)
    model = fresh(rank, 0)
    load_student_weights(model, root / "plain_student.safetensors")
    out["from_student_file"] = {attr: get_model_state_dict(getattr(model, attr), options=GATHER)
                                for attr in ("net", "net_ema")}
    return out if rank == 0 else {key: out[key] for key in ("resumed_at", "fallback_at")}


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], dict[str, Any]]:
    """(root, the ranks' results, the single-process model's state behind ``root/plain``)."""
    root = tmp_path_factory.mktemp("sharded")
    plain = make_model()
    torch.manual_seed(10)
    train(plain, 0, 2)
    DistillCheckpointer(root / "plain").save(plain, 2)
    extract_student_weights(root / "plain", root / "plain_student.safetensors")
    results = run_distributed(sharded_job, 2, str(root), timeout=240.0)
    return root, results, gather(plain)


def test_resume_at_world_size_2_is_bit_exact_against_an_uninterrupted_run(run):
    _, results, _ = run
    assert [r["resumed_at"] for r in results] == [4, 4]
    assert_same(results[0]["resumed"], results[0]["uninterrupted"])


def test_sharded_layout_manifest_pointer_and_keep_last(run):
    root, _, _ = run
    directory = root / "sharded"
    assert sorted(p.name for p in directory.iterdir()) == ["iter_000002", "iter_000004", "latest"]
    assert (directory / "latest").read_text() == "iter_000004\n"
    path = directory / "iter_000004"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "critic.dcp", "ema.dcp", "extra.safetensors", "manifest.json", "optim.pt", "rng", "student.dcp",
        "trainer_state.json"]
    assert sorted(p.name for p in (path / "student.dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = verify_checkpoint(path)
    assert manifest["world_size"] == 2 and manifest["networks"] == {
        "net": "student.dcp", "net_fake_score": "critic.dcp", "net_ema": "ema.dcp"}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk and {"rng/rank_0.pt", "rng/rank_1.pt"} <= on_disk
    optim = torch.load(path / "optim.pt", weights_only=True)
    assert optim["optimizers"] == {} and sorted(optim["schedulers"]) == ["net", "net_fake_score"]
    assert json.loads((path / "trainer_state.json").read_text()) == {"iteration": 4}


def test_a_sharded_checkpoint_loads_at_world_size_1_and_training_continues(run, tmp_path):
    root, results, _ = run
    model = make_model()
    assert DistillCheckpointer(root / "sharded").resume(model).iteration == 4
    loaded = gather(model)
    assert_same(loaded, results[0]["saved"][4])  # every saved tensor equals the gathered sharded one
    steps = {name: max(s["step"] for s in opt["state"].values()) for name, opt in loaded["optims"].items()}
    losses = train(model, 4, STOP)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = gather(model)
    for name, opt in after["optims"].items():
        assert max(s["step"] for s in opt["state"].values()) == steps[name] + 1  # one step of each phase
        assert not torch.equal(after["nets"][name]["head.weight"], loaded["nets"][name]["head.weight"])
    path = DistillCheckpointer(tmp_path).save(model, STOP)  # unsharded again: today's format
    assert (path / "student.safetensors").is_file() and not (path / "student.dcp").exists()


def test_extract_weights_of_a_sharded_checkpoint_equals_the_unsharded_student(run, tmp_path):
    root, results, _ = run
    sharded_out, plain_out, ema_out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "e.safetensors"
    assert cli_main(["extract-weights", "--input", str(root / "sharded"), "--output", str(sharded_out)]) == 0
    assert cli_main(["extract-weights", "--input", str(root / "sharded"), "--output", str(ema_out), "--ema"]) == 0
    model = make_model()  # the same checkpoint, unsharded, saved in today's format and extracted
    DistillCheckpointer(root / "sharded").resume(model)
    extract_student_weights(DistillCheckpointer(tmp_path / "plain").save(model, 4), plain_out)
    assert_same(load_file(str(sharded_out)), load_file(str(plain_out)))
    assert_same(load_file(str(sharded_out)), results[0]["saved"][4]["nets"]["net"])
    assert_same(load_file(str(ema_out)), results[0]["saved"][4]["nets"]["net_ema"])


def test_the_teacher_is_not_in_a_sharded_checkpoint(run):
    root, _, _ = run
    path = root / "sharded" / "iter_000004"
    manifest = verify_checkpoint(path)
    assert not any("teacher" in name for name in (*manifest["networks"], *manifest["files"]))
    plain = make_model()
    for attr, folder in manifest["networks"].items():
        keys = {k.removeprefix("model.") for k in saved_keys(path / folder) if k.startswith("model.")}
        assert keys == set(getattr(plain, attr).state_dict())
        assert not any(TEACHER_WIDTH in t.shape for t in read_full_state(path / folder).values())
    blobs = [p.read_bytes() for p in path.rglob("*") if p.is_file()]

    def found(net: nn.Module) -> list[bool]:  # each rank's half of each large tensor, as Shard(0) writes it
        halves = [h for t in net.state_dict().values() if t.numel() >= 16 for h in t.chunk(2)]
        return [h.contiguous().numpy().tobytes() in blob for h in halves for blob in blobs]

    model = make_model()
    DistillCheckpointer(root / "sharded").resume(model)
    assert sum(found(model.net)) >= 6  # the search finds the student's shards
    assert not any(found(model.net_teacher))


def test_a_damaged_shard_makes_resume_fall_back_to_the_previous_checkpoint(run):
    root, results, _ = run
    with pytest.raises(CheckpointError, match=r"iter_000004/critic.dcp/__1_0.distcp fails its checksum"):
        verify_checkpoint(root / "damaged" / "iter_000004")
    assert [r["fallback_at"] for r in results] == [2, 2]
    assert_same(results[0]["fallback"], results[0]["saved"][2])
    assert DistillCheckpointer(root / "damaged").find_resumable().name == "iter_000002"  # one process too


def test_an_unsharded_checkpoint_and_student_file_load_into_a_sharded_model(run):
    _, results, plain = run
    assert_same(results[0]["from_plain"], plain)
    student = results[0]["from_student_file"]
    assert_same(student["net"], plain["nets"]["net"])
    assert_same(student["net_ema"], plain["nets"]["net"])  # the EMA restarts from the loaded student


def test_a_sharded_checkpoint_that_does_not_fit_the_model_is_named(run):
    root, _, _ = run
    with pytest.raises(CheckpointError, match=r"student.dcp does not fit the network"):
        DistillCheckpointer(root / "sharded").resume(make_model(student_width=8))


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pickled code ran",))


def test_a_dcp_index_that_would_run_code_is_refused(run, tmp_path, capsys):
    root, _, _ = run
    folder = tmp_path / "student.dcp"
    shutil.copytree(root / "sharded" / "iter_000004" / "student.dcp", folder)
    (folder / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="refers to builtins.print"):
        read_full_state(folder)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the test's own single-process save
def test_a_dcp_entry_that_would_run_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "evil.dcp"
    dcp.save({"model": {"w": torch.zeros(2)}, "evil": _Evil()}, checkpoint_id=folder, no_dist=True)
    with pytest.raises(CheckpointError, match="'evil' is not plain data"):
        load_dcp({"model": {"w": torch.empty(2)}, "evil": None}, folder, no_dist=True)
    assert "pickled code ran" not in capsys.readouterr().out
