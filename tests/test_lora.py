"""LoRA distillation (distill_mixins.lora, issue 22): the student and the critic are peft adapters on one frozen base.

At initialisation the student is the teacher bit for bit; training changes the phase's adapter only and never the
base; the teacher call (adapters off) restores every adapter state, requires_grad flag and train mode, also when it
raises; DMD2 on the tiny diffusers Wan host; checkpoints hold adapters only and resume bit-exactly; extract-weights
--lora loads into a fresh diffusers Wan transformer through diffusers' LoRA loading, --merge into a plain one; FSDP2 at
world size 2 (gloo) equals one process.
"""

from __future__ import annotations

import copy
import hashlib
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")  # the [diffusers] extra
pytest.importorskip("peft")  # the [lora] extra

from diffusers import WanTransformer3DModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from distill_mixins import DistillConfig, DMD2Config, EMAConfig, KDConfig, LoraSpec, OptimizerConfig  # noqa: E402
from distill_mixins.lora import (  # noqa: E402
    CRITIC,
    STUDENT,
    AdapterView,
    TeacherView,
    lora_base,
    require_peft,
)
from tests.conftest import param_hash  # noqa: E402
from tests.hosts_helpers import (  # noqa: E402
    SHAPE,
    TEXT_DIM,
    TEXT_LEN,
    B,
    adam,
    batch,
    check_dmd2_phases,
    dmd2_config,
    tiny_wan,
)
from tests.test_hosts_wan import WanDMD2, WanKD  # noqa: E402

torch.set_num_threads(1)  # tiny tensors (docs/development.md)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=TARGETS)


def make_kd(**overrides) -> WanKD:
    values = dict(lora=SPEC, student_optimizer=adam(1e-2))
    return WanKD(tiny_wan(), distill=KDConfig(**{**values, **overrides}))


def make_dmd2(ema: bool = True, **overrides) -> WanDMD2:
    values = dict(
        lora=SPEC, student_update_freq=2, guidance_scale=2.0, student_optimizer=adam(1e-2), critic_optimizer=adam(1e-2),
        ema=EMAConfig(halflife_steps=2.0) if ema else None,
    )
    return WanDMD2(tiny_wan(), distill=DMD2Config(**{**values, **overrides}))


def wan_inputs(seed: int = 5) -> dict[str, torch.Tensor]:
    """Keyword inputs of a raw WanTransformer3DModel call."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(SHAPE, generator=g), "timestep": torch.rand(B, generator=g) * 1000,
            "encoder_hidden_states": torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g), "return_dict": False}


def run(net: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return net(**inputs)[0]


def base_hash(model) -> str:
    """Hash of the base's own weights (adapters left out), read from the base module itself."""
    h = hashlib.sha256()
    for name, p in sorted(lora_base(model).base.state_dict().items()):
        if ".lora_" not in name:
            h.update(name.encode())
            h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def kd_step(model, it: int) -> None:
    _, loss = model.training_step(batch(it, kd=True), it)
    loss.backward()
    model.optimizer_step(it)


def lora_state(model) -> dict[str, object]:
    """Every LoRA layer's active adapters and enabled flag, every base requires_grad flag and module mode."""
    lora = lora_base(model)
    return {
        "layers": [(tuple(layer.active_adapters), layer.disable_adapters) for layer in lora.layers.values()],
        "grad": [(n, p.requires_grad) for n, p in lora.base.named_parameters()],
        "modes": [(n, m.training) for n, m in lora.base.named_modules()],
    }


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"LoraSpec.rank=0 must be an int >= 1"),
        ({"rank": 2.5}, r"LoraSpec.rank=2.5"),
        ({"alpha": -1.0}, r"LoraSpec.alpha=-1.0 must be a finite number > 0"),
        ({"target_modules": ()}, r"LoraSpec.target_modules=\(\) must be a non-empty list"),
        ({"target_modules": ["to_q", ""]}, r"LoraSpec.target_modules="),
        ({"dropout": 1.0}, r"LoraSpec.dropout=1.0 must be a number in \[0, 1\)"),
        ({"critic": "yes"}, r"LoraSpec.critic='yes' must be True or False"),
    ],
)
def test_lora_spec_errors_name_the_field(kwargs, message):
    values = {"rank": 4, "alpha": 4.0, "target_modules": ("to_q",), **kwargs}
    with pytest.raises(ValueError, match=message):
        LoraSpec(**values)


