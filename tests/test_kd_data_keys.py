"""KD data keys live under ``kd/``: a host whose batches carry ``video``, ``noise``, ``path`` and ``label`` generates,
reads back and trains unchanged; old-layout (plain-key) directories read as the ``kd/`` keys and are never resumed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from distill_mixins.checkpointer.files import sha256_file
from distill_mixins.trainer import Callback, DistillationTrainer, MapStyleData, TrainerConfig
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from distill_mixins.data import (
    KD_KEYS,
    KD_NOISE,
    KD_PATH,
    KD_PATH_T,
    KD_SAMPLE_INDEX,
    KD_TEACHER_X0,
    KD_VIDEO,
    KDDataConfig,
    KDDataError,
    KDShardDataset,
    generate_kd_data,
    sample_noise,
    teacher_grid,
)
from distill_mixins.data.examples import analytic_batches, analytic_model
from distill_mixins.data.kd_data import LAYOUT, METADATA_KEY
from distill_mixins.methods.kd import KDConfig, KDMixin, plain_name
from distill_mixins.sampling import initial_state, sample_ode_states
from distill_mixins.testing import MLPDenoiser, ToyHost, analytic_host_args, mixture_batch, ring_mixture

torch.set_num_threads(1)  # tiny tensors: intra-op threads only add stalls (docs/development.md)

SHAPE = (2, 2, 1, 1)
GUIDANCE = 2.0
HOST_KEYS = ("video", "noise", "path", "label")


class VideoHost(ToyHost):
    """A host whose batches are ``{"video": x0, "noise": its own (B, 3), "path": file names, "label": (B,)}``."""

    def get_data_and_condition(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert isinstance(batch["path"][0], str) and batch["noise"].shape[1:] == (3,)  # the host's own keys
        labels = batch["label"]
        return batch["video"], labels, torch.full_like(labels, -1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return 2.0 * latent


class VideoKD(KDMixin, VideoHost):
    """KD composed with the video host, as a user composes theirs."""


def video_kd() -> VideoKD:
    mixture = ring_mixture(num_modes=8, num_labels=2, shape=SHAPE)
    student = MLPDenoiser(SHAPE, "rf_velocity", 2, hidden=32, depth=2, seed=0)
    config = KDConfig(student_net=student, student_schedule="cosmos_4step")
    return VideoKD(**analytic_host_args(mixture, "rf_velocity"), distill=config)


def video_batches(batch_size: int = 7) -> Iterator[dict]:
    mixture = ring_mixture(num_modes=8, num_labels=2, shape=SHAPE)
    g = torch.Generator().manual_seed(11)
    start = 0
    while True:
        exact = mixture_batch(mixture, batch_size, g)
        names = [f"clips/{i:04d}.mp4" for i in range(start, start + batch_size)]
        yield {"video": exact["x0"], "noise": torch.randn(batch_size, 3, generator=g), "path": names,
               "label": exact["label"]}
        start += batch_size


def first_samples(n: int) -> dict:
    """The first ``n`` samples of :func:`video_batches`, as the host gave them."""
    stream, pieces = video_batches(), []
    while sum(len(p["label"]) for p in pieces) < n:
        pieces.append(next(stream))
    return {k: (torch.cat([p[k] for p in pieces]) if k != "path" else sum((p[k] for p in pieces), []))[:n]
            for k in HOST_KEYS}


def generate_video_data(out: Path, model: VideoKD) -> KDDataConfig:
    config = KDDataConfig(num_samples=24, shard_size=10, batch_size=8, guidance=GUIDANCE, seed=4, store_video=True,
                          path_times=tuple(model.student_times().tolist()))
    generate_kd_data(model, video_batches(), out, config)
    return config


def test_host_keys_video_noise_path_label_come_back_next_to_the_kd_fields(tmp_path):
    model = video_kd()
    config = generate_video_data(tmp_path, model)
    dataset = KDShardDataset(tmp_path)
    data = default_collate([dataset[i] for i in range(len(dataset))])
    given = first_samples(24)
    for key in ("video", "noise", "label"):  # the host's own tensors, as it gave them
        assert torch.equal(data[key], given[key]), key
    assert data["path"] == given["path"]  # the host's strings, as it gave them
    assert set(data) == {*HOST_KEYS, *KD_KEYS}
    assert dataset.manifest["layout"] == LAYOUT and set(dataset.manifest["tensors"]) == {"video", "noise", "label",
                                                                                          *KD_KEYS}
    assert torch.equal(data[KD_SAMPLE_INDEX], torch.arange(24))
    assert torch.equal(data[KD_NOISE], sample_noise(4, range(24), SHAPE, torch.float32))
    labels = data["label"][:8]  # the first teacher batch: the teacher's sample from kd/noise, not the host's video
    denoise = model.guided_denoiser(model.net_teacher, labels, torch.full_like(labels, -1), GUIDANCE)
    teacher, _ = sample_ode_states(denoise, data[KD_NOISE][:8], teacher_grid(model, config).times,
                                   sigma_data=model.sigma_data)
    ts = model.student_times()
    assert torch.allclose(data[KD_TEACHER_X0][:8], teacher, atol=1e-6)
    assert torch.equal(data[KD_VIDEO], 2.0 * data[KD_TEACHER_X0])
    assert torch.equal(data[KD_PATH][:, 0], initial_state(data[KD_NOISE], ts[0], model.sigma_data))
    assert torch.equal(data[KD_PATH_T], ts.expand(24, 4))


def test_kd_reads_the_kd_fields_not_the_hosts_and_trains_through_the_trainer(tmp_path):
    model = video_kd()
    generate_video_data(tmp_path / "kd", model)
    batch = default_collate([KDShardDataset(tmp_path / "kd")[i] for i in range(16)])
    with model.drawing(0, 16):
        x_t, t = model.kd_inputs(batch)
    k = [model.student_times().tolist().index(float(ti)) for ti in t]
    assert torch.equal(x_t, batch[KD_PATH][torch.arange(16), k])  # kd/path, not the host's "path" strings

    steps: list = []

    class Record(Callback):
        def on_step_end(self, trainer, step) -> None:
            steps.append(step)

    data = MapStyleData(KDShardDataset(tmp_path / "kd"), 8, seed=0)
    config = TrainerConfig(iterations=3, run_dir=str(tmp_path / "run"), progress=False, autocast="none")
    result = DistillationTrainer(model, data, config, [Record()]).fit()
    assert result.completed and result.iteration == 3 and len(steps) == 3
    assert all(torch.isfinite(torch.tensor(s.loss)) and s.outputs["loss_kd"] > 0 and not s.skipped for s in steps)


def test_a_batch_key_under_the_reserved_prefix_is_refused(tmp_path):
    batches = [{**next(analytic_batches(8)), "kd/mask": torch.zeros(8)}]
    with pytest.raises(KDDataError, match=r"batch keys \['kd/mask'\] collide with the KD data keys"):
        generate_kd_data(analytic_model(), batches, tmp_path, KDDataConfig(num_samples=8))
    with pytest.raises(ValueError, match=r"KDDataConfig.store_keys has \['kd/teacher_x0'\]"):
        KDDataConfig(store_keys=("label", KD_TEACHER_X0))


def test_hand_built_batches_use_plain_names_only_without_kd_keys():
    model = analytic_model()
    noise, other = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    t0 = model.student_times()[0]
    plain, _ = model.kd_inputs({"noise": noise, "teacher_x0": noise})
    assert torch.equal(plain, initial_state(noise, t0, model.sigma_data))
    kd, _ = model.kd_inputs({KD_NOISE: noise, "noise": other})  # the host's own "noise" is not the teacher's
    assert torch.equal(kd, initial_state(noise, t0, model.sigma_data))
    with pytest.raises(KeyError, match="no 'kd/teacher_x0'"):
        model.training_step({KD_NOISE: noise, "teacher_x0": noise, "x0": noise, "label": torch.zeros(4).long()}, 0)


def test_symmetric_pairs_move_the_kd_fields_and_leave_the_hosts_keys():
    from distill_mixins.trainer import FunctionData

    from distill_mixins.toy.clips import make_clips
    from distill_mixins.toy.symmetry import SYMMETRIES, SymmetricPairs

    clips = make_clips(16, seed=2)
    host_noise = torch.randn(16, 3)
    batch = {"clip": clips.video, "prompt": clips.prompts, KD_NOISE: clips.video * 0.3,
             KD_TEACHER_X0: clips.video * 0.5, "noise": host_noise}
    out = SymmetricPairs(FunctionData(lambda step: batch), seed=1).batch(0)
    for i, prompt in enumerate(out["prompt"]):
        g = next(g for g in SYMMETRIES if g.prompt(clips.prompts[i]) == prompt and torch.equal(
            out["clip"][i], g.apply(clips.video[i])))
        assert torch.equal(out[KD_NOISE][i], g.apply(batch[KD_NOISE][i]))
        assert torch.equal(out[KD_TEACHER_X0][i], g.apply(batch[KD_TEACHER_X0][i]))
    assert out["noise"] is host_noise


# ------------------------------------------------------------------------------------- old layout (1)


def to_layout_1(root: Path) -> None:
    """Rewrite a dataset as the generator wrote it before ``kd/`` keys: plain KD names, no manifest ``layout``."""
    manifest = json.loads((root / "manifest.json").read_text())
    for record in manifest["shards"]:
        path = root / record["file"]
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        tensors = {plain_name(k): v for k, v in load_file(path).items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: header["__metadata__"][METADATA_KEY]})
        record.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    manifest["tensors"] = {plain_name(k): v for k, v in manifest["tensors"].items()}
    del manifest["layout"]
    (root / "manifest.json").write_text(json.dumps(manifest))


def four_step(**changes) -> KDDataConfig:
    ts = tuple(analytic_model("cosmos_4step").student_times().tolist())
    return KDDataConfig(**{"num_samples": 20, "shard_size": 8, "batch_size": 8, "guidance": GUIDANCE,
                           "path_times": ts, **changes})


def test_old_layout_reads_as_the_kd_keys_and_is_never_resumed(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    for out in (new, old):
        generate_kd_data(analytic_model("cosmos_4step"), analytic_batches(8), out, four_step())
    to_layout_1(old)
    assert "noise" in load_file(old / "shard-00000.safetensors")  # the old plain key on disk
    a, b = KDShardDataset(new), KDShardDataset(old)
    assert len(a) == len(b) == 20 and b.tensor_spec == a.tensor_spec
    for i in (0, 9, 19):
        assert a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i] if k in KD_KEYS)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False  # an old run that was killed
    (old / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(KDDataError, match=r"old key layout 1 .* regenerate it with `distill-mixins generate-kd-data"):
        generate_kd_data(analytic_model("cosmos_4step"), analytic_batches(8), old, four_step())
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # nothing touched, nothing mixed


def test_unknown_layout_is_refused(tmp_path):
    generate_kd_data(analytic_model(), analytic_batches(8), tmp_path, KDDataConfig(num_samples=8))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["layout"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KDDataError, match="key layout 3, which this distill-mixins .* does not know"):
        KDShardDataset(tmp_path)
    with pytest.raises(KDDataError, match="key layout 3"):
        generate_kd_data(analytic_model(), analytic_batches(8), tmp_path, KDDataConfig(num_samples=8))
