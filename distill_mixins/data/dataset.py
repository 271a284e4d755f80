"""Map-style datasets over generated KD data: :class:`KDShardDataset` (shards + manifest) and the per-sample
ODE-pair layout of the causal pipeline (:func:`write_ode_pairs`, :class:`ODEPairDataset`); docs/kd_data.md."""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from distill_mixins.data.kd_data import (
    FORMAT,
    MANIFEST,
    METADATA_KEY,
    REGENERATE_COMMAND,
    KDDataError,
    load_manifest,
    manifest_layout,
    reserved_keys,
    stored_names,
    verify_file,
    write_json_atomic,
    write_safetensors_atomic,
)
from distill_mixins.methods.kd import KD_NOISE, KD_PATH, KD_PATH_T, KD_SAMPLE_INDEX, KD_TEACHER_X0

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
ODE_PAIRS_FORMAT = "distill-mixins-ode-pairs/1"
ODE_PAIRS_MANIFEST = "ode_pairs.json"
REGENERATE = "re-run generate-kd-data with the same settings (it regenerates shards that fail verification)"


@dataclass
class _OpenShard:
    """An open shard: the safetensors handle (memory-mapped) and its per-sample strings."""

    handle: Any
    strings: dict[str, list[Any]]


def _metadata(handle: Any, path: Path) -> dict[str, Any]:
    try:
        return json.loads((handle.metadata() or {})[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as error:
        raise KDDataError(f"{path} has no readable '{METADATA_KEY}' metadata ({error}): {REGENERATE}.") from error


def _tensor_names(manifest: dict[str, Any], path: Path) -> dict[str, str]:
    """``{key as read: key as stored}`` of a manifest's tensors: layout 1 stored the KD keys by their plain names
    (``noise`` is read as ``kd/noise``); host keys keep their names in every layout."""
    layout = manifest_layout(manifest, path)
    stored = set(manifest["tensors"])
    clash = reserved_keys(sorted({*stored, *manifest["strings"]}))
    if layout == 1 and clash:
        raise KDDataError(
            f"{path} is in the old key layout 1 and its batch keys {clash} would read as KD keys: regenerate it with "
            f"{REGENERATE_COMMAND}."
        )
    public = {name: key for key, name in stored_names(layout).items() if name in stored}
    return {public.get(name, name): name for name in sorted(stored)}


class KDShardDataset(Dataset):
    """Samples of a KD dataset directory: ``dataset[i]`` is a dict of per-sample tensors (``kd/noise``,
    ``kd/teacher_x0`` (C, T, H, W), ``kd/path`` (K, C, T, H, W), ``kd/path_t`` (K,), ``kd/sample_index``) and the
    host's stored tensors and strings (prompts) under the host's own keys, so a collated batch works with the host's
    ``get_data_and_condition`` and with KD. A directory in the old key layout 1 (plain ``noise``, ``teacher_x0``,
    ... keys, no manifest ``layout``) reads the same: its KD keys come back under the ``kd/`` names.

    Shards open lazily (memory-mapped, the ``cache_shards`` most recent kept open); each shard is checked on
    first use in a process: size and sha256 against the manifest (``verify``), then every tensor's shape and
    dtype. Works with ``DistributedSampler`` and shuffling DataLoaders (handles are not pickled to workers).
    """

    def __init__(self, root: str | Path, *, verify: bool = True, cache_shards: int = 4) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if self.manifest["format"] != FORMAT:
            raise KDDataError(f"{self.root / MANIFEST} has format {self.manifest['format']!r}, expected {FORMAT!r}.")
        self.shards = sorted(self.manifest.get("shards", []), key=lambda r: r["index"])
        if not self.shards:
            raise KDDataError(f"{self.root / MANIFEST} lists no finished shard: run generate-kd-data to completion.")
        if not self.manifest.get("complete", False):
            logger.warning("KD data {}: generation is not complete ({} of {} samples); reading the finished shards",
                           self.root, self.manifest.get("count"), self.manifest.get("num_samples"))
        self.verify = verify
        self.cache_shards = max(1, cache_shards)
        self._stored = _tensor_names(self.manifest, self.root / MANIFEST)
        self.tensor_spec: dict[str, dict[str, Any]] = {k: self.manifest["tensors"][v] for k, v in self._stored.items()}
        self.string_keys: list[str] = self.manifest["strings"]
        self._ends = []
        total = 0
        for record in self.shards:
            total += record["samples"]
            self._ends.append(total)
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"KDShardDataset index {index} is out of range for {len(self)} samples.")
        s = bisect.bisect_right(self._ends, index)
        j = index - (self._ends[s - 1] if s else 0)
        shard = self._shard(s)
        item: dict[str, Any] = {key: shard.handle.get_slice(name)[j : j + 1][0] for key, name in self._stored.items()}
        item.update({key: shard.strings[key][j] for key in self.string_keys})
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file handles stay in their process
        return state

    def _shard(self, s: int) -> _OpenShard:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        record = self.shards[s]
        if self.verify and s not in self._verified:
            verify_file(self.root, record, REGENERATE + ".")
            self._verified.add(s)
        shard = self._load(record)
        self._open[s] = shard
        while len(self._open) > self.cache_shards:
            self._open.popitem(last=False)
        return shard

    def _load(self, record: dict[str, Any]) -> _OpenShard:
        path = self.root / record["file"]
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise KDDataError(f"{path} is not a readable safetensors file ({error}): {REGENERATE}.") from error
        self._check_tensors(handle, path, record["samples"])
        strings = _metadata(handle, path).get("strings", {})
        bad = [k for k in self.string_keys if len(strings.get(k, [])) != record["samples"]]
        if bad:
            raise KDDataError(f"{path} lacks {record['samples']} entries of the strings {bad}: {REGENERATE}.")
        return _OpenShard(handle=handle, strings=strings)

    def _check_tensors(self, handle: Any, path: Path, samples: int) -> None:
        """Each tensor's shape (samples, *manifest shape) and dtype, by the safetensors header."""
        keys, listed = set(handle.keys()), set(self._stored.values())
        if keys != listed:
            raise KDDataError(
                f"{path} holds tensors {sorted(keys)}, the manifest lists {sorted(listed)}: {REGENERATE}."
            )
        for key, spec in self.tensor_spec.items():
            view = handle.get_slice(self._stored[key])
            shape, dtype = list(view.get_shape()), SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
            if shape != [samples, *spec["shape"]] or dtype != spec["dtype"]:
                raise KDDataError(
                    f"{path}: tensor '{self._stored[key]}' is {dtype} {shape}, the manifest says {spec['dtype']} "
                    f"{[samples, *spec['shape']]}: the shard and the manifest disagree; {REGENERATE}."
                )


# ----------------------------------------------------------------------------------------- ODE pairs


def write_ode_pairs(
    kd_root: str | Path, out_dir: str | Path, *, prompt_key: str | None = "prompt", reference_key: str | None = None,
    verify: bool = True,
) -> Path:
    """Write the causal pipeline's ODE-pair layout from a KD dataset generated with ``path_times``: one
    ``pair-00000000.safetensors`` per sample (``clean_latent`` (C, T, H, W) = ``kd/teacher_x0``, ``path``
    (K, C, T, H, W) = ``kd/path``, ``path_t`` (K,), ``noise``, optional ``reference_video``; prompt text in the
    metadata) and ``ode_pairs.json``.
    Returns the manifest's path."""
    source = KDShardDataset(kd_root, verify=verify)
    _check_pair_source(source, prompt_key, reference_key)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in tqdm(range(len(source)), desc="ODE pairs", unit="sample"):
        item = source[i]
        tensors = _pair_tensors(item, reference_key)
        index = int(item[KD_SAMPLE_INDEX])
        meta = {"prompt": None if prompt_key is None else item[prompt_key], "sample_index": index}
        files.append(write_safetensors_atomic(out / f"pair-{index:08d}.safetensors", tensors, meta))
    manifest = {
        "format": ODE_PAIRS_FORMAT, "source": str(Path(kd_root).resolve()),
        "teacher_hash": source.manifest["teacher_hash"], "path_times": source.manifest["path_times"],
        "prompt_key": prompt_key, "reference_key": reference_key, "count": len(files),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sorted(
            _pair_tensors(source[0], reference_key).items())},
        "files": files,
    }
    path = out / ODE_PAIRS_MANIFEST
    write_json_atomic(path, manifest)
    return path