def test_distill_config_lora_errors_name_the_field():
    assert LoraSpec(4, 4, ["to_q"]).target_modules == ("to_q",)
    with pytest.raises(TypeError, match="DistillConfig.lora must be a LoraSpec or None"):
        DistillConfig(lora={"rank": 4})
    with pytest.raises(ValueError, match="DMD2Config.student_net must be None with DMD2Config.lora"):
        DMD2Config(lora=SPEC, student_net=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="DMD2Config.critic_net must be None with DMD2Config.lora.critic=True"):
        DMD2Config(lora=SPEC, critic_net=nn.Linear(2, 2))
    DMD2Config(lora=LoraSpec(4, 4.0, TARGETS, critic=False), critic_net=nn.Linear(2, 2))  # a separate critic
    assert DMD2Config(lora=SPEC).to_dict()["lora"] == {
        "rank": 4, "alpha": 8.0, "target_modules": list(TARGETS), "dropout": 0.0, "critic": True,
    }


def test_targets_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"LoraSpec.target_modules=\('nothing_here',\)"):
        make_kd(lora=LoraSpec(4, 4.0, ("nothing_here",)))
    with pytest.raises(ValueError, match="adapts linear layers only"):
        make_kd(lora=LoraSpec(4, 4.0, ("patch_embedding",)))  # a Conv3d


def test_without_peft_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'distill-mixins\[lora\]'"):
        require_peft()
    with pytest.raises(ImportError, match=r"pip install 'distill-mixins\[lora\]'"):
        make_kd()


# ---------------------------------------------------------------------------------- one base, three views


def test_one_base_no_copies_and_the_networks_are_the_adapters():
    model = make_dmd2()
    lora = lora_base(model)
    assert isinstance(model.net, AdapterView) and isinstance(model.net_fake_score, AdapterView)
    assert isinstance(model.net_ema, AdapterView) and isinstance(model.net_teacher, TeacherView)
    base_params = {id(p) for p in lora.base.parameters()}
    for name in ("net", "net_fake_score", "net_ema"):  # every view's parameters live in the one base
        params = list(model._modules[name].parameters())
        assert params and all(id(p) in base_params for p in params)
        assert all(p.dtype == torch.float32 for p in params)
        assert all(".lora_A." in k or ".lora_B." in k for k in model._modules[name].state_dict())
    assert sum(1 for m in model.modules() if isinstance(m, WanTransformer3DModel)) == 1  # no deep copy of the base
    assert not any(p.requires_grad for p in model.net_teacher.parameters())
    assert all(".lora_" not in k for k in model.net_teacher.state_dict())
    optimized = {id(p) for opt in model.optimizers().values() for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in (*model.net.parameters(), *model.net_fake_score.parameters())}
    state = model.state_dict()
    assert not any(k.startswith("net_teacher.") for k in state)
    assert all(".lora_" in k for k in state if k != "ema_num_updates")
    n_adapter = sum(p.numel() for p in model.net.parameters())
    assert n_adapter < 0.25 * sum(p.numel() for p in model.net_teacher.parameters())


