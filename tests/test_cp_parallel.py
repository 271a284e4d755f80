"""parallelize with context parallel: KD and DMD2 (with GAN heads on tapped token features) on a TinyVideoDiT host
at (dp=1, cp=2) and (dp=2, cp=1), two gloo CPU processes, give the same losses and updated weights as one process.

All the two-process runs happen in one launch (:func:`_worker`, a module-scoped fixture): process start-up costs
seconds. The reference runs in the test process, on the whole global batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distill_mixins.trainer import DistillationTrainer, FunctionData, TrainerConfig

from distill_mixins import DiscriminatorConfig, DMD2Config, DMD2Mixin, EMAConfig, KDConfig, KDMixin, OptimizerConfig
from distill_mixins.methods.kd import KD_NOISE, KD_TEACHER_X0
from distill_mixins.parallel import ParallelConfig, parallelize
from distill_mixins.testing import DiTHost, TinyVideoDiT, ToyHost
from tests.distributed import run_distributed

B, C, SIZE = 2, 4, (4, 4, 4)  # global batch, channels, (T, H, W): token grid (4, 2, 2), split along frames
ITERATIONS = {"kd": 1, "dmd2": 2}  # DMD2: one critic phase and one student phase (student_update_freq 2)
LAYOUTS = {"dp1_cp2": ("fsdp", 2), "dp2_cp1": ("fsdp", 1), "ddp_dp1_cp2": ("ddp", 2)}
TOL = 1e-5


class DiTKD(KDMixin, DiTHost):
    """KD on the tiny video DiT."""


class DiTDMD2(DMD2Mixin, DiTHost):
    """DMD2 with GAN heads on the tiny video DiT."""


class PlainDMD2(DMD2Mixin, ToyHost):
    """A host without the context-parallel capability."""


def _sgd() -> OptimizerConfig:
    return OptimizerConfig(name="sgd", lr=0.05, weight_decay=0.0, grad_clip=1.0)


def build(method: str) -> DiTHost:
    """The composed model of ``method``, the same weights in every process."""
    torch.manual_seed(0)
    net = TinyVideoDiT(C, seed=0)
    if method == "kd":
        return DiTKD(net, "rf_velocity", distill=KDConfig(student_optimizer=_sgd()))
    config = DMD2Config(
        student_update_freq=2, guidance_scale=2.0, ema=EMAConfig(halflife_steps=2.0), student_optimizer=_sgd(),
        critic_optimizer=_sgd(), discriminator_optimizer=_sgd(), gan_loss_weight=0.1,
        discriminator=DiscriminatorConfig(kind="attention", feature_dim=32, taps=(0, 1), hidden=16, r1_weight=0.0),
    )
    model = DiTDMD2(net, "rf_velocity", distill=config)
    with torch.no_grad():  # move the student and the critic off the teacher
        g = torch.Generator().manual_seed(1)
        for p in [*model.net.parameters(), *model.net_fake_score.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def global_batch(iteration: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + iteration)
    return {
        "x0": torch.randn(B, C, *SIZE, generator=g), "label": torch.tensor([1, 0]),
        KD_NOISE: torch.randn(B, C, *SIZE, generator=g), KD_TEACHER_X0: torch.randn(B, C, *SIZE, generator=g),
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train(model: DiTHost, method: str) -> dict[str, object]:
    """The method's iterations on this data-parallel rank's share of each global batch: losses, final weights."""
    rank, size = model.data_parallel_rank, model.data_parallel_size
    share = B // size
    losses = []
    for it in range(ITERATIONS[method]):
        batch = {k: v[rank * share : (rank + 1) * share] for k, v in global_batch(it).items()}
        _, loss = model.training_step(batch, it)
        loss.backward()
        model.optimizer_step(it)
        losses.append(float(loss.detach()))
    weights = {k: _full(v).detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "weights": weights}


def fit(run_dir: str, iterations: int, cp: int) -> dict[str, torch.Tensor]:
    """DMD2 under the trainer (checkpoints every 2 iterations; a run dir with a checkpoint resumes): final weights."""
    model = build("dmd2")
    if cp > 1:
        parallelize(model, ParallelConfig(cp=cp))
    config = TrainerConfig(iterations=iterations, run_dir=run_dir, autocast="none", progress=False, save_every=2)
    DistillationTrainer(model, FunctionData(global_batch), config).fit()
    return {k: _full(v).detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world_size: int, root: str) -> dict[str, object]:
    torch.set_num_threads(1)
    out: dict[str, object] = {"trainer": fit(f"{root}/whole", 4, 2)}
    fit(f"{root}/resumed", 2, 2)
    out["resumed"] = fit(f"{root}/resumed", 4, 2)
    try:
        parallelize(build_plain(), ParallelConfig(cp=2))
    except TypeError as error:
        out["no_capability"] = str(error)
    r1 = build("dmd2")
    r1.distill_config.discriminator.r1_weight = 0.1
    try:
        parallelize(r1, ParallelConfig(mode="ddp", cp=2))
    except ValueError as error:
        out["r1"] = str(error)
    for layout, (mode, cp) in LAYOUTS.items():
        for method in ITERATIONS:
            model = build(method)
            plan = parallelize(model, ParallelConfig(mode=mode, cp=cp))
            cp_rank = dist.get_rank(model.context_parallel_group) if cp > 1 else 0
            out[f"{layout}/{method}"] = {
                **train(model, method), "plan": (plan.dp_rank, plan.dp_size, plan.cp_size, plan.groups_source),
                "cp_rank": cp_rank, "cp_size": model.context_parallel_size,
            }
    return out


def build_plain() -> PlainDMD2:
    torch.manual_seed(0)
    return PlainDMD2(TinyVideoDiT(C, seed=0), "rf_velocity", distill=DMD2Config())


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict[str, object]]:
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("cp_runs")))


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, object]]:
    return {method: train(build(method), method) for method in ITERATIONS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", list(ITERATIONS))
def test_context_and_data_parallel_match_one_process(two, single, layout, method):
    """Updated weights of every network (student, critic, GAN heads, EMA) within 1e-5 of one process."""
    reference = single[method]
    mode, cp = LAYOUTS[layout]
    for rank, result in enumerate(two):
        run = result[f"{layout}/{method}"]
        dp_size = 2 // cp
        assert run["plan"] == (rank // cp, dp_size, cp, "device_mesh")
        assert run["cp_size"] == cp and run["cp_rank"] == rank % cp
        if cp == 2:  # one data-parallel rank: the loss of the whole batch on both ranks
            assert run["losses"] == pytest.approx(reference["losses"], rel=TOL, abs=TOL)
        assert run["weights"].keys() == reference["weights"].keys()
        moved = 0
        for name, expected in reference["weights"].items():
            torch.testing.assert_close(run["weights"][name], expected, atol=TOL, rtol=0, msg=f"{layout} {name}")
            moved += not torch.equal(expected, build_weights(method)[name])
        assert moved > 0.5 * len(reference["weights"])  # the iteration changed most tensors: a real comparison


_INITIAL: dict[str, dict[str, torch.Tensor]] = {}


def build_weights(method: str) -> dict[str, torch.Tensor]:
    if method not in _INITIAL:
        _INITIAL[method] = {k: v.clone() for k, v in build(method).state_dict().items()}
    return _INITIAL[method]


def test_host_without_the_capability_is_refused(two):
    for result in two:
        message = result["no_capability"]
        assert "ParallelConfig.cp=2" in message and "enable_context_parallel" in message and "cp=1" in message
        assert "cp=2 with the R1 penalty" in result["r1"] and "r1_weight=0" in result["r1"]


@pytest.mark.parametrize(
    "kwargs, world, message",
    [({"cp": 0}, 2, "ParallelConfig.cp=0"), ({"cp": -1}, 2, "ParallelConfig.cp=-1"),
     ({"cp": 4}, 6, "cp=4 does not divide the world size 6"),
     ({"mode": "hsdp", "dp_replicate": 2, "cp": 2}, 6, "x cp=2 does not make the world size 6")],
)
def test_config_errors(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs).mesh_shape(world)


def test_mesh_shapes_with_cp():
    """The networks' mesh shards over dp_shard x cp ranks; cp does not change the data-parallel sizes' rule."""
    assert ParallelConfig(cp=2).mesh_shape(8) == ((8,), ("dp_shard",))
    assert ParallelConfig(cp=2).data_parallel_shape(8) == (1, 4)
    assert ParallelConfig(mode="hsdp", dp_replicate=2, cp=2).mesh_shape(8) == ((2, 4), ("dp_replicate", "dp_shard"))
    assert ParallelConfig(mode="hsdp", dp_replicate=2, cp=2).data_parallel_shape(8) == (2, 2)
    assert ParallelConfig(mode="ddp", cp=4).data_parallel_shape(8) == (2, 1)
    assert ParallelConfig(mode="ddp", cp=4).mesh_shape(8) == ((8, 1), ("dp_replicate", "dp_shard"))


def test_trainer_at_cp2_trains_like_one_process_and_resumes_bit_exact(two, tmp_path):
    """The trainer at (dp=1, cp=2): 4 DMD2 iterations equal one process (1e-5); 2 iterations, a checkpoint, and a
    fresh model resumed to 4 give bit-identical weights."""
    single = fit(str(tmp_path / "single"), 4, 1)
    for result in two:
        for name, expected in single.items():
            torch.testing.assert_close(result["trainer"][name], expected, atol=TOL, rtol=0, msg=name)
            assert torch.equal(result["resumed"][name], result["trainer"][name]), name