def _pair_tensors(item: dict[str, Any], reference_key: str | None) -> dict[str, Tensor]:
    """The ODE-pair file's tensors of one KD sample (the pair layout keeps its own plain names)."""
    tensors = {"clean_latent": item[KD_TEACHER_X0], "path": item[KD_PATH], "path_t": item[KD_PATH_T],
               "noise": item[KD_NOISE]}
    if reference_key is not None:
        tensors["reference_video"] = item[reference_key]
    return tensors


def _check_pair_source(source: KDShardDataset, prompt_key: str | None, reference_key: str | None) -> None:
    if KD_PATH not in source.tensor_spec:
        raise KDDataError(
            f"{source.root} has no ODE '{KD_PATH}': generate it with KDDataConfig.path_times (--path-times)."
        )
    if prompt_key is not None and prompt_key not in source.string_keys:
        raise KDDataError(
            f"{source.root} has no string key '{prompt_key}' (it has {source.string_keys}): pass the key of the "
            "prompt texts, or prompt_key=None for data without prompts."
        )
    if reference_key is not None and reference_key not in source.tensor_spec:
        raise KDDataError(
            f"{source.root} has no tensor '{reference_key}' (it has {sorted(source.tensor_spec)}): pass a stored "
            "key (e.g. 'kd/video' with store_video, or a stored control video) or reference_key=None."
        )