def test_student_equals_teacher_at_init_and_training_changes_only_the_adapter():
    reference = tiny_wan()  # the same weights as the model's teacher (same seed)
    model = make_kd()
    inputs = wan_inputs()
    expected = run(reference, inputs)
    assert torch.equal(run(model.net, inputs), expected)  # lora_B = 0: bit for bit
    assert torch.equal(run(model.net_teacher, inputs), expected)
    before_base = base_hash(model)
    before = {n: p.detach().clone() for n, p in lora_base(model).base.named_parameters()}
    for it in range(3):
        kd_step(model, it)
    after = dict(lora_base(model).base.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(f".{STUDENT}." in n and ".lora_" in n for n in changed)
    assert any(".lora_B.student." in n for n in changed)
    assert base_hash(model) == before_base
    assert all(not p.requires_grad for n, p in lora_base(model).base.named_parameters() if ".lora_" not in n)
    assert torch.equal(run(model.net_teacher, inputs), expected)  # adapters off: the original teacher exactly
    assert not torch.equal(run(model.net, inputs), expected)  # the student moved
    # the host's own teacher path gives the same: trigflow_denoise through predict
    condition = model.get_data_and_condition(batch(3))[1]
    x, t = torch.randn(SHAPE), torch.full((B,), 0.7, dtype=torch.float64)
    ref_host = WanKD(reference, distill=KDConfig(student_optimizer=adam()))
    with torch.no_grad():
        ours = model.trigflow_denoise(model.net_teacher, x, t, condition).x0
        theirs = ref_host.trigflow_denoise(ref_host.net_teacher, x, t, condition).x0
    assert torch.equal(ours, theirs)


def test_the_teacher_call_restores_every_state_also_when_it_raises():
    model = make_dmd2()
    model.train()
    model.set_phase(True)  # the student adapter trains, the critic's does not
    lora = lora_base(model)
    before = lora_state(model)
    seen = {}

    def spy(module, args):
        seen["disabled"] = all(layer.disable_adapters for layer in lora.layers.values())
        seen["grad"] = [(n, p.requires_grad) for n, p in lora.base.named_parameters()]
        seen["training"] = lora.base.training

    block = lora.base.blocks[0]
    handle = block.register_forward_pre_hook(spy)
    inputs = wan_inputs()
    run(model.net_teacher, inputs)
    assert seen["disabled"] and seen["grad"] == before["grad"] and seen["training"] is False
    assert lora_state(model) == before
    run(model.net, inputs)  # the student view: only its adapter active, in train mode, flags of the phase
    assert not seen["disabled"] and seen["grad"] == before["grad"] and seen["training"] is True
    assert lora_state(model) == before
    handle.remove()

    def boom(module, args):
        raise RuntimeError("injected failure")

    handle = block.register_forward_pre_hook(boom)
    for view in (model.net_teacher, model.net, model.net_fake_score):
        with pytest.raises(RuntimeError, match="injected failure"):
            run(view, inputs)
        assert lora_state(model) == before
    handle.remove()
    model.set_phase(False)  # the critic phase's flags survive a teacher call too
    before = lora_state(model)
    run(model.net_teacher, inputs)
    assert lora_state(model) == before


def test_each_view_runs_its_own_adapter():
    model = make_dmd2()
    lora = lora_base(model)
    with torch.no_grad():  # give the critic adapter its own values
        for p in lora.adapter_parameters(CRITIC):
            p.add_(0.05 * torch.randn_like(p))
    inputs = wan_inputs()
    student, critic, teacher = (run(v, inputs) for v in (model.net, model.net_fake_score, model.net_teacher))
    assert torch.equal(student, teacher) and not torch.equal(critic, teacher)
    from peft.functional import set_adapter

    set_adapter(lora.base, CRITIC)  # peft's own switching on the base gives the same critic
    for layer in lora.layers.values():
        layer.enable_adapters(True)
    assert torch.equal(run(lora.base, inputs), critic)


def test_adapters_stay_float32_under_bf16_autocast_and_on_a_bf16_base():
    for net in (tiny_wan(), tiny_wan().to(torch.bfloat16)):
        model = WanKD(net, distill=KDConfig(lora=SPEC, student_optimizer=adam(1e-2)))
        assert all(p.dtype == torch.float32 for p in model.net.parameters())
        assert model.net_teacher.base.blocks[0].attn1.to_q.base_layer.weight.dtype == net.proj_out.weight.dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model.training_step(batch(0, kd=True), 0)
        loss.backward()
        grads = [p.grad for p in model.net.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 for g in grads)
        model.optimizer_step(0)
        assert all(p.dtype == torch.float32 for p in model.net.parameters())


# ------------------------------------------------------------------------------------------------- DMD2


def test_dmd2_on_wan_with_lora_student_critic_and_gan_heads():
    """Student phases change only the student adapter, critic phases only the critic adapter and the GAN heads
    (teacher-tapped); finite losses; the base never changes; no feature-tap hook left (the shared helper)."""
    model = WanDMD2(tiny_wan(), distill=dmd2_config(source="teacher", lora=SPEC))
    before = base_hash(model)
    check_dmd2_phases(model)
    assert base_hash(model) == before


def test_dmd2_with_ema_the_ema_adapter_follows_the_student_only():
    model = make_dmd2()
    before = base_hash(model)
    for it in range(4):
        nets = {**model.trainable_networks(), "net_ema": model.net_ema}
        hashes = {name: param_hash(net) for name, net in nets.items()}
        out, loss = model.training_step(batch(40 + it), it)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in out.values())
        loss.backward()
        model.optimizer_step(it)
        changed = {name for name, net in nets.items() if param_hash(net) != hashes[name]}
        assert changed == ({"net", "net_ema"} if it % 2 == 0 else {"net_fake_score"}), (it, changed)
    assert base_hash(model) == before


