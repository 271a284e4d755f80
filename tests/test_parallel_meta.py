"""Meta-device construction: meta_init + parallelize + materialize equals eager construction + parallelize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distill_mixins import KDConfig, KDMixin
from distill_mixins.discriminator import build_discriminator
from distill_mixins.parallel import ParallelConfig, parallelize
from distill_mixins.parallel.meta import materialize, meta_init, shard_region
from distill_mixins.testing import MLPDenoiser, ToyHost
from tests.distributed import run_distributed
from tests.test_dmd2 import TinyConvNet
from tests.test_parallel import build, full, global_batch

torch.set_num_threads(1)

STEPS = 2  # a student phase, then a critic phase (student_update_freq=2)


def teacher_state() -> dict[str, torch.Tensor]:
    """The teacher weights eager construction starts from (``build`` seeds 0 and builds a TinyConvNet first)."""
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in TinyConvNet().state_dict().items()}


def rng_after_teacher() -> torch.Tensor:
    """The CPU generator's state when eager construction builds the GAN heads (after the teacher's random init)."""
    torch.manual_seed(0)
    TinyConvNet()
    return torch.get_rng_state()


def write_weights(folder: Path) -> dict[str, str]:
    """The teacher as one safetensors file, and as a folder of two shards with a diffusers-style index."""
    state = teacher_state()
    single = folder / "teacher.safetensors"
    save_file(state, str(single))
    shards = folder / "shards"
    shards.mkdir()
    keys = sorted(state)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        save_file({k: state[k] for k in part}, str(shards / names[i]))
        weight_map.update(dict.fromkeys(part, names[i]))
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in state.values())}, "weight_map": weight_map}
    (shards / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return {"file": str(single), "shards": str(shards)}


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the composed model (the teacher too), whole."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: full(t).detach().clone() for name, t in named}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())}"]
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def optimizer_problems(model: torch.nn.Module) -> list[str]:
    """Optimizers whose parameters are not exactly the networks' trained (materialized) parameters."""
    problems = []
    for name, opt in model.optimizers().items():
        held = [p for group in opt.param_groups for p in group["params"]]
        net = model.trainable_networks()[name]
        expected = [p for n, p in net.named_parameters() if n in model._trained_names[name]]
        if len(held) != len(expected) or any(a is not b for a, b in zip(held, expected, strict=False)):
            problems.append(f"{name}: not the network's parameters")
        if any(full(p).is_meta for p in held):
            problems.append(f"{name}: meta parameters")
    return problems


def steps(model: torch.nn.Module, rank: int, world_size: int) -> list[float]:
    share = 4 // world_size
    losses = []
    for it in range(STEPS):
        batch = {k: v[rank * share : (rank + 1) * share] for k, v in global_batch(it).items()}
        _, loss = model.training_step(batch, it)
        loss.backward()
        model.optimizer_step(it)
        losses.append(float(loss.detach()))
    return losses


def meta_model(mode: str | None, weights: str, read: str = "own"):
    """meta_init construction, parallelize (unless ``mode`` is None), materialize."""
    with meta_init():
        model = build("dmd2_gan", r1=False)
    if mode is not None:
        parallelize(model, ParallelConfig(mode=mode, precision="fp32"))
    torch.set_rng_state(rng_after_teacher())  # the heads are built from the generator as eager construction had it
    return model, materialize(model, weights, read=read)


