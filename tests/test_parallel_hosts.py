"""The tiny diffusers Cosmos and Wan hosts under FSDP2 at world size 2 (gloo, CPU): one KD iteration, one DMD2
student and one DMD2 critic iteration (with GAN heads) give finite losses on both ranks, change only the phase's
networks, and give the losses and updated weights of one process with the whole global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("diffusers")  # the [diffusers] extra (installed by `make test`)

from distill_mixins import KDConfig, OptimizerConfig
from distill_mixins.methods.kd import KD_NOISE, KD_TEACHER_X0
from distill_mixins.parallel import ParallelConfig, parallelize
from tests.distributed import run_distributed
from tests.hosts_helpers import SHAPE, TEXT_DIM, TEXT_LEN, adam, dmd2_config, tiny_cosmos, tiny_wan
from tests.test_hosts_cosmos import CosmosDMD2, CosmosKD
from tests.test_hosts_wan import WanDMD2, WanKD

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

GLOBAL_BATCH = 4
CASES = ("cosmos_kd", "cosmos_dmd2", "wan_kd", "wan_dmd2")
ITERATIONS = {"kd": 1, "dmd2": 2}  # DMD2 with student_update_freq 2: iteration 0 student, 1 critic
PHASE_NETWORKS = {
    "kd": [{"net"}],
    "dmd2": [{"net"}, {"net_fake_score", "net_discriminator"}],
}
TOL = 1e-5


def build(case: str):
    """The composed model of ``case``, the same weights in every process (the builders seed the transformer; the
    student, critic and GAN heads are built right after, from the same generator state)."""
    host, method = case.split("_")
    tiny = tiny_cosmos if host == "cosmos" else tiny_wan
    if method == "kd":
        cls = CosmosKD if host == "cosmos" else WanKD
        return cls(tiny(), distill=KDConfig(student_optimizer=adam()))
    cls = CosmosDMD2 if host == "cosmos" else WanDMD2
    source = "critic" if host == "cosmos" else "teacher"  # taps on a trained and on a frozen sharded network
    # SGD for the GAN heads: the key half of each head's kv bias shifts every attention logit of a query alike, so
    # softmax cancels it and its exact gradient is 0; float32 leaves round-off of about 3e-10 whose sign depends on
    # the summation order, and Adam's first step lr * g / (|g| + 1e-8) turns that into ~3e-5 differences between
    # one process and two (measured: heads.0.kv.bias 3.2e-5 Cosmos, 3.0e-5 Wan). SGD moves it by lr * 3e-10.
    heads = OptimizerConfig(name="sgd", lr=1e-2, weight_decay=0.0)
    # The same amplification, milder, for gradients near Adam's eps: an element with |g| ~ 1e-8 moves by about
    # lr * dg / 1e-8, so round-off dg ~ 1e-10 gave 2.5e-5 (Wan critic, blocks.0.attn2.to_out.0.weight, measured).
    # eps = 1e-6 bounds that at lr * 1e-4.
    critic = OptimizerConfig(name="adam", lr=1e-3, weight_decay=0.0, eps=1e-6)
    return cls(tiny(), distill=dmd2_config(source=source, student_update_freq=2, discriminator_optimizer=heads,
                                           critic_optimizer=critic))


def global_batch(case: str, iteration: int) -> dict[str, torch.Tensor]:
    """The global batch of ``iteration`` (the same in every process), with the kd/ fields for KD."""
    g = torch.Generator().manual_seed(1000 * CASES.index(case) + iteration)
    shape = (GLOBAL_BATCH, *SHAPE[1:])
    out = {"x0": torch.randn(shape, generator=g), "prompt_embeds": torch.randn(GLOBAL_BATCH, TEXT_LEN, TEXT_DIM,
                                                                               generator=g)}
    if case.endswith("_kd"):
        out[KD_NOISE] = torch.randn(shape, generator=g)
        out[KD_TEACHER_X0] = torch.randn(shape, generator=g)
    return out


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def snapshot(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every network's full (gathered) parameters, by network and parameter name."""
    nets = {name: model._modules[name] for name in ("net", "net_fake_score", "net_discriminator", "net_teacher")
            if name in model._modules}
    return {name: {n: full(p).detach().clone() for n, p in net.named_parameters()} for name, net in nets.items()}