def test_a_full_critic_with_lora_critic_false():
    model = make_dmd2(ema=False, lora=LoraSpec(4, 8.0, TARGETS, critic=False))
    assert isinstance(model.net, AdapterView) and isinstance(model.net_fake_score, WanTransformer3DModel)
    assert not any(".lora_" in n for n, _ in model.net_fake_score.named_parameters())
    for it in range(2):
        _, loss = model.training_step(batch(50 + it), it)
        loss.backward()
        model.optimizer_step(it)
        assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------ round trips


def train_its(model, its) -> list[float]:
    losses = []
    for it in its:
        _, loss = model.training_step(batch(60 + it), it)
        loss.backward()
        model.optimizer_step(it)
        losses.append(float(loss.detach()))
    return losses


def test_checkpoint_holds_adapters_only_and_resumes_bit_exactly(tmp_path):
    from distill_mixins.checkpointer import DistillCheckpointer

    model = make_dmd2()
    train_its(model, range(3))
    path = DistillCheckpointer(tmp_path / "ckpt").save(model, 3)
    n_base = sum(p.numel() for p in model.net_teacher.parameters())
    for stem in ("student", "critic", "ema"):
        saved = load_file(str(path / f"{stem}.safetensors"))
        assert saved and all(k.startswith("adapter.") and ".lora_" in k for k in saved)
        assert sum(v.numel() for v in saved.values()) < 0.25 * n_base
    expected_losses = train_its(model, range(3, 6))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = make_dmd2()
    DistillCheckpointer(tmp_path / "ckpt").load(fresh, path)
    assert train_its(fresh, range(3, 6)) == expected_losses
    state = fresh.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert base_hash(fresh) == base_hash(model)
    for name, opt in model.optimizers().items():  # Adam moments of the adapters, bit for bit
        ours = fresh.optimizers()[name].state_dict()["state"]
        theirs = opt.state_dict()["state"]
        assert all(torch.equal(ours[i][k], theirs[i][k]) for i in theirs for k in theirs[i])


def test_extract_lora_loads_into_diffusers_wan_and_merge_gives_the_same_network(tmp_path):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from distill_mixins.checkpointer import DistillCheckpointer

    from distill_mixins.cli import main

    model = make_kd(lora=LoraSpec(4, 6.0, TARGETS))  # scaling 1.5: not a power of two
    for it in range(3):
        kd_step(model, it)
    path = DistillCheckpointer(tmp_path / "ckpt").save(model, 3)
    inputs = wan_inputs(9)
    student = run(model.net, inputs)
    assert not torch.equal(student, run(model.net_teacher, inputs))

    out = tmp_path / "student_lora.safetensors"
    assert main(["extract-weights", "--input", str(path), "--output", str(out), "--lora"]) == 0
    tensors = load_file(str(out))
    suffixes = (".lora_A.weight", ".lora_B.weight")
    assert all(k.startswith("transformer.blocks.") and k.endswith(suffixes) for k in tensors)
    # 1) the pipeline loader's path: lora_state_dict (with its metadata) -> load_lora_into_transformer
    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == SPEC.rank == metadata["transformer.r"]  # alpha/rank is in lora_B
    fresh = tiny_wan()
    WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=fresh, metadata=metadata)
    assert (run(fresh, inputs) - student).abs().max() <= 1e-6
    # 2) the model's own loader: on the folder + file name (reads the metadata), and on the bare file (which does not)
    for where in ({"weight_name": out.name}, {}):
        fresh = tiny_wan()
        source = str(tmp_path) if where else str(out)
        fresh.load_lora_adapter(source, prefix="transformer", adapter_name="distilled", **where)
        assert (run(fresh, inputs) - student).abs().max() <= 1e-6

    base = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_wan().state_dict().items()}, str(base))
    merged = tmp_path / "student_merged.safetensors"
    assert main(["extract-weights", "--input", str(path), "--output", str(merged), "--merge", "--base", str(base)]) == 0
    plain = tiny_wan(seed=1)  # other weights: everything comes from the file
    plain.load_state_dict(load_file(str(merged)))
    assert (run(plain, inputs) - student).abs().max() <= 1e-6


