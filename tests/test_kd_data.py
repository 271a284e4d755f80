"""KD teacher data: generation, grid through the student times, shards + manifest, resume, dataset, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from distill_mixins.cli import main as cli_main
from distill_mixins.data import (
    KD_NOISE,
    KD_PATH,
    KD_PATH_T,
    KD_SAMPLE_INDEX,
    KD_TEACHER_X0,
    KD_VIDEO,
    KDDataConfig,
    KDDataError,
    KDShardDataset,
    ODEPairDataset,
    generate_kd_data,
    generate_ode_pairs,
    prompt_batches,
    sample_noise,
    split_grid,
    teacher_grid,
    teacher_hash,
    write_ode_pairs,
)
from distill_mixins.data.examples import analytic_batches, analytic_model, analytic_prompt_batch
from distill_mixins.data.kd_data import PAUSE_ENV
from distill_mixins.run_config import resolve_object
from distill_mixins.sampling import initial_state, sample_euler, sample_heun, sample_ode_states, time_grid
from distill_mixins.testing import GMMDenoiserNet, MLPDenoiser, ring_mixture

torch.set_num_threads(1)  # tiny tensors: intra-op threads only add stalls (docs/development.md)

GUIDANCE = 2.0
ROOT = Path(__file__).resolve().parents[1]


def four_step_config(**changes) -> KDDataConfig:
    """40 samples in shards of 16 (16, 16, 8), teacher batches of 8, ODE path at the Cosmos 4-step times."""
    ts = tuple(analytic_model("cosmos_4step").student_times().tolist())
    fields = {"num_samples": 40, "shard_size": 16, "batch_size": 8, "guidance": GUIDANCE, "path_times": ts, "seed": 3}
    return KDDataConfig(**{**fields, **changes})


def generate(out: Path, config: KDDataConfig, batch_size: int = 12):
    return generate_kd_data(analytic_model("cosmos_4step"), analytic_batches(batch_size), out, config)


def shard_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(out.glob("shard-*.safetensors"))}


def assert_same_dataset(a: Path, b: Path) -> None:
    ta, tb = shard_tensors(a), shard_tensors(b)
    assert sorted(ta) == sorted(tb) and ta
    for name in ta:
        assert sorted(ta[name]) == sorted(tb[name])
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), (name, key)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma == mb  # same shards, sizes and sha256 checksums


def everything(dataset) -> dict:
    return default_collate([dataset[i] for i in range(len(dataset))])


# ----------------------------------------------------------------------------------- config, grid, sampler


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampler": "dpm"}, "KDDataConfig.sampler='dpm' is not known"),
        ({"shard_size": 0}, "KDDataConfig.shard_size=0 must be an int >= 1"),
        ({"path_times": (1.0, 1.2)}, "KDDataConfig.path_times=(1.0, 1.2): give strictly descending"),
        ({"path_times": (1.5, 1.0, 0.5), "steps": 2}, "KDDataConfig.steps=2 is below the 3 path times"),
        ({"store_keys": ("label", "kd/noise")}, "KDDataConfig.store_keys has ['kd/noise']"),
        ({"dtype": "float8"}, "KDDataConfig.dtype='float8' is not known"),
        ({"guidance": float("nan")}, "KDDataConfig.guidance=nan must be a finite number >= 0"),
    ],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        KDDataConfig(**changes)


def test_split_grid_passes_through_every_path_time_and_keeps_the_step_count():
    base = time_grid(36, "shifted_rf", 1.0)
    ts = analytic_model("cosmos_4step").student_times()
    grid = split_grid(base, ts, 36)
    assert grid.times.shape == (37,) and grid.times[-1] == 0 and bool((grid.times[1:] < grid.times[:-1]).all())
    assert grid.path_indices == (0, 3, 7, 15)  # steps per segment 3, 4, 8, 21 ~ the base grid's 2.25, 3.75, 7.5, 22.5
    assert torch.equal(grid.times[list(grid.path_indices)], ts)
    assert torch.equal(split_grid(base, base[:1], 36).times, base)  # one segment from the start: the base grid
    later = split_grid(base, torch.tensor([1.2, 0.3], dtype=torch.float64), 10)
    assert later.times[0] == 1.2 and later.times[later.path_indices[1]] == 0.3 and len(later.times) == 11


def test_sample_ode_states_matches_the_samplers_and_records_the_asked_states():
    mixture = ring_mixture(shape=(2, 2, 1, 1))
    net = GMMDenoiserNet(mixture, "edm_x0")
    labels = torch.tensor([0, 1, 0])

    def denoise(x, t):
        return net(x / torch.cos(t).float()[:, None, None, None, None], 0.5 * torch.tan(t), labels)

    noise = torch.randn(3, 2, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    ts = time_grid(12, "uniform", 0.5, t_max=1.5)
    for sampler, reference in (("heun", sample_heun), ("euler", sample_euler)):
        x0, states = sample_ode_states(denoise, noise, ts, sigma_data=0.5, record=(0, 5, 12), sampler=sampler)
        assert torch.equal(x0, reference(denoise, noise, ts, sigma_data=0.5))
        assert states.shape == (3, 3, 2, 2, 1, 1) and torch.equal(states[:, 2], x0)
        assert torch.equal(states[:, 0], initial_state(noise, ts[0], 0.5))
        tail = reference(denoise, states[:, 1] / (0.5 * math.sin(ts[5])), ts[5:], sigma_data=0.5)
        assert torch.allclose(tail, x0, atol=1e-6)


# ----------------------------------------------------------------------------------------- generation


def test_teacher_x0_and_noise_are_the_teachers_sample_from_the_per_sample_noise(tmp_path):
    config = KDDataConfig(num_samples=24, shard_size=10, batch_size=8, guidance=GUIDANCE, seed=5)
    model = analytic_model()
    generate_kd_data(model, analytic_batches(7), tmp_path, config)
    data = everything(KDShardDataset(tmp_path))
    assert torch.equal(data[KD_SAMPLE_INDEX], torch.arange(24))
    assert torch.equal(data[KD_NOISE], sample_noise(5, range(24), (2, 2, 1, 1), torch.float32))
    labels = data["label"]
    for start, stop in ((0, 8), (8, 10), (10, 18), (18, 20), (20, 24)):  # the teacher batches within shards
        x0 = model.generate_teacher(labels[start:stop], data[KD_NOISE][start:stop], guidance=GUIDANCE,
                                    uncondition=torch.full_like(labels[start:stop], -1))
        assert torch.equal(data[KD_TEACHER_X0][start:stop], x0)
    stream = analytic_batches(7)
    expected = torch.cat([next(stream)["label"] for _ in range(4)])[:24]
    assert torch.equal(labels, expected)  # the user's batches, re-cut into shards in order
    assert KD_PATH not in data and "path" not in data


def test_noise_depends_only_on_seed_and_sample_index(tmp_path):
    generate(tmp_path / "a", four_step_config())
    generate(tmp_path / "b", four_step_config(), batch_size=5)  # other host batches: same noise per sample
    generate(tmp_path / "c", four_step_config(seed=4))
    a, b, c = (everything(KDShardDataset(tmp_path / d)) for d in "abc")
    assert torch.equal(a[KD_NOISE], b[KD_NOISE]) and not torch.equal(a[KD_NOISE], c[KD_NOISE])
    generate(tmp_path / "a2", four_step_config())
    assert_same_dataset(tmp_path / "a", tmp_path / "a2")  # same seed: identical tensors and checksums


def test_path_states_lie_on_the_teachers_ode(tmp_path):
    config = four_step_config(num_samples=32, shard_size=32)
    model = analytic_model("cosmos_4step")
    generate_kd_data(model, analytic_batches(32), tmp_path, config)
    data = everything(KDShardDataset(tmp_path))
    ts, sd = model.student_times(), model.sigma_data
    assert data[KD_PATH].shape == (32, 4, 2, 2, 1, 1) and torch.equal(data[KD_PATH_T], ts.expand(32, 4))
    assert torch.equal(data[KD_PATH][:, 0], initial_state(data[KD_NOISE], ts[0], sd))
    grid = teacher_grid(model, config)
    denoise = model.guided_denoiser(model.net_teacher, data["label"], torch.full_like(data["label"], -1), GUIDANCE)
    for k, i in enumerate(grid.path_indices):  # the rest of the 36-step solve from path[k] is the stored x0
        assert grid.times[i] == ts[k]
        rest = sample_heun(denoise, data[KD_PATH][:, k] / (sd * math.sin(ts[k])), grid.times[i:], sigma_data=sd)
        assert torch.allclose(rest, data[KD_TEACHER_X0], atol=1e-5)
    fine = teacher_grid(model, dataclasses.replace(config, steps=720))  # a 720-step solve through the same times
    _, exact = sample_ode_states(denoise, data[KD_NOISE], fine.times, sigma_data=sd, record=fine.path_indices)
    error = (data[KD_PATH] - exact).abs().max().item()
    print(f"max |path - 720-step solution| = {error:.2e}")
    assert error < 1e-4  # the bound (measured 9.6e-5)


def test_kill_with_sigkill_then_rerun_gives_the_uninterrupted_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    config = four_step_config()
    generate(tmp_path / "reference", config)
    killed = tmp_path / "killed"
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from distill_mixins.data import KDDataConfig, generate_kd_data\n"
        "from distill_mixins.data.examples import analytic_batches, analytic_model\n"
        f"generate_kd_data(analytic_model('cosmos_4step'), analytic_batches(12), {str(killed)!r}, "
        f"KDDataConfig(**{dataclasses.asdict(config)!r}))\n"
    )
    env = {**os.environ, PAUSE_ENV: "60"}  # sleeps after each finished shard
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.json"
    deadline = time.monotonic() + 60
    while not (manifest.exists() and json.loads(manifest.read_text())["count"] >= 16):
        assert process.poll() is None and time.monotonic() < deadline, "the generation did not finish a shard"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(manifest.read_text())["complete"] is False
    result = generate(killed, config)
    assert (result.generated_shards, result.skipped_shards) == (2, 1)
    assert_same_dataset(tmp_path / "reference", killed)


def test_rerun_replaces_unlisted_and_half_written_files(tmp_path):
    config = four_step_config()
    generate(tmp_path / "reference", config)
    out = tmp_path / "out"
    generate(out, config)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]  # killed after renaming shard 1, before listing it
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00001.safetensors").write_bytes(b"garbage from a killed run")
    (out / ".shard-00002.safetensors.12345.tmp").write_bytes(b"half written")
    result = generate(out, config)
    assert (result.generated_shards, result.skipped_shards) == (2, 1)
    assert not list(out.glob(".*.tmp"))
    assert_same_dataset(tmp_path / "reference", out)
    assert generate(out, config).generated_shards == 0  # nothing left to do


def test_resume_with_other_settings_or_teacher_names_the_field(tmp_path):
    generate(tmp_path, four_step_config())
    with pytest.raises(KDDataError, match=r"manifest.json was written with guidance=2.0, this run has guidance=3.0"):
        generate(tmp_path, four_step_config(guidance=3.0))
    other = analytic_model("cosmos_4step")
    other.net_teacher.mixture.means += 0.1
    with pytest.raises(KDDataError, match="written with teacher_hash="):
        generate_kd_data(other, analytic_batches(12), tmp_path, four_step_config())
    with pytest.raises(KDDataError, match="written with shard_size=16, this run has shard_size=8"):
        generate(tmp_path, four_step_config(shard_size=8))


def test_teacher_hash_covers_weights_or_the_analytic_teachers_attributes():
    net = MLPDenoiser((2, 2, 1, 1), "edm_eps", 2, hidden=8, depth=2, seed=0)
    digest, kind = teacher_hash(net)
    assert kind == "state_dict" and digest == teacher_hash(MLPDenoiser((2, 2, 1, 1), "edm_eps", 2, hidden=8,
                                                                       depth=2, seed=0))[0]
    with torch.no_grad():
        net.head.bias[0] += 1e-3
    assert teacher_hash(net)[0] != digest
    exact = GMMDenoiserNet(ring_mixture(shape=(2, 2, 1, 1)), "edm_eps")
    assert teacher_hash(exact)[1] == "class_attributes"
    assert teacher_hash(GMMDenoiserNet(ring_mixture(shape=(2, 2, 1, 1), num_modes=4), "edm_eps"))[0] != \
        teacher_hash(exact)[0]


def test_batches_that_run_out_or_do_not_fit_raise(tmp_path):
    few = [next(analytic_batches(8)) for _ in range(2)]
    with pytest.raises(KDDataError, match="the batches ran out after 16 samples: lower num_samples"):
        generate_kd_data(analytic_model(), few, tmp_path / "a", KDDataConfig(num_samples=20, shard_size=20))
    clash = [{**few[0], KD_NOISE: torch.zeros(8)}]
    with pytest.raises(KDDataError, match=r"batch keys \['kd/noise'\] collide"):
        generate_kd_data(analytic_model(), clash, tmp_path / "b", KDDataConfig(num_samples=8))


# --------------------------------------------------------------------------------------------- dataset


def test_corrupted_or_truncated_shard_is_named(tmp_path):
    generate(tmp_path, four_step_config())
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # flip a byte of tensor data
    shard.write_bytes(bytes(data))
    with pytest.raises(KDDataError, match="shard-00001.safetensors fails its checksum"):
        KDShardDataset(tmp_path)[20]
    assert KDShardDataset(tmp_path)[3][KD_TEACHER_X0].shape == (2, 2, 1, 1)  # other shards still read
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(KDDataError, match="shard-00001.safetensors is truncated or altered"):
        KDShardDataset(tmp_path)[20]
    with pytest.raises(KDDataError, match="shard-00001.safetensors is not a readable safetensors file"):
        KDShardDataset(tmp_path, verify=False)[20]
    assert generate(tmp_path, four_step_config()).generated_shards == 1  # a re-run regenerates the broken shard
    assert KDShardDataset(tmp_path)[20][KD_SAMPLE_INDEX] == 20


def test_shapes_are_checked_against_the_manifest(tmp_path):
    generate(tmp_path, four_step_config())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["tensors"][KD_PATH]["shape"] = [3, 2, 2, 1, 1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KDDataError, match=r"shard-00000.safetensors: tensor 'kd/path' is float32 \[16, 4, 2, 2, 1, 1"):
        KDShardDataset(tmp_path)[0]
    with pytest.raises(KDDataError, match="does not exist"):
        KDShardDataset(tmp_path / "nothing")


def test_dataset_with_distributed_sampler_and_shuffling_loader_feeds_kd_training(tmp_path):
    generate(tmp_path, four_step_config())
    dataset = KDShardDataset(tmp_path)
    assert len(dataset) == 40
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
        seen.append(torch.cat([batch[KD_SAMPLE_INDEX] for batch in loader]).tolist())
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(40))
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    order = torch.cat([b[KD_SAMPLE_INDEX] for b in batches])
    assert sorted(order.tolist()) == list(range(40)) and order.tolist() != list(range(40))
    model = analytic_model("cosmos_4step")  # a dataset batch is a KD batch: the host reads it unchanged
    out, loss = model.training_step(batches[0], 0)
    assert torch.isfinite(loss) and out["loss_kd"] > 0


# ------------------------------------------------------------------------------------- prompts, ODE pairs


def test_prompt_list_and_ode_pairs(tmp_path):
    prompts = [f"label {i % 2}" for i in range(10)]
    batches = prompt_batches(prompts, analytic_prompt_batch, 4)
    config = four_step_config(num_samples=10, shard_size=6)
    generate_kd_data(analytic_model("cosmos_4step"), batches, tmp_path / "kd", config)
    data = KDShardDataset(tmp_path / "kd")
    assert [data[i]["prompt"] for i in range(10)] == prompts
    manifest = write_ode_pairs(tmp_path / "kd", tmp_path / "pairs")
    pairs = ODEPairDataset(manifest.parent)
    assert len(pairs) == 10 and pairs[7]["prompt"] == "label 1"
    assert torch.equal(pairs[7]["clean_latent"], data[7][KD_TEACHER_X0])
    assert torch.equal(pairs[7]["path"], data[7][KD_PATH]) and torch.equal(pairs[7]["noise"], data[7][KD_NOISE])
    with pytest.raises(KDDataError, match="has no string key 'caption'"):
        write_ode_pairs(tmp_path / "kd", tmp_path / "pairs2", prompt_key="caption")
    pair = manifest.parent / "pair-00000003.safetensors"
    pair.write_bytes(pair.read_bytes()[:-3])
    with pytest.raises(KDDataError, match="pair-00000003.safetensors is truncated or corrupted"):
        pairs[3]


def test_cli_generates_resumes_and_writes_ode_pairs(tmp_path, capsys):
    examples = "distill_mixins.data.examples"
    args = ["generate-kd-data", "--model", f"{examples}:analytic_model", "--data", f"{examples}:analytic_batches",
            "--out", str(tmp_path / "kd"), "--num-samples", "24", "--shard-size", "10", "--guidance", "2",
            "--student-schedule", "cosmos_4step", "--steps", "12"]
    assert cli_main(args) == 0
    assert "24 samples in 3 shards (3 generated, 0 already done)" in capsys.readouterr().out
    assert cli_main(args) == 0
    assert "(0 generated, 3 already done)" in capsys.readouterr().out
    data = KDShardDataset(tmp_path / "kd")
    assert len(data) == 24 and data[0][KD_PATH].shape == (4, 2, 2, 1, 1) and data.manifest["steps"] == 12
    assert cli_main([*args, "--guidance", "3"]) == 2  # resuming with another guidance is refused (a user error)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("label 0\nlabel 1\n\nlabel 1\n")
    assert cli_main(["generate-kd-data", "--model", f"{examples}:analytic_model", "--prompts", str(prompts),
                     "--prompt-batch", f"{examples}:analytic_prompt_batch", "--out", str(tmp_path / "p"),
                     "--path-times", "1.5707963267948966,0.8", "--ode-pairs", str(tmp_path / "pairs")]) == 0
    assert [ODEPairDataset(tmp_path / "pairs")[i]["prompt"] for i in range(3)] == ["label 0", "label 1", "label 1"]


def test_cli_is_registered():
    result = subprocess.run([sys.executable, "-m", "distill_mixins.cli", "generate-kd-data", "--help"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert "--student-schedule" in result.stdout and "x0_u + w (x0_c - x0_u)" in result.stdout


def test_negative_condition_storage_dtype_and_decoded_video(tmp_path):
    model = analytic_model()
    model.decode = lambda latent: 2.0 * latent  # a host tokenizer's decode
    config = KDDataConfig(num_samples=8, shard_size=8, guidance=GUIDANCE, dtype="bfloat16", store_video=True)

    def negative(data):
        return torch.zeros_like(data.condition)

    generate_kd_data(model, analytic_batches(8), tmp_path, config, negative=negative)
    data = everything(KDShardDataset(tmp_path))
    noise = data[KD_NOISE]
    assert noise.dtype == torch.bfloat16 and torch.equal(noise, sample_noise(0, range(8), (2, 2, 1, 1), torch.bfloat16))
    x0 = model.generate_teacher(data["label"], data[KD_NOISE].float(), uncondition=torch.zeros_like(data["label"]),
                                guidance=GUIDANCE)
    assert torch.equal(data[KD_TEACHER_X0], x0.bfloat16()) and torch.equal(data[KD_VIDEO], (2.0 * x0).bfloat16())
    assert KDShardDataset(tmp_path).manifest["negative"].endswith("negative")
    with pytest.raises(KDDataError, match="store_video=True needs a host decode"):
        generate_kd_data(analytic_model(), analytic_batches(8), tmp_path / "b", config)


def test_more_samples_later_extends_the_dataset_as_one_run_would(tmp_path):
    generate(tmp_path / "grown", four_step_config())
    result = generate(tmp_path / "grown", four_step_config(num_samples=50))
    assert (result.generated_shards, result.skipped_shards) == (2, 2)  # shard 2 grows from 8 to 16, shard 3 is new
    generate(tmp_path / "reference", four_step_config(num_samples=50))
    assert_same_dataset(tmp_path / "reference", tmp_path / "grown")


def test_loader_workers_read_the_shards(tmp_path):
    generate(tmp_path, four_step_config())
    loader = DataLoader(KDShardDataset(tmp_path), batch_size=8, shuffle=True, num_workers=2)
    assert sorted(torch.cat([b[KD_SAMPLE_INDEX] for b in loader]).tolist()) == list(range(40))


def test_generate_ode_pairs_command_defaults_to_the_models_times(tmp_path, capsys):
    """``generate-ode-pairs``: the path at the model's own student times, the pair layout in OUT/pairs."""
    examples = "distill_mixins.data.examples"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("label 0\nlabel 1\n")
    args = ["generate-ode-pairs", "--model", f"{examples}:analytic_model", "--prompts", str(prompts),
            "--prompt-batch", f"{examples}:analytic_prompt_batch", "--out", str(tmp_path / "ode"), "--steps", "8"]
    assert cli_main(args) == 0
    pairs = ODEPairDataset(tmp_path / "ode" / "pairs")
    model = resolve_object(f"{examples}:analytic_model", "--model")()
    assert len(pairs) == 2 and pairs[1]["prompt"] == "label 1"
    assert torch.equal(pairs[0]["path_t"], model.student_times())
    assert cli_main(args) == 0 and "(0 generated, 1 already done)" in capsys.readouterr().out


def test_generate_ode_pairs_function(tmp_path):
    model = analytic_model("cosmos_4step")
    prompts = ["label 0", "label 1", "label 0"]
    manifest = generate_ode_pairs(model, prompt_batches(prompts, analytic_prompt_batch, 2), tmp_path,
                                  KDDataConfig(num_samples=3, steps=8, shard_size=4))
    pairs = ODEPairDataset(manifest.parent)
    assert manifest.parent == tmp_path / "pairs" and len(pairs) == 3
    assert pairs[2]["path"].shape[0] == 4 and torch.equal(pairs[2]["path_t"], model.student_times())
