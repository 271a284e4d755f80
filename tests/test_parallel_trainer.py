"""The trainer on two processes (gloo, CPU): the same run as one process, bit-exact resume, a signal on one rank
stops both after the same iteration, and a two-process checkpoint continues in one process."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from distill_mixins.trainer import Callback, DistillationTrainer, FunctionData, TrainerConfig
from distill_mixins.trainer.distributed import Ranks, local_share

from distill_mixins.parallel import ParallelConfig, parallelize
from tests.distributed import run_distributed
from tests.test_parallel import build, full, global_batch


class SignalAt(Callback):
    """Sends SIGTERM to this process after iteration ``at`` (on one rank only)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, step) -> None:
        if step.iteration == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(run_dir: str, iterations: int, callbacks=(), parallel: bool = True) -> dict[str, object]:
    model = build("dmd2")
    if parallel:
        parallelize(model, ParallelConfig(mode="fsdp"))
    config = TrainerConfig(iterations=iterations, run_dir=run_dir, autocast="none", progress=False, log_every=1,
                           save_every=2)
    result = DistillationTrainer(model, FunctionData(global_batch), config, callbacks).fit()
    weights = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
    return {"iteration": result.iteration, "reason": result.stop_reason, "weights": weights}


def trainer_worker(rank: int, world_size: int, run_dir: str, iterations: int, signal_rank: int = -1) -> dict:
    callbacks = [SignalAt(2)] if rank == signal_rank else []
    return fit(run_dir, iterations, callbacks)


def assert_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=tol, atol=tol), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process for 6 iterations; two processes for 6; two processes for 4 then resumed to 6."""
    root = tmp_path_factory.mktemp("parallel_trainer")
    single = fit(str(root / "single"), 6, parallel=False)
    whole = run_distributed(trainer_worker, 2, str(root / "whole"), 6)
    run_distributed(trainer_worker, 2, str(root / "resumed"), 4)
    resumed = run_distributed(trainer_worker, 2, str(root / "resumed"), 6)
    return {"root": root, "single": single, "whole": whole, "resumed": resumed}


def test_two_processes_train_like_one(runs):
    for rank_result in runs["whole"]:
        assert rank_result["iteration"] == 6 and rank_result["reason"] == "completed"
        assert_weights(rank_result["weights"], runs["single"]["weights"], 1e-5)
    metrics = [json.loads(line) for line in (runs["root"] / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == list(range(6))  # rank 0 alone wrote them


def test_two_process_resume_is_bit_exact(runs):
    for whole, resumed in zip(runs["whole"], runs["resumed"], strict=True):
        assert resumed["iteration"] == 6
        assert_weights(resumed["weights"], whole["weights"], 0.0)


def test_a_signal_on_one_rank_stops_both_after_the_same_iteration(tmp_path):
    results = run_distributed(trainer_worker, 2, str(tmp_path), 6, 1)
    assert [r["iteration"] for r in results] == [3, 3]
    assert all(r["reason"].startswith("signal") for r in results)
    manifest = json.loads((tmp_path / "checkpoints" / "iter_000003" / "manifest.json").read_text())
    assert manifest["iteration"] == 3


def test_a_two_process_checkpoint_continues_in_one_process(runs, tmp_path):
    import shutil

    shutil.copytree(runs["root"] / "whole", tmp_path / "run")
    result = fit(str(tmp_path / "run"), 8, parallel=False)
    assert result["iteration"] == 8 and result["reason"] == "completed"
    assert not any(torch.equal(result["weights"][k], runs["whole"][0]["weights"][k])
                   for k in result["weights"] if k.startswith("net."))  # it trained on


def test_local_share_slices_per_sample_values_and_refuses_uneven_splits():
    batch = {"x0": torch.arange(8).reshape(4, 2), "prompt": ["a", "b", "c", "d"], "scale": torch.tensor(2.0),
             "cond": {"text": torch.zeros(4, 3)}}
    part = local_share(batch, Ranks(rank=1, world=2, dp_rank=1, dp_size=2))
    assert torch.equal(part["x0"], batch["x0"][2:]) and part["prompt"] == ["c", "d"]
    assert part["scale"] is batch["scale"] and part["cond"]["text"].shape == (2, 3)
    with pytest.raises(ValueError, match="does not split evenly over 3 data-parallel ranks"):
        local_share(batch, Ranks(rank=0, world=3, dp_rank=0, dp_size=3))


def test_torchrun_runs_the_stages_of_a_run_config_like_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m distill_mixins.cli train --config run.json`: both stages, students equal to
    the one-process run's."""
    import subprocess
    import sys

    from distill_mixins.trainer.examples import two_stage_kd_config
    from safetensors.torch import load_file

    students = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        config = two_stage_kd_config(str(tmp_path / name), iterations=(6, 4), pairs=64)
        for stage in config["stages"]:
            stage["trainer"].update(batch_size=8, progress=False, validate_every=3)
            stage["parallel"] = {"mode": "fsdp"}
            stage["method_config"]["draws"] = "per_sample"  # what the two processes draw
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        command = [*launcher, "-m", "distill_mixins.cli", "train", "--config", str(path)]
        if not launcher:
            command = ["-m", "distill_mixins.cli", "train", "--config", str(path)]
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        students[name] = {stage: load_file(str(tmp_path / name / stage / "student.safetensors"))
                          for stage in ("kd_1step", "kd_4step")}
    for stage in ("kd_1step", "kd_4step"):
        assert_weights(students["two"][stage], students["one"][stage], 1e-5)