def test_extract_lora_errors_are_one_line(tmp_path, capfd):
    from distill_mixins.checkpointer import DistillCheckpointer

    from distill_mixins.cli import main

    lora_ckpt = DistillCheckpointer(tmp_path / "a").save(make_kd(), 0)
    assert main(["extract-weights", "--input", str(lora_ckpt), "--output", str(tmp_path / "x"), "--merge"]) == 2
    assert "--merge needs --base" in capfd.readouterr().err
    assert main(["extract-weights", "--input", str(lora_ckpt), "--output", "x", "--merge", "--lora"]) == 2
    assert "give --lora" in capfd.readouterr().err
    plain = DistillCheckpointer(tmp_path / "b").save(WanKD(tiny_wan(), distill=KDConfig()), 0)
    assert main(["extract-weights", "--input", str(plain), "--output", str(tmp_path / "y"), "--lora"]) == 2
    assert "not trained with DistillConfig.lora" in capfd.readouterr().err


def test_load_student_state_dict_moves_an_adapter_between_stages():
    """The stage bridge: a KD LoRA student's adapter starts a DMD2 LoRA model (student and its EMA)."""
    kd = make_kd()
    for it in range(2):
        kd_step(kd, it)
    dmd2 = make_dmd2()
    dmd2.load_student_state_dict(kd.net.state_dict())
    inputs = wan_inputs()
    assert torch.equal(run(dmd2.net, inputs), run(kd.net, inputs))
    assert torch.equal(run(dmd2.net_ema, inputs), run(kd.net, inputs))
    assert torch.equal(run(dmd2.net_fake_score, inputs), run(dmd2.net_teacher, inputs))


def test_a_base_with_adapters_is_refused():
    model = make_kd()
    with pytest.raises(ValueError, match="already carries peft adapters"):
        WanKD(model.net_teacher.base, distill=KDConfig(lora=SPEC))
    assert copy.deepcopy(model).net.__dict__["_lora"].base is not model.net.__dict__["_lora"].base


def test_activation_checkpointing_wraps_the_base_blocks_once():
    from distill_mixins.lora import checkpoint_lora_base

    grads = []
    for policy in ("none", "full"):
        model = make_kd()
        counts = checkpoint_lora_base(model, policy)
        assert counts == ({} if policy == "none" else {"net_teacher": 2})
        assert checkpoint_lora_base(model, policy) == ({} if policy == "none" else {"net_teacher": 0})  # idempotent
        _, loss = model.training_step(batch(0, kd=True), 0)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.net.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_context_parallel_is_refused_with_lora():
    from distill_mixins.parallel import ParallelConfig
    from distill_mixins.parallel.parallelize import _context_parallel

    with pytest.raises(ValueError, match="ParallelConfig.cp=2 with DistillConfig.lora"):
        _context_parallel(make_kd(), ParallelConfig(mode="fsdp", cp=2), mesh=None)


# ---------------------------------------------------------------------------------------- FSDP2, 2 ranks

GLOBAL_BATCH = 4
TOL = 1e-5
PARALLEL_METHODS = ("kd", "dmd2", "dmd2_gan")


def build_parallel(method: str):
    """KD (1 iteration) or DMD2 (student then critic, EMA) with LoRA on tiny Wan, the same weights in every process.
    Adam eps 1e-6 (as tests/test_parallel_hosts.py): round-off on near-zero gradients is not amplified."""
    opt = dict(student_optimizer=adam(1e-3), critic_optimizer=adam(1e-3))
    opt = {k: type(v)(name="adam", lr=1e-3, weight_decay=0.0, eps=1e-6) for k, v in opt.items()}
    if method == "kd":
        return WanKD(tiny_wan(), distill=KDConfig(lora=SPEC, student_optimizer=opt["student_optimizer"]))
    if method == "dmd2_gan":  # GAN heads on the teacher's features: the base runs with a graph twice per step
        heads = OptimizerConfig(name="sgd", lr=1e-2, weight_decay=0.0)  # see tests/test_parallel_hosts.py
        return WanDMD2(tiny_wan(), distill=dmd2_config(source="teacher", lora=SPEC, student_update_freq=2,
                                                       discriminator_optimizer=heads, **opt))
    return WanDMD2(tiny_wan(), distill=DMD2Config(lora=SPEC, student_update_freq=2, guidance_scale=2.0,
                                                   ema=EMAConfig(halflife_steps=2.0), **opt))


