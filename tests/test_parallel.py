"""parallelize: one process and two (gloo, CPU) give the same losses, gradients and weights for one global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distill_mixins import DiscriminatorConfig, DMD2Config, DMD2Mixin, EMAConfig, KDConfig, KDMixin, OptimizerConfig
from distill_mixins.methods.kd import KD_NOISE, KD_TEACHER_X0
from distill_mixins.parallel import ParallelConfig, parallelize
from distill_mixins.precision import autocast
from distill_mixins.testing import ToyHost
from tests.distributed import run_distributed
from tests.test_dmd2 import CONV_SHAPE, TinyConvNet

GLOBAL_BATCH, ITERATIONS = 4, 5


class ConvKD(KDMixin, ToyHost):
    """KD on a small conv video host with a block list (each block is its own FSDP unit)."""


class ConvDMD2(DMD2Mixin, ToyHost):
    """DMD2 on the same host."""


def _adam() -> OptimizerConfig:
    return OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0, grad_clip=1.0)


def build(method: str, r1: bool = True) -> ToyHost:
    """The composed model of ``method``, the same weights in every process (GAN with R1 when ``r1``)."""
    torch.manual_seed(0)
    if method == "kd":
        return ConvKD(TinyConvNet(), "rf_velocity", distill=KDConfig(student_optimizer=_adam()))
    config = {
        "student_update_freq": 2, "student_schedule": "cosmos_4step", "backward_simulation": True,
        "ema": EMAConfig(halflife_steps=2.0), "guidance_scale": 2.0, "draws": "per_sample",  # as N processes draw
        "student_optimizer": _adam(), "critic_optimizer": _adam(),
    }
    if method == "dmd2_gan":
        config.update(
            # SGD: the heads' conv biases sit before GroupNorm with one channel a group, so their exact gradient is 0
            # and float32 leaves round-off of either sign, which Adam would turn into +-lr steps
            gan_loss_weight=1e-2, discriminator_optimizer=OptimizerConfig(name="sgd", lr=1e-2, weight_decay=0.0),
            discriminator=DiscriminatorConfig(
                kind="conv3d", feature_dim=8, taps=(0, 2), hidden=16, r1_weight=0.1 if r1 else 0.0
            ),
        )
    return ConvDMD2(TinyConvNet(), "rf_velocity", distill=DMD2Config(**config))


def global_batch(iteration: int) -> dict[str, torch.Tensor]:
    """The global batch of ``iteration`` (the same in every process), with KD fields for KD."""
    g = torch.Generator().manual_seed(100 + iteration)
    n = GLOBAL_BATCH
    return {
        "x0": torch.randn(n, *CONV_SHAPE, generator=g), "label": torch.randint(0, 2, (n,), generator=g),
        KD_NOISE: torch.randn(n, *CONV_SHAPE, generator=g), KD_TEACHER_X0: torch.randn(n, *CONV_SHAPE, generator=g),
    }


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def train(model: ToyHost, rank: int, world_size: int, bf16: bool = False) -> dict[str, object]:
    """ITERATIONS steps on this rank's share of each global batch: mean losses over ranks, first gradients,
    gradient norms and every network's final weights. ``bf16``: each step under the library's bf16 autocast, as the
    trainer runs it."""
    share = GLOBAL_BATCH // world_size
    losses, norms, first_grads = [], [], {}
    for it in range(ITERATIONS):
        batch = {k: v[rank * share : (rank + 1) * share] for k, v in global_batch(it).items()}
        with autocast("bf16" if bf16 else "fp32"):  # the library's (the trainer's) autocast
            _, loss = model.training_step(batch, it)
            loss.backward()
        if it < 2:  # the first student and the first critic phase
            for name, net in model.trainable_networks().items():
                first_grads.update({f"{it}/{name}.{n}": full(p.grad).clone() for n, p in net.named_parameters()
                                    if p.grad is not None})
        norms.append(model.optimizer_step(it))
        value = loss.detach().double().reshape(1)
        if world_size > 1:
            dist.all_reduce(value)
        losses.append(float(value) / world_size)
    weights = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "grads": first_grads, "weights": weights}


METHODS = ("kd", "dmd2", "dmd2_gan")


def parallel_worker(rank: int, world_size: int, mode: str) -> dict[str, dict[str, object]]:
    """Every method under ``mode`` in one launch (process start-up dominates these tiny runs)."""
    results = {}
    for method in METHODS:
        model = build(method, r1=mode == "ddp")  # FSDP refuses R1 (a double backward through freed weights)
        plan = parallelize(model, ParallelConfig(mode=mode, dp_replicate=1))
        results[method] = {**train(model, rank, world_size), "held": plan.networks}
    return results


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, object]]:
    """The one-process runs, by method."""
    runs = {method: train(build(method), 0, 1) for method in METHODS}
    return {**runs, "dmd2_gan_no_r1": train(build("dmd2_gan", r1=False), 0, 1)}


def assert_same(a: dict[str, object], b: dict[str, object], tol: float = 1e-5) -> None:
    assert a["losses"] == pytest.approx(b["losses"], rel=tol, abs=tol)
    # gradient norms: relative 1e-4 (a sum-for-average bug is 2x): the GAN discriminator's norm differs by 2.3e-5
    # relative between one process and two on an AMD EPYC CPU in float32 (reduction order), 0 on earlier CPUs
    for na, nb in zip(a["norms"], b["norms"], strict=True):
        assert na.keys() == nb.keys() and all(na[k] == pytest.approx(nb[k], rel=1e-4, abs=tol) for k in na)
    for key in ("grads", "weights"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.allclose(a[key][name], b[key][name], rtol=tol, atol=tol), f"{key} {name}"


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "hsdp"])
def test_two_processes_match_one(single, mode):
    """KD, DMD2 (student_update_freq 2, backward simulation on a 4-step schedule, EMA) and DMD2 with GAN heads: the
    same losses, gradients (first student and critic phases), gradient norms and final weights as one process."""
    results = run_distributed(parallel_worker, 2, mode)
    for method in METHODS:
        reference = single[method] if mode == "ddp" or method != "dmd2_gan" else single["dmd2_gan_no_r1"]
        assert results[0][method]["held"]["net"] == ("replicated" if mode == "ddp" else "sharded")
        assert results[0][method]["held"]["net_discriminator" if method == "dmd2_gan" else "net"] != "copy"
        for rank_result in results:
            assert_same(rank_result[method], reference)


def test_r1_under_sharding_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="R1 .* Use mode='ddp', or set r1_weight=0"):
        parallelize(build("dmd2_gan"), ParallelConfig(mode="fsdp"))


def test_parallelize_without_a_process_group_says_how_to_launch():
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(build("kd"), ParallelConfig(mode="fsdp"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "zero"}, "ParallelConfig.mode='zero' is not known"),
        ({"mode": "ddp", "dp_shard": 2}, "ddp does not shard"),
        ({"mode": "fsdp", "dp_replicate": 2}, "use mode='hsdp'"),
        ({"dp_shard": 0}, "ParallelConfig.dp_shard=0"),
        ({"precision": "fp8"}, "ParallelConfig.precision='fp8'"),
        ({"activation_checkpointing": "some"}, "ParallelConfig.activation_checkpointing"),
        ({"attention_backend": "flash4"}, "ParallelConfig.attention_backend"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_mesh_sizes_that_do_not_make_the_world_are_named():
    assert ParallelConfig(mode="hsdp", dp_replicate=2).mesh_shape(8) == ((2, 4), ("dp_replicate", "dp_shard"))
    assert ParallelConfig(mode="ddp").mesh_shape(4) == ((4, 1), ("dp_replicate", "dp_shard"))
    with pytest.raises(ValueError, match="does not make the world size 6"):
        ParallelConfig(mode="hsdp", dp_replicate=4).mesh_shape(6)


def bf16_worker(rank: int, world_size: int) -> dict[str, dict[str, object]]:
    """KD and DMD2 under ``precision="bf16"`` with the step under bf16 autocast (as the trainer runs it), ddp and
    fsdp, in one launch: losses, the plan's precision and the parameters' dtypes."""
    results = {}
    for mode in ("ddp", "fsdp"):
        for method in ("kd", "dmd2"):
            model = build(method)
            plan = parallelize(model, ParallelConfig(mode=mode, dp_replicate=1, precision="bf16"))
            losses = train(model, rank, world_size, bf16=True)["losses"]
            dtypes = {str(full(p).dtype) for p in model.net.parameters()}
            results[f"{mode}/{method}"] = {"losses": losses, "precision": plan.precision, "dtypes": dtypes}
    return results


def test_bf16_on_the_cpu_trains_and_matches_one_process():
    """``precision="bf16"`` on gloo (it failed: FSDP2 with bf16 parameters assigns a bf16 gradient to the float32
    shard): float32 parameters, bf16 compute from autocast, losses as one process under the same autocast (bf16
    round-off: 2e-2 relative). With torch's autocast cache, FSDP2's DMD2 student got no gradient (losses 9-30% off
    from the second iteration): the library's autocast runs without it."""
    results = run_distributed(bf16_worker, 2)
    for method in ("kd", "dmd2"):
        reference = train(build(method), 0, 1, bf16=True)["losses"]
        for rank_result in results:
            for mode in ("ddp", "fsdp"):
                got = rank_result[f"{mode}/{method}"]
                assert got["precision"] == "bf16" and got["dtypes"] == {"torch.float32"}
                assert got["losses"] == pytest.approx(reference, rel=2e-2, abs=1e-3), f"{mode}/{method}"