def run_case(case: str, rank: int, world_size: int, cp: int = 1) -> dict[str, object]:
    """The case's iterations on this data-parallel rank's share of each global batch (context parallel over ``cp``
    ranks): this rank's losses, the networks that changed at each iteration, and the trainable networks' weights
    after each iteration."""
    model = build(case)
    held = parallelize(model, ParallelConfig(mode="fsdp", cp=cp)).networks if world_size > 1 else {}
    share = GLOBAL_BATCH // (world_size // cp)
    rank = rank // cp
    losses, outputs, changed, weights = [], [], [], []
    for it in range(ITERATIONS[case.split("_")[1]]):
        batch = {k: v[rank * share: (rank + 1) * share] for k, v in global_batch(case, it).items()}
        before = snapshot(model)
        out, loss = model.training_step(batch, it)
        loss.backward()
        model.optimizer_step(it)
        after = snapshot(model)
        changed.append({name for name in before if any(not torch.equal(before[name][n], after[name][n])
                                                       for n in before[name])})
        losses.append(float(loss.detach()))
        outputs.append({k: float(v.detach()) for k, v in out.items()})
        weights.append({name: params for name, params in after.items() if name != "net_teacher"})
    return {"held": held, "losses": losses, "outputs": outputs, "changed": changed, "weights": weights}


def parallel_worker(rank: int, world_size: int, cases: tuple[str, ...]) -> dict[str, dict[str, object]]:
    results = {case: run_case(case, rank, world_size) for case in cases}
    results.update({f"cp2/{case}": run_case(case, rank, world_size, cp=2) for case in cases})
    assert dist.get_world_size() == world_size
    return results


@pytest.fixture(scope="module")
def runs() -> dict[str, object]:
    """The 2-process FSDP runs at (dp=2, cp=1) and (dp=1, cp=2) (one launch for every case) and the one-process
    runs of the same global batches."""
    return {
        "parallel": run_distributed(parallel_worker, 2, CASES),
        "single": {case: run_case(case, 0, 1) for case in CASES},
    }


@pytest.mark.parametrize("case", CASES)
def test_fsdp_losses_are_finite_and_only_the_phase_networks_change(runs, case):
    expected = PHASE_NETWORKS[case.split("_")[1]]
    for rank, result in enumerate(runs["parallel"]):
        r = result[case]
        networks = {"net": "sharded", "net_teacher": "sharded"}  # the GAN heads: whole, gradients all-reduced
        if case.endswith("_dmd2"):
            networks.update(net_fake_score="sharded", net_discriminator="replicated")
        assert r["held"] == networks
        assert all(torch.isfinite(torch.tensor(v)) for v in r["losses"]), (rank, r["losses"])
        assert all(torch.isfinite(torch.tensor(v)) for out in r["outputs"] for v in out.values()), (rank, r["outputs"])
        assert r["changed"] == expected, (rank, r["changed"])  # never the teacher, never the other phase's networks
    assert runs["single"][case]["changed"] == expected


@pytest.mark.parametrize("case", CASES)
def test_fsdp_matches_one_process(runs, case):
    single = runs["single"][case]
    ranks = [result[case] for result in runs["parallel"]]
    for it, loss in enumerate(single["losses"]):  # each rank's loss is the mean over its half of the batch
        mean = sum(r["losses"][it] for r in ranks) / len(ranks)
        assert mean == pytest.approx(loss, rel=TOL, abs=TOL), (it, [r["losses"][it] for r in ranks], loss)
    for it, expected in enumerate(single["weights"]):
        for r in ranks:
            assert r["weights"][it].keys() == expected.keys()
            for name, params in expected.items():
                for n, value in params.items():
                    gap = float((r["weights"][it][name][n] - value).abs().max())
                    assert torch.allclose(r["weights"][it][name][n], value, rtol=TOL, atol=TOL), (it, name, n, gap)


@pytest.mark.parametrize("case", CASES)
def test_context_parallel_matches_one_process(runs, case):
    """At (dp=1, cp=2) both ranks train on the whole global batch with the tokens split: the losses and updated
    weights of one process (1e-5)."""
    single = runs["single"][case]
    for result in runs["parallel"]:
        r = result[f"cp2/{case}"]
        assert r["losses"] == pytest.approx(single["losses"], rel=TOL, abs=TOL)
        assert r["changed"] == single["changed"]
        for it, expected in enumerate(single["weights"]):
            for name, params in expected.items():
                for n, value in params.items():
                    gap = float((r["weights"][it][name][n] - value).abs().max())
                    assert torch.allclose(r["weights"][it][name][n], value, rtol=TOL, atol=TOL), (it, name, n, gap)