def meta_worker(rank: int, world_size: int, weights: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for mode in ("fsdp", "ddp"):
        eager = build("dmd2_gan", r1=False)
        parallelize(eager, ParallelConfig(mode=mode, precision="fp32"))
        reference = tensors(eager)
        for source, read in (("file", "own"), ("shards", "rank0")):
            model, report = meta_model(mode, weights[source], read)
            shards = [t for t in model.net_teacher.state_dict().values()]
            local_bytes = max(t.to_local().numel() * 4 if hasattr(t, "to_local") else t.numel() * 4 for t in shards)
            out[f"{mode}/{source}"] = {
                "diff": differences(tensors(model), reference), "optimizers": optimizer_problems(model),
                "networks": report.networks, "largest": report.largest_read_bytes, "local_bytes": local_bytes,
                "sharded": type(model.net.inp.weight).__name__,
            }
            if source == "file":  # training from here gives the same losses and weights
                out[f"{mode}/losses"] = (steps(eager, rank, world_size), steps(model, rank, world_size))
                out[f"{mode}/trained"] = differences(tensors(model), tensors(eager))
    return out


def test_meta_construction_equals_eager_on_two_processes(tmp_path):
    weights = write_weights(tmp_path)
    largest_full = max(v.numel() * 4 for v in teacher_state().values())
    for rank_result in run_distributed(meta_worker, 2, weights):
        for mode in ("fsdp", "ddp"):
            for source in ("file", "shards"):
                r = rank_result[f"{mode}/{source}"]
                assert r["diff"] == [] and r["optimizers"] == [], (mode, source, r)
                assert r["networks"]["net"] == r["networks"]["net_fake_score"] == "copied from net_teacher"
                assert r["networks"]["net_discriminator"] == "rebuilt"
                assert r["sharded"] == "DTensor"
            own, rank0 = rank_result[f"{mode}/file"], rank_result[f"{mode}/shards"]
            assert own["largest"] <= own["local_bytes"]  # each rank read only its own shards
            assert rank0["largest"] == largest_full  # one whole tensor at a time, broadcast by rank 0
            eager_losses, meta_losses = rank_result[f"{mode}/losses"]
            assert eager_losses == meta_losses
            assert rank_result[f"{mode}/trained"] == []


# ------------------------------------------------------------------------------------ one process, no group


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    return write_weights(tmp_path_factory.mktemp("meta"))


@pytest.mark.parametrize("context", ["meta_init", "torch.device"])
def test_one_process_without_a_group_equals_eager(weights, context):
    eager = build("dmd2_gan", r1=False)
    with meta_init() if context == "meta_init" else torch.device("meta"):
        model = build("dmd2_gan", r1=False)
    assert all(p.is_meta for p in model.parameters())
    model.optimizers()  # built over meta parameters: materialize builds them again
    torch.set_rng_state(rng_after_teacher())
    report = materialize(model, weights["shards"])
    assert report.networks["net_ema"] == "copied from net"
    assert differences(tensors(model), tensors(eager)) == [] and optimizer_problems(model) == []
    assert steps(model, 0, 1) == steps(eager, 0, 1)
    assert differences(tensors(model), tensors(eager)) == []


class MLPKD(KDMixin, ToyHost):
    """KD on a teacher with a non-persistent buffer computed in __init__ (MLPDenoiser.frequencies)."""


def mlp_kd() -> MLPKD:
    torch.manual_seed(0)
    return MLPKD(MLPDenoiser((2, 2, 1, 1), "rf_velocity", num_labels=2, hidden=16, depth=2), "rf_velocity",
                 distill=KDConfig())


def test_non_persistent_buffers_stay_real_under_meta_init_and_are_named_under_plain_meta(tmp_path):
    eager = mlp_kd()
    save_file(dict(eager.net_teacher.state_dict()), str(tmp_path / "mlp.safetensors"))
    with meta_init():
        model = mlp_kd()
    assert not model.net_teacher.frequencies.is_meta and model.net_teacher.head.weight.is_meta
    materialize(model, tmp_path / "mlp.safetensors")
    assert differences(tensors(model), tensors(eager)) == []
    with torch.device("meta"):
        model = mlp_kd()
    with pytest.raises(ValueError, match=r"net_teacher\.frequencies is a non-persistent buffer built on meta"):
        materialize(model, tmp_path / "mlp.safetensors")


def test_a_diffusers_model_folder_and_a_seed_for_the_heads(tmp_path):
    (tmp_path / "transformer").mkdir()
    save_file(teacher_state(), str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "model_index.json").write_text("{}")
    with meta_init():
        model = build("dmd2_gan", r1=False)
    with pytest.raises(FileNotFoundError, match="subfolder='transformer'"):
        materialize(model, tmp_path)
    before = torch.get_rng_state()
    materialize(model, tmp_path, subfolder="transformer", seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was
    torch.manual_seed(3)
    heads = build_discriminator(model.distill_config.discriminator)
    assert differences(tensors(model.net_discriminator), tensors(heads)) == []
    assert differences(tensors(model.net_teacher), teacher_state()) == []


def test_a_missing_key_a_wrong_shape_or_an_extra_tensor_is_named(tmp_path):
    state = teacher_state()
    missing = {k: v for k, v in state.items() if k != "blocks.1.weight"}
    cases = {
        "missing": (missing, r"lacks the teacher's 'blocks\.1\.weight'"),
        "shape": ({**state, "out.bias": torch.zeros(3)}, r"'out\.bias' has shape \(3,\), the teacher's .* \(2,\)"),
        "extra": ({**state, "extra.weight": torch.zeros(1)}, r"does not have: 'extra\.weight'"),
    }
    for name, (bad, message) in cases.items():
        save_file(bad, str(tmp_path / f"{name}.safetensors"))
        with meta_init():
            model = build("dmd2_gan", r1=False)
        with pytest.raises(ValueError, match=message):
            materialize(model, tmp_path / f"{name}.safetensors")
    materialize(model, tmp_path / "extra.safetensors", strict=False)  # unexpected tensors may be ignored
    assert differences(tensors(model.net_teacher), state) == []


def test_shard_region_of_a_plain_tensor_is_all_of_it():
    assert shard_region(torch.zeros(3, 4)) == (slice(0, 3), slice(0, 4))
