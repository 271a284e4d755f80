"""Teacher data for knowledge distillation (Luhman & Luhman 2021, arXiv 2101.02388; MATH.md section 3).

:func:`generate_kd_data` runs the teacher's multi-step ODE sampler (CFG in the standard form
``x0_u + w (x0_c - x0_u)``) over the user's batches and writes a dataset directory (docs/kd_data.md):

- ``shard-00000.safetensors``, ...: per sample (leading dimension) the generator's fields under the reserved
  prefix ``kd/`` (:data:`~distill_mixins.methods.kd.KD_KEYS`): ``kd/sample_index`` (int64), ``kd/noise`` and
  ``kd/teacher_x0`` (C, T, H, W), optionally ``kd/path`` (K, C, T, H, W) and ``kd/path_t`` (K,) float64,
  optionally ``kd/video``; next to them the stored tensors of the user's batch under their own keys (``video``,
  ``noise``, ... are the user's); per-sample strings (prompts) in the safetensors metadata (one key,
  ``distill_mixins``, a JSON object).
- ``manifest.json``: ``layout`` (:data:`LAYOUT`), teacher hash, sampler settings, grid, per-sample shapes and
  dtypes, and the finished shards with their sizes and sha256 checksums.

Shards and the manifest are written to a temporary file, fsync'ed and renamed, so a killed run never
leaves a half-written file under a final name; a re-run skips the shards the manifest lists and verifies.
Sample ``i``'s noise depends only on ``(seed, i)``, so a resumed run writes the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from loguru import logger
from torch import Tensor, nn
from tqdm import tqdm

from distill_mixins.checkpointer.files import file_problem, fsync_dir, fsync_file, sha256_file
from distill_mixins.config import check_choice, check_positive
from distill_mixins.core import DistillBatch
from distill_mixins.methods.kd import (
    KD_KEYS,
    KD_NOISE,
    KD_PATH,
    KD_PATH_T,
    KD_PREFIX,
    KD_SAMPLE_INDEX,
    KD_TEACHER_X0,
    KD_VIDEO,
    plain_name,
)
from distill_mixins.sampling import GRIDS, sample_ode_states, time_grid
from distill_mixins.trainer.seeding import mixed_seed
from distill_mixins.trigflow import max_time

FORMAT = "distill-mixins-kd/1"
MANIFEST = "manifest.json"
METADATA_KEY = "distill_mixins"
SAMPLER_NAMES = ("heun", "euler", "ddim")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}
OUTPUT_KEYS = KD_KEYS
"""Keys the generator writes, all under the prefix ``kd/``; a stored batch key must not start with it."""
LAYOUT = 2
"""Key layout of a dataset (manifest ``layout``): 2 puts the generator's keys under ``kd/``; 1 (manifests without
``layout``) used plain names (``noise``, ``teacher_x0``, ...), which read as the ``kd/`` keys but cannot be resumed."""
REGENERATE_COMMAND = (
    "`distill-mixins generate-kd-data --out NEW_DIR ...` (or generate_kd_data(model, batches, NEW_DIR, config))"
)
PAUSE_ENV = "DISTILL_MIXINS_KD_TEST_PAUSE_S"
"""Test-only hook: seconds to sleep after each finished shard (lets a test SIGKILL a run between shards)."""

NegativeFn = Callable[[DistillBatch], Any]
"""``negative(data) -> condition``: the negative condition of a prepared chunk; it replaces the uncondition in CFG."""


class KDDataError(ValueError):
    """A KD dataset that is missing, corrupt, truncated, or disagrees with its manifest or with this run."""


@dataclass
class KDDataConfig:
    """Teacher data generation settings (defaults: Cosmos-Transfer1 KD, 10,000 samples of a 36-step teacher).

    ``guidance`` is ``w`` of the standard CFG form ``x0_u + w (x0_c - x0_u)`` (w = 1: no guidance).
    Cosmos-Transfer1's published "guidance 7" is Cosmos form ``x0_c + 7 (x0_c - x0_u)``, i.e. ``w = 8``;
    CFG on eps and on x0 give identical samples (docs/guidance.md).
    """

    num_samples: int = 10_000
    steps: int = 36
    sampler: str = "heun"
    guidance: float = 1.0
    seed: int = 0
    shard_size: int = 64
    """Samples per shard file (a shard is held in memory once while written)."""
    batch_size: int = 16
    """Samples per teacher call (the teacher's batch size)."""
    path_times: tuple[float, ...] | None = None
    """Descending TrigFlow times at which to store the ODE state (``kd/path``), e.g. ``model.student_times()``."""
    grid: str | None = None
    """Teacher time grid: ``karras``, ``shifted_rf``, ``uniform``; None: karras for EDM hosts, else shifted_rf
    (as ``generate_teacher``)."""
    store_keys: tuple[str, ...] | None = None
    """Batch keys stored per sample; None: every key whose value has one entry per sample."""
    dtype: str = "float32"
    """Storage dtype of kd/noise, kd/teacher_x0, kd/path and kd/video (the noise is rounded to it before sampling)."""
    store_video: bool = False
    """Also store ``kd/video = model.decode(teacher_x0)`` (needs a host ``decode``)."""
    device: str | None = None
    """Device of the teacher calls; None: the teacher's device."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "steps", "shard_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KDDataConfig.{name}={value!r} must be an int >= 1.")
        check_choice("KDDataConfig", "sampler", self.sampler, SAMPLER_NAMES)
        check_positive("KDDataConfig", "guidance", self.guidance, allow_zero=True)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"KDDataConfig.seed={self.seed!r} must be an int >= 0.")
        if self.grid is not None:
            check_choice("KDDataConfig", "grid", self.grid, GRIDS)
        check_choice("KDDataConfig", "dtype", self.dtype, tuple(STORAGE_DTYPES))
        self._check_path_times()
        self._check_store_keys()
        if self.device is not None:
            torch.device(self.device)  # raises on an unknown device string

    def _check_path_times(self) -> None:
        if self.path_times is None:
            return
        ts = tuple(float(t) for t in self.path_times)
        descending = all(a > b for a, b in zip(ts, ts[1:], strict=False))
        ok = len(ts) > 0 and all(0 < t <= math.pi / 2 for t in ts) and descending
        if not ok:
            raise ValueError(
                f"KDDataConfig.path_times={self.path_times!r}: give strictly descending TrigFlow times in (0, pi/2], "
                "e.g. model.student_times(), or None for no ODE path."
            )
        if self.steps < len(ts):
            raise ValueError(
                f"KDDataConfig.steps={self.steps} is below the {len(ts)} path times: the teacher grid needs at least "
                "one step per segment between them; raise steps."
            )
        self.path_times = ts

    def _check_store_keys(self) -> None:
        if self.store_keys is None:
            return
        keys = tuple(self.store_keys)
        if not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"KDDataConfig.store_keys={self.store_keys!r} must be distinct non-empty strings or None.")
        clash = reserved_keys(keys)
        if clash:
            raise ValueError(
                f"KDDataConfig.store_keys has {clash}, which use the prefix '{KD_PREFIX}' of the keys the generator "
                "writes itself; rename that batch key."
            )
        self.store_keys = keys


@dataclass
class KDDataResult:
    """What :func:`generate_kd_data` did: shards generated now and skipped (finished before), and its speed."""

    out_dir: Path
    manifest: Path
    num_samples: int
    num_shards: int
    generated_shards: int
    skipped_shards: int
    seconds: float
    samples_per_second: float


@dataclass
class TeacherGrid:
    """The teacher's time grid ``times`` (steps + 1,) float64 descending to 0, and where the path is recorded."""

    times: Tensor
    path_indices: tuple[int, ...]


def reserved_keys(keys: Iterable[Any]) -> list[Any]:
    """The batch keys that use the generator's reserved prefix ``kd/``."""
    return [k for k in keys if isinstance(k, str) and k.startswith(KD_PREFIX)]


# ------------------------------------------------------------------------------------------ layout


def manifest_layout(manifest: Mapping[str, Any], path: Path) -> int:
    """The key layout of a manifest: its ``layout``, 1 when it has none (written before ``kd/`` keys)."""
    layout = manifest.get("layout", 1)
    if layout not in (1, LAYOUT):
        raise KDDataError(
            f"{path} has key layout {layout!r}, which this distill-mixins (layout {LAYOUT}) does not know: upgrade "
            f"distill-mixins, or regenerate the data with {REGENERATE_COMMAND}."
        )
    return layout


def stored_names(layout: int) -> dict[str, str]:
    """``{KD key: the name a shard of this layout stores it under}``: layout 1 used the plain names."""
    return {key: plain_name(key) if layout == 1 else key for key in KD_KEYS}


def check_resumable(path: Path, manifest: Mapping[str, Any]) -> None:
    """Raise KDDataError when the dataset at ``path`` has another key layout than this version writes."""
    if manifest_layout(manifest, path) != LAYOUT:
        raise KDDataError(
            f"{path} holds KD data in the old key layout 1 (plain keys 'noise', 'teacher_x0', ...), which cannot "
            f"be resumed or extended without mixing layouts: regenerate it with {REGENERATE_COMMAND}, or pass "
            "--overwrite to replace it."
        )


# ------------------------------------------------------------------------------------------ files


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _commit(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it to ``path`` and fsync the directory (an atomic replace)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary file, fsync it and rename it over ``path``."""
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _commit(tmp, path)


def write_safetensors_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """Write a safetensors file atomically; metadata goes under one key as JSON. Returns file, bytes, sha256."""
    tmp = _tmp_name(path)
    text = json.dumps(metadata, sort_keys=True)
    safetensors.torch.save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    _commit(tmp, path)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_file(root: Path, record: Mapping[str, Any], fix: str) -> None:
    """Raise KDDataError naming the file when it is missing or its size or sha256 differs from ``record``."""
    path = root / record["file"]
    problem = file_problem(path, record["bytes"], record["sha256"])
    if problem is not None:
        raise KDDataError(f"{path} {problem}: {fix}")


def load_manifest(root: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    """The manifest of a KD dataset directory; KDDataError naming the file when missing or unreadable."""
    path = Path(root) / name
    if not path.is_file():
        raise KDDataError(f"{path} does not exist: {root} is not a generated dataset (run generate-kd-data first).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KDDataError(f"{path} is not valid JSON ({error}): delete the directory and generate it again.") from error
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise KDDataError(f"{path} is not a distill-mixins manifest (no 'format').")
    return manifest


# --------------------------------------------------------------------------------- teacher identity


def teacher_hash(net: nn.Module) -> tuple[str, str]:
    """``(sha256 hex, kind)`` of a teacher: ``state_dict`` hashes (name, dtype, shape, bytes) name-sorted; a
    teacher without state (an exact analytic denoiser) hashes its class name and public attributes instead
    (kind ``class_attributes``)."""
    digest = hashlib.sha256()
    state = net.state_dict()
    if state:
        for name in sorted(state):
            digest.update(name.encode())
            _feed(digest, state[name])
        return digest.hexdigest(), "state_dict"
    digest.update(f"{type(net).__module__}.{type(net).__qualname__}".encode())
    attributes = {k: v for k, v in vars(net).items() if not k.startswith("_") and k != "training"}
    _feed(digest, attributes)
    return digest.hexdigest(), "class_attributes"


def _feed(digest: Any, value: Any) -> None:
    """Feed a value's content into a hash: tensors by dtype, shape and bytes; containers recursively."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(digest, item)
    elif hasattr(value, "__dataclass_fields__"):
        digest.update(type(value).__qualname__.encode())
        _feed(digest, {name: getattr(value, name) for name in value.__dataclass_fields__})
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(repr(value).encode())
    else:
        digest.update(type(value).__qualname__.encode())


# ------------------------------------------------------------------------------------------ grid


def teacher_grid(model: Any, config: KDDataConfig) -> TeacherGrid:
    """The teacher's grid: ``generate_teacher``'s default (or ``config.grid``); with ``path_times``, re-split so
    it starts at ``path_times[0]`` and passes through every path time (:func:`split_grid`)."""
    kind = config.grid or ("karras" if model.scaling == "edm" else "shifted_rf")
    sigma_max = model.distill_config.sigma_max
    t_max = max_time(model.scaling, model.sigma_data, sigma_max)
    base = time_grid(config.steps, kind, model.sigma_data, sigma_max=sigma_max, t_max=t_max)
    if config.path_times is None:
        return TeacherGrid(times=base, path_indices=())
    if config.path_times[0] > t_max + 1e-12:
        raise KDDataError(
            f"KDDataConfig.path_times[0]={config.path_times[0]:.6f} is above this host's largest time {t_max:.6f} "
            "(EDM: atan(sigma_max / sigma_data)): use model.student_times(), which is capped there."
        )
    return split_grid(base, torch.tensor(config.path_times, dtype=torch.float64), config.steps)


def split_grid(base: Tensor, path_times: Tensor, steps: int) -> TeacherGrid:
    """A ``steps``-step grid from ``path_times[0]`` to 0 through every path time: the steps are split among the
    segments between consecutive path times (and 0) in proportion to the ``base`` grid's steps inside each (at
    least one), spaced within a segment as ``base`` is (linear in its step index). K = 1 at ``base[0]`` gives
    ``base``."""
    if steps < len(path_times):
        raise ValueError(f"split_grid: steps={steps} is below the {len(path_times)} path times; raise steps.")
    index = np.arange(len(base), dtype=np.float64)
    asc = -base.numpy()  # ascending for np.interp
    bounds = np.interp(-path_times.numpy(), asc, index).tolist() + [float(len(base) - 1)]
    lengths = np.diff(bounds)
    counts = _allocate(steps, lengths)
    points: list[float] = []
    indices: list[int] = []
    for k, n in enumerate(counts):
        indices.append(len(points))
        points += np.linspace(bounds[k], bounds[k + 1], n + 1)[:-1].tolist()
    points.append(float(len(base) - 1))
    times = torch.from_numpy(np.interp(np.asarray(points), index, base.numpy()).copy())
    times[torch.tensor(indices)] = path_times
    times[-1] = 0.0
    return TeacherGrid(times=times, path_indices=tuple(indices))


def _allocate(steps: int, lengths: np.ndarray) -> list[int]:
    """Split ``steps`` into ``len(lengths)`` counts >= 1 proportional to ``lengths`` (largest remainder)."""
    counts = np.ones(len(lengths), dtype=np.int64)
    spare = steps - len(lengths)
    share = spare * lengths / lengths.sum() if lengths.sum() > 0 else np.zeros(len(lengths))
    counts += np.floor(share).astype(np.int64)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for k in order[: steps - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


# ------------------------------------------------------------------------------------------ noise


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for sample ``index`` of a run seeded ``seed`` (numpy SeedSequence mixing)."""
    return mixed_seed(seed, index)


def sample_noise(seed: int, indices: Sequence[int], shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Unit-normal noise (n, *shape) on the CPU; sample ``i``'s noise depends only on ``(seed, i)`` and is drawn
    in float32, then rounded to ``dtype``."""
    rows = [
        torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i))) for i in indices
    ]
    return torch.stack(rows).to(dtype)