class ODEPairDataset(Dataset):
    """Samples of an ODE-pair directory: ``clean_latent``, ``path``, ``path_t``, ``noise`` (and
    ``reference_video``) tensors plus ``prompt``; each file is checked against ``ode_pairs.json`` when read."""

    def __init__(self, root: str | Path, *, verify: bool = True) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root, ODE_PAIRS_MANIFEST)
        if self.manifest["format"] != ODE_PAIRS_FORMAT:
            raise KDDataError(f"{self.root / ODE_PAIRS_MANIFEST} has format {self.manifest['format']!r}.")
        self.files = self.manifest["files"]
        self.verify = verify

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.files[index]
        path = self.root / record["file"]
        fix = f"run write_ode_pairs on {self.manifest['source']} again."
        try:
            data = path.read_bytes()
        except OSError as error:
            raise KDDataError(f"{path} cannot be read ({error}): {fix}") from error
        if self.verify and (len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]):
            raise KDDataError(f"{path} is truncated or corrupted (size or sha256 differs from the manifest): {fix}")
        try:
            tensors: dict[str, Tensor] = safetensors.torch.load(data)
            size = int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, then the JSON header
            meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][METADATA_KEY])
        except (SafetensorError, KeyError, ValueError) as error:
            raise KDDataError(f"{path} is not a readable ODE-pair file ({error}): {fix}") from error
        return {**tensors, "prompt": meta["prompt"]}


def generate_ode_pairs(
    model: Any, batches: Any, out_dir: str | Path, config: Any = None, *, pairs_dir: str | Path | None = None,
    prompt_key: str | None = "prompt", reference_key: str | None = None,
) -> Path:
    """Stage 1 of the causal pipeline (MATH.md section 7): the teacher's CFG ODE solve with its states stored exactly
    at the student's K times (``config.path_times``, default ``model.student_times()``), as KD data in ``out_dir``
    (resumable, :func:`~distill_mixins.data.kd_data.generate_kd_data`), then the per-sample ODE-pair layout in
    ``pairs_dir`` (default ``out_dir/pairs``, :func:`write_ode_pairs`). ``config``: a
    :class:`~distill_mixins.data.kd_data.KDDataConfig` (default: its defaults). Returns the pairs' manifest path."""
    import dataclasses

    from distill_mixins.data.kd_data import KDDataConfig, generate_kd_data

    config = KDDataConfig() if config is None else config
    if config.path_times is None:
        config = dataclasses.replace(config, path_times=tuple(model.student_times().tolist()))
    generate_kd_data(model, batches, out_dir, config)
    pairs = Path(out_dir) / "pairs" if pairs_dir is None else Path(pairs_dir)
    if pairs_up_to_date(out_dir, pairs, prompt_key, reference_key):
        logger.info("ODE pairs in {} are up to date with {}; not rewritten", pairs, out_dir)
        return pairs / ODE_PAIRS_MANIFEST
    return write_ode_pairs(out_dir, pairs, prompt_key=prompt_key, reference_key=reference_key)


def pairs_up_to_date(kd_root: str | Path, pairs_dir: Path, prompt_key: str | None, reference_key: str | None) -> bool:
    """Whether ``pairs_dir`` already holds the pair layout of the KD dataset ``kd_root`` as it is now (the same
    source, teacher, times, keys and count, every listed file present with its size)."""
    path = pairs_dir / ODE_PAIRS_MANIFEST
    if not path.is_file():
        return False
    pairs, source = json.loads(path.read_text(encoding="utf-8")), load_manifest(kd_root)
    same = (pairs.get("source") == str(Path(kd_root).resolve()) and pairs.get("teacher_hash") == source["teacher_hash"]
            and pairs.get("path_times") == source["path_times"] and pairs.get("prompt_key") == prompt_key
            and pairs.get("reference_key") == reference_key
            and pairs.get("count") == sum(shard["samples"] for shard in source["shards"]))
    return same and all((pairs_dir / f["file"]).is_file() and (pairs_dir / f["file"]).stat().st_size == f["bytes"]
                        for f in pairs["files"])