def parallel_batch(method: str, iteration: int) -> dict[str, torch.Tensor]:
    from distill_mixins.methods.kd import KD_NOISE, KD_TEACHER_X0

    g = torch.Generator().manual_seed(500 + 10 * iteration + (method == "kd"))
    shape = (GLOBAL_BATCH, *SHAPE[1:])
    out = {"x0": torch.randn(shape, generator=g),
           "prompt_embeds": torch.randn(GLOBAL_BATCH, TEXT_LEN, TEXT_DIM, generator=g)}
    if method == "kd":
        out[KD_NOISE] = torch.randn(shape, generator=g)
        out[KD_TEACHER_X0] = torch.randn(shape, generator=g)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_parallel_case(method: str, rank: int, world_size: int) -> dict[str, object]:
    from distill_mixins.parallel import ParallelConfig, parallelize

    mode = "ddp" if method.endswith("_ddp") else "fsdp"
    method = method.removesuffix("_ddp")
    model = build_parallel(method)
    checkpointing = "full" if method == "dmd2" else "none"  # DMD2: recomputed blocks run in their forward's adapter
    held = parallelize(model, ParallelConfig(mode=mode, activation_checkpointing=checkpointing)).networks \
        if world_size > 1 else {}
    share = GLOBAL_BATCH // world_size
    losses, weights = [], []
    for it in range(1 if method == "kd" else 2):
        batch_ = {k: v[rank * share:(rank + 1) * share] for k, v in parallel_batch(method, it).items()}
        _, loss = model.training_step(batch_, it)
        loss.backward()
        model.optimizer_step(it)
        losses.append(float(loss.detach()))
        nets = ("net", "net_fake_score", "net_ema", "net_teacher", "net_discriminator")
        weights.append({name: {n: _full(p).detach().clone() for n, p in model._modules[name].named_parameters()}
                        for name in nets if name in model._modules})
    sharded = all(hasattr(p, "full_tensor") for p in model.net.parameters())  # DTensors inside the base's units
    return {"held": held, "losses": losses, "weights": weights, "sharded_adapters": sharded}


def lora_parallel_worker(rank: int, world_size: int) -> dict[str, object]:
    return {method: run_parallel_case(method, rank, world_size) for method in (*PARALLEL_METHODS, "kd_ddp")}


def test_fsdp2_two_processes_match_one():
    """KD, DMD2 (student then critic phase, EMA) and DMD2 with GAN heads on the teacher's features, LoRA on tiny Wan:
    FSDP2 at world size 2 (the base sharded once, the adapters inside its units) gives the losses and every
    network's weights of one process within 1e-5; so does KD under DDP (the base a plain copy)."""
    from tests.distributed import run_distributed

    parallel = run_distributed(lora_parallel_worker, 2)
    for method in PARALLEL_METHODS:
        single = run_parallel_case(method, 0, 1)
        assert any(v.abs().sum() > 0 for n, v in single["weights"][0]["net"].items() if ".lora_B." in n)  # it trained
        ranks = [result[method] for result in parallel]
        assert ranks[0]["held"]["net"] == "sharded" and ranks[0]["held"]["net_teacher"] == "sharded"
        assert all(r["sharded_adapters"] for r in ranks)
        check_same(method, single, ranks)
        if method == "kd":  # DDP: the base a plain copy on each rank, the adapters' gradients all-reduced
            ddp = [result["kd_ddp"] for result in parallel]
            assert ddp[0]["held"] == {"net": "replicated", "net_teacher": "copy"}
            check_same(method, single, ddp)


def check_same(method: str, single: dict[str, object], ranks: list[dict[str, object]]) -> None:
    for it, loss in enumerate(single["losses"]):
        mean = sum(r["losses"][it] for r in ranks) / len(ranks)
        assert mean == pytest.approx(loss, rel=TOL, abs=TOL), (method, it)
    for it, expected in enumerate(single["weights"]):
        for r in ranks:
            for name, params in expected.items():
                assert r["weights"][it][name].keys() == params.keys()
                for n, value in params.items():
                    gap = float((r["weights"][it][name][n] - value).abs().max())
                    assert gap <= TOL, (method, it, name, n, gap)