# ------------------------------------------------------------------------------- the sample stream


def _sample_count(value: Any) -> int | None:
    """Entries along the batch dimension: a tensor's first size, a list's length; None for other values."""
    if isinstance(value, Tensor):
        return int(value.shape[0]) if value.ndim >= 1 else None
    if isinstance(value, (list, tuple)):
        return len(value)
    return None


def _slice(samples: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: v[start:stop] if isinstance(v, Tensor) else list(v[start:stop]) for k, v in samples.items()}


def _concat(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    if len(pieces) == 1:
        return pieces[0]
    out: dict[str, Any] = {}
    for key, first in pieces[0].items():
        values = [p[key] for p in pieces]
        out[key] = torch.cat(values) if isinstance(first, Tensor) else [v for value in values for v in value]
    return out


class SampleStream:
    """The user's host batches as a stream of samples restricted to the stored keys: ``take(n)`` concatenates
    the next ``n`` samples across batch boundaries, ``skip(n)`` passes over them."""

    def __init__(self, batches: Iterable[Any], store_keys: tuple[str, ...] | None) -> None:
        self._iter = iter(batches)
        self.keys = store_keys
        self._current: dict[str, Any] = {}
        self._size = 0
        self._pos = 0
        self.consumed = 0

    def _next_batch(self) -> None:
        try:
            batch = next(self._iter)
        except StopIteration:
            raise KDDataError(
                f"the batches ran out after {self.consumed} samples: lower num_samples or give more data."
            ) from None
        self._current, self._size = self._select(batch)
        self._pos = 0

    def _select(self, batch: Any) -> tuple[dict[str, Any], int]:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"KD data generation needs dict batches (keys -> per-sample values), got {type(batch).__name__}."
            )
        if self.keys is None:
            self.keys = tuple(k for k, v in batch.items() if _sample_count(v) is not None)
            dropped = [k for k in batch if k not in self.keys]
            if dropped:
                logger.warning("KD data: batch keys {} have no per-sample entries and are not stored", dropped)
            clash = reserved_keys(self.keys)
            if clash:
                raise KDDataError(
                    f"batch keys {clash} collide with the KD data keys (the generator owns the prefix '{KD_PREFIX}'): "
                    "rename them, or leave them out with KDDataConfig.store_keys."
                )
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise KDDataError(f"batch has no {missing} (it has {sorted(batch)}): fix KDDataConfig.store_keys.")
        sizes = {k: _sample_count(batch[k]) for k in self.keys}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise KDDataError(
                f"stored batch keys need one entry per sample, got sizes {sizes}: set KDDataConfig.store_keys to "
                "the per-sample keys."
            )
        return {k: batch[k] for k in self.keys}, next(iter(sizes.values()), 0)

    def take(self, n: int) -> dict[str, Any]:
        """The next ``n`` samples as one dict of stored keys (tensors concatenated, lists joined)."""
        return _concat(self._advance(n, keep=True))

    def skip(self, n: int) -> None:
        """Pass over the next ``n`` samples (a finished shard's)."""
        self._advance(n, keep=False)

    def _advance(self, n: int, *, keep: bool) -> list[dict[str, Any]]:
        pieces = []
        while n > 0:
            if self._pos == self._size:
                self._next_batch()
                continue
            k = min(n, self._size - self._pos)
            if keep:
                pieces.append(_slice(self._current, self._pos, self._pos + k))
            self._pos, n, self.consumed = self._pos + k, n - k, self.consumed + k
        return pieces


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one a line (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise KDDataError(f"{path} has no prompts (one a line).")
    return prompts


def prompt_batches(
    prompts: Sequence[str], make_batch: Callable[[list[str]], dict[str, Any]], batch_size: int
) -> Iterator[dict[str, Any]]:
    """Host batches from a prompt list: ``make_batch(prompts) -> batch``; the texts are added as ``prompt``
    when the batch has no such key (so they are stored)."""
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        batch = dict(make_batch(chunk))
        batch.setdefault("prompt", chunk)
        yield batch


# -------------------------------------------------------------------------------------- generation


@dataclass
class _Run:
    """Everything a shard's generation needs."""

    model: Any
    config: KDDataConfig
    grid: TeacherGrid
    device: torch.device
    dtype: torch.dtype
    negative: NegativeFn | None


def _teacher_device(net: nn.Module) -> torch.device:
    for tensor in (*net.parameters(), *net.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to_device(samples: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in samples.items()}


@torch.no_grad()
def _teacher_chunk(run: _Run, samples: dict[str, Any], indices: list[int]) -> dict[str, Tensor]:
    """Noise, teacher x0, path (and video) of one teacher batch, left on the device."""
    model, config = run.model, run.config
    data = model.prepare_data(_to_device(samples, run.device))
    if data.x0.shape[0] != len(indices):
        raise KDDataError(
            f"get_data_and_condition returned x0 of batch size {data.x0.shape[0]} for {len(indices)} samples: the "
            "stored keys must give the host one sample per entry (check KDDataConfig.store_keys)."
        )
    noise = sample_noise(config.seed, indices, data.x0.shape[1:], run.dtype).to(run.device, data.x0.dtype)
    uncondition = run.negative(data) if run.negative is not None else data.uncondition
    denoise = model.guided_denoiser(model.net_teacher, data.condition, uncondition, config.guidance)
    x0, path = sample_ode_states(
        denoise, noise, run.grid.times, sigma_data=model.sigma_data, record=run.grid.path_indices,
        sampler=config.sampler,
    )
    out = {KD_NOISE: noise, KD_TEACHER_X0: x0}
    if config.path_times is not None:
        out[KD_PATH] = path
    if config.store_video:
        out[KD_VIDEO] = model.decode(x0)
    return out


def _generate_shard(run: _Run, samples: dict[str, Any], first: int, n: int) -> tuple[dict[str, Tensor], dict]:
    """All tensors of one shard (CPU, storage dtype) and its per-sample strings."""
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, n, run.config.batch_size):
        stop = min(n, start + run.config.batch_size)
        chunk = _teacher_chunk(run, _slice(samples, start, stop), list(range(first + start, first + stop)))
        for key, value in chunk.items():
            parts.setdefault(key, []).append(value)
    tensors = {key: torch.cat(values).to(run.dtype).cpu() for key, values in parts.items()}
    tensors[KD_SAMPLE_INDEX] = torch.arange(first, first + n, dtype=torch.int64)
    if run.config.path_times is not None:
        tensors[KD_PATH_T] = torch.tensor(run.config.path_times, dtype=torch.float64).expand(n, -1).clone()
    strings: dict[str, list[Any]] = {}
    for key, value in samples.items():
        if isinstance(value, Tensor):
            tensors[key] = value.detach().cpu().clone()
        else:
            strings[key] = _json_values(key, value)
    return tensors, strings


def _json_values(key: str, values: list[Any]) -> list[Any]:
    if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise TypeError(
            f"batch key '{key}' holds {kinds}: only tensors and lists of str/int/float/bool can be stored; leave it "
            "out of KDDataConfig.store_keys."
        )
    return list(values)


def _spec(tensors: dict[str, Tensor], strings: dict[str, list[Any]]) -> dict[str, Any]:
    """Per-sample shapes and dtypes of a shard's tensors, and its string keys."""
    spec = {k: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in tensors.items()}
    return {"tensors": dict(sorted(spec.items())), "strings": sorted(strings)}


def _identity(model: Any, run: _Run) -> dict[str, Any]:
    """Manifest fields that a resumed run must share with the run that started the directory."""
    config = run.config
    digest, kind = teacher_hash(model.net_teacher)
    negative = None if run.negative is None else getattr(run.negative, "__qualname__", type(run.negative).__name__)
    return {
        "format": FORMAT,
        "layout": LAYOUT,
        "teacher_hash": digest,
        "teacher_hash_kind": kind,
        "model_class": type(model).__qualname__,
        "scaling": model.scaling,
        "prediction_type": model.prediction_type,
        "sigma_data": float(model.sigma_data),
        "sampler": config.sampler,
        "steps": config.steps,
        "guidance": float(config.guidance),
        "guidance_form": "standard: x0_u + w (x0_c - x0_u)",
        "negative": negative,
        "seed": config.seed,
        "shard_size": config.shard_size,
        "batch_size": config.batch_size,
        "path_times": None if config.path_times is None else list(config.path_times),
        "grid": run.grid.times.tolist(),
        "path_indices": list(run.grid.path_indices),
        "dtype": config.dtype,
        "store_video": config.store_video,
        "store_keys": None if config.store_keys is None else list(config.store_keys),
    }


def _check_identity(path: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if old.get(key) != value:
            shown = (str(old.get(key))[:80], str(value)[:80])
            raise KDDataError(
                f"{path} was written with {key}={shown[0]}, this run has {key}={shown[1]}: resume with the same "
                "teacher and settings, or write to a new output directory (or overwrite this one)."
            )


def _check_spec(path: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> None:
    if "tensors" not in manifest:
        manifest.update(spec)
        return
    for field in ("tensors", "strings"):
        if manifest[field] != spec[field]:
            raise KDDataError(
                f"{path} lists {field} {manifest[field]}, but this run produces {spec[field]}: the data or the host "
                "changed; resume with the same data, or write to a new output directory."
            )


def _plan(num_samples: int, shard_size: int) -> list[int]:
    """Samples in each shard."""
    return [min(shard_size, num_samples - start) for start in range(0, num_samples, shard_size)]


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def _finished_shards(out: Path, manifest: dict[str, Any], plan: list[int]) -> dict[int, dict[str, Any]]:
    """Listed shards that match the plan and verify; others are logged and will be regenerated."""
    done = {}
    for record in manifest.get("shards", []):
        index = record["index"]
        if index >= len(plan) or record["samples"] != plan[index]:
            logger.warning("KD data: {} does not fit num_samples={}; regenerating it", record["file"], sum(plan))
            continue
        try:
            verify_file(out, record, "it will be regenerated")
        except KDDataError as error:
            logger.warning("KD data: {}", error)
            continue
        done[index] = record
    return done


def _clean_tmp(out: Path) -> None:
    """Remove temporary files a killed run left (only this module's ``.<name>.<pid>.tmp`` files)."""
    for tmp in out.glob(".*.tmp"):
        if tmp.name.startswith((".shard-", f".{MANIFEST}.")):
            tmp.unlink(missing_ok=True)


def _pause_for_tests() -> None:
    delay = os.environ.get(PAUSE_ENV)
    if delay:
        time.sleep(float(delay))


def generate_kd_data(
    model: Any, batches: Iterable[Any], out_dir: str | Path, config: KDDataConfig, negative: NegativeFn | None = None,
) -> KDDataResult:
    """Run the teacher's ``config.steps``-step ODE sampler (CFG ``w = config.guidance``) on ``batches`` and write
    shards plus ``manifest.json`` to ``out_dir``; re-running resumes (finished, verified shards are skipped).

    ``model`` is a composed distillation model (a ``DistillationCoreMixin`` subclass); ``batches`` an iterable of
    host batches (dicts; e.g. :func:`prompt_batches`) whose keys are stored as they are (any name but the reserved
    prefix ``kd/``). ``negative(data)`` gives a negative condition replacing the host's uncondition. With
    ``config.path_times`` the ODE states at those times are stored as ``kd/path`` (B, K, C, T, H, W) with
    ``path[:, 0]`` the start state. A directory in the old key layout 1 is refused (:func:`check_resumable`).
    """
    if config.store_video and not callable(getattr(model, "decode", None)):
        raise KDDataError(
            f"KDDataConfig.store_video=True needs a host decode(latent) -> video; {type(model).__name__} has none: "
            "set store_video=False or add a decode method to the host."
        )
    out = Path(out_dir)
    manifest_path = out / MANIFEST
    old = load_manifest(out) if manifest_path.exists() else None
    if old is not None:
        check_resumable(manifest_path, old)
    out.mkdir(parents=True, exist_ok=True)
    _clean_tmp(out)
    device = torch.device(config.device) if config.device else _teacher_device(model.net_teacher)
    run = _Run(model, config, teacher_grid(model, config), device, STORAGE_DTYPES[config.dtype], negative)
    identity = _identity(model, run)
    manifest: dict[str, Any] = {**identity, "shards": []}
    if old is not None:
        _check_identity(manifest_path, old, identity)
        manifest = {**old, **identity}
    plan = _plan(config.num_samples, config.shard_size)
    done = _finished_shards(out, manifest, plan)
    return _generate(run, out, manifest, plan, done, batches)


def _generate(
    run: _Run, out: Path, manifest: dict[str, Any], plan: list[int], done: dict[int, dict[str, Any]],
    batches: Iterable[Any],
) -> KDDataResult:
    """The shard loop of :func:`generate_kd_data`."""
    manifest_path = out / MANIFEST
    stream = SampleStream(batches, run.config.store_keys)
    todo = [s for s in range(len(plan)) if s not in done]
    start = time.perf_counter()
    generated = 0
    with tqdm(total=sum(plan), initial=sum(plan[s] for s in done), unit="sample", desc="teacher samples") as bar:
        for s in range(max(todo, default=-1) + 1):
            first = s * run.config.shard_size
            if s in done:
                stream.skip(plan[s])
                continue
            tensors, strings = _generate_shard(run, stream.take(plan[s]), first, plan[s])
            _check_spec(manifest_path, manifest, _spec(tensors, strings))
            record = write_safetensors_atomic(out / shard_name(s), tensors, {"strings": strings})
            done[s] = {"index": s, "samples": plan[s], **record}
            _write_manifest(manifest_path, manifest, done, plan)
            generated += 1
            bar.update(plan[s])
            logger.info("KD data: {} written ({} samples, {:.1f} MB)", record["file"], plan[s], record["bytes"] / 1e6)
            _pause_for_tests()
    if not todo:
        _write_manifest(manifest_path, manifest, done, plan)
    seconds = time.perf_counter() - start
    produced = sum(plan[s] for s in todo)
    return KDDataResult(
        out_dir=out, manifest=manifest_path, num_samples=sum(plan), num_shards=len(plan), generated_shards=generated,
        skipped_shards=len(plan) - generated, seconds=seconds, samples_per_second=produced / max(seconds, 1e-9),
    )


def _write_manifest(path: Path, manifest: dict[str, Any], done: dict[int, dict[str, Any]], plan: list[int]) -> None:
    manifest["shards"] = [done[s] for s in sorted(done)]
    manifest["count"] = sum(r["samples"] for r in manifest["shards"])
    manifest["num_samples"] = sum(plan)
    manifest["num_shards"] = len(plan)
    manifest["complete"] = len(done) == len(plan)
    write_json_atomic(path, manifest)

