"""DistillCheckpointer: atomic, checksummed, one-directory-per-iteration checkpoints of a distillation model.

Layout (``directory`` is usually ``run_dir/checkpoints``)::

    iter_000100/student.safetensors        net            (always)
                ema.safetensors            net_ema        (with DistillConfig.ema)
                critic.safetensors         net_fake_score (methods with a critic)
                discriminator.safetensors  net_discriminator (GAN heads)
                <name>.safetensors         any other trainable network, by attribute name
                extra.safetensors          the model's own buffers (e.g. ema_num_updates)
                optim.pt                   optimizer, scheduler and grad-scaler states
                rng.pt                     torch / numpy / python RNG states
                trainer_state.json  config.json  manifest.json (sha256 and size of every file)
    latest                                 "iter_000100": the commit point, written last

A network whose parameters are DTensors (FSDP2) is saved sharded instead (see ``sharded.py``)::

    iter_000100/student.dcp/.metadata  __0_0.distcp  __1_0.distcp ...   net and its optimizer, one file per rank
                ema.dcp/ ...  critic.dcp/ ...                             (optim.pt keeps the schedulers, scaler)
                rng/rank_0.pt  rng/rank_1.pt ...                          each rank's RNG states

Then ``save``, ``load`` and ``resume`` are collective (every rank calls them); rank 0 checks the manifest and writes
the shared files and the pointer. A sharded checkpoint loads at any world size, also unsharded in one process.

The teacher is never written. Loading uses safetensors and ``torch.load(weights_only=True)`` only (DCP folders:
see ``sharded.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from distill_mixins.checkpointer.files import (
    CheckpointError,
    file_problem,
    fsync_dir,
    fsync_file,
    plain_tensors,
    save_safetensors,
    save_torch,
    sha256_file,
    write_text_atomic,
)
from distill_mixins.checkpointer.rng import capture_rng_state, restore_rng_state
from distill_mixins.checkpointer.sharded import (
    Ranks,
    is_sharded,
    load_network,
    process_rank,
    rng_file,
    save_network,
    set_full_optimizer_state,
    set_full_state,
)
from loguru import logger
from safetensors.torch import load_file
from torch import Tensor, nn

from distill_mixins.core import local

FORMAT = "distill-mixins-checkpoint/1"
NETWORK_FILES: dict[str, str] = {
    "net": "student", "net_ema": "ema", "net_fake_score": "critic", "net_discriminator": "discriminator",
}
"""Network attribute -> file stem; any other trainable network is saved under its attribute name."""
EXTRA = "extra"
LATEST = "latest"
MANIFEST = "manifest.json"
PAUSE_ENV = "DISTILL_MIXINS_TEST_SAVE_PAUSE"
"""Test-only hook: seconds to sleep in the middle of a save (after the weights, before the manifest and the
rename), having written a ``PAUSED`` marker into the temporary directory. Used to kill a process mid-save."""
_NAME = re.compile(r"^iter_(\d+)$")


def checkpoint_name(iteration: int) -> str:
    """Directory name of the checkpoint taken after ``iteration`` completed iterations, e.g. ``iter_000100``."""
    return f"iter_{iteration:06d}"


@dataclass
class LoadedCheckpoint:
    """What a load restored: its directory, the completed iterations, the trainer state and the resolved config."""

    path: Path
    iteration: int
    trainer_state: dict[str, Any]
    config: dict[str, Any]


def network_files(model: nn.Module) -> dict[str, str]:
    """Network attribute -> file stem of every network a checkpoint holds: the trainable ones and the EMA."""
    names = list(model.trainable_networks())  # type: ignore[operator]
    if isinstance(getattr(model, "net_ema", None), nn.Module):
        names.append("net_ema")
    stems = {name: NETWORK_FILES.get(name, name) for name in names}
    if len(set(stems.values())) != len(stems) or EXTRA in stems.values():
        raise CheckpointError(f"network file names collide: {stems}; rename the network attribute.")
    return stems


def checkpoint_ranks(model: nn.Module) -> Ranks:
    """The ranks that save or load ``model`` together: all of them when a checkpointed network is sharded."""
    return Ranks(getattr(model, attr) for attr in network_files(model))


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``; a missing or unreadable one raises, naming the file."""
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete (a save was interrupted).")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}): the checkpoint is damaged.") from error
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} has format {manifest.get('format')!r}; this library reads {FORMAT!r}.")
    return manifest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest (size, then SHA-256); returns the manifest.

    Raises :class:`CheckpointError` naming the first missing, truncated or mismatched file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        problem = file_problem(path / name, entry["bytes"], entry["sha256"])
        if problem is not None:
            raise CheckpointError(f"{path / name} {problem} (listed in {MANIFEST}).")
    return manifest


def _teacher_storages(model: nn.Module) -> set[int]:
    teacher = getattr(model, "net_teacher", None)
    if not isinstance(teacher, nn.Module):
        return set()
    tensors = [local(t) for t in (*teacher.parameters(), *teacher.buffers())]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _check_not_teacher(state: dict[str, Tensor], teacher: set[int], owner: str) -> None:
    for key, value in state.items():
        if isinstance(value, Tensor) and local(value).numel() and local(value).untyped_storage().data_ptr() in teacher:
            raise CheckpointError(f"{owner} entry '{key}' shares storage with the teacher; the teacher is never saved.")


def _optim_state(
    model: nn.Module, grad_scaler: torch.amp.GradScaler | None, networks: dict[str, str],
) -> dict[str, Any]:
    """Optimizers of unsharded networks (a sharded one's is in its DCP folder), schedulers, the grad scaler."""
    optimizers = model.optimizers().items()  # type: ignore[operator]
    return {
        "optimizers": {name: opt.state_dict() for name, opt in optimizers if not networks[name].endswith(".dcp")},
        "schedulers": {name: s.state_dict() for name, s in model.lr_schedulers().items()},  # type: ignore[operator]
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None and grad_scaler.is_enabled() else None,
    }


def _pause_for_tests(tmp: Path) -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        (tmp / "PAUSED").write_text(str(os.getpid()))
        time.sleep(float(seconds))


class DistillCheckpointer:
    """Save, verify, auto-resume and selectively load distillation checkpoints under ``directory``.

    ``keep_last``: how many complete checkpoints to keep (``None`` keeps all). One writer (rank 0) per directory;
    with sharded networks every rank calls ``save``/``load``/``resume`` (see the module docstring).
    """

    def __init__(self, directory: str | Path, *, keep_last: int | None = 3) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"DistillCheckpointer keep_last={keep_last} must be >= 1, or None to keep all.")
        self.directory = Path(directory)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ listing

    def list_checkpoints(self) -> list[Path]:
        """Complete (renamed) checkpoint directories, oldest first; temporary directories are never listed."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint the ``latest`` pointer names (it may since have been damaged), or None."""
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        return self.directory / name if _NAME.match(name) else None

    def find_resumable(self) -> Path | None:
        """The newest verified checkpoint: the ``latest`` pointer's, else older ones, each failure logged as a warning.

        None when there is no checkpoint at all; a :class:`CheckpointError` when checkpoints exist but none verifies.
        """
        pointed = self.latest()
        others = list(reversed(self.list_checkpoints()))
        if pointed is not None:
            limit = _iteration_of(pointed)
            others = [p for p in others if _iteration_of(p) < limit]
        candidates = ([pointed] if pointed is not None else []) + others
        errors = []
        for path in candidates:
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as error:
                errors.append(str(error))
                logger.warning("checkpoint {} is unusable: {} Falling back to the previous one.", path.name, error)
        if errors:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + " | ".join(errors))
        return None

    # ------------------------------------------------------------------- saving

    def save(
        self, model: nn.Module, iteration: int, *, trainer_state: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None, grad_scaler: torch.amp.GradScaler | None = None,
    ) -> Path:
        """Write ``iter_<iteration>`` atomically (temporary directory, fsync, rename), then the ``latest``
        pointer, then prune to ``keep_last``. Returns the checkpoint directory. Collective with sharded networks."""
        ranks = checkpoint_ranks(model)
        name = checkpoint_name(iteration)
        tmp = ranks.from_rank0(lambda: self._new_temporary(name))
        networks = self._write_networks(model, tmp, iteration, ranks)
        if ranks.writer:
            _pause_for_tests(tmp)
        self._write_state(model, tmp, grad_scaler, ranks, networks)
        ranks.barrier()  # every rank's files are written before rank 0 checksums them

        def commit() -> Path:
            state = {"distill": model.distill_config.to_dict()} if config is None else config  # type: ignore[operator]
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state or {}, indent=2))
            (tmp / "config.json").write_text(json.dumps(state, indent=2))
            self._write_manifest(tmp, iteration, networks, ranks)
            final = self.directory / name
            self._replace_dir(tmp, final)
            write_text_atomic(self.directory / LATEST, name + "\n")
            self._prune(iteration)
            logger.info("saved checkpoint {}", final)
            return final

        return ranks.from_rank0(commit)

    def _new_temporary(self, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tmp = self.directory / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def _write_networks(self, model: nn.Module, tmp: Path, iteration: int, ranks: Ranks) -> dict[str, str]:
        teacher = _teacher_storages(model)
        networks = {}
        for attr, stem in network_files(model).items():
            net = getattr(model, attr)
            state = net.state_dict()
            _check_not_teacher(state, teacher, attr)
            if is_sharded(net):  # every rank writes its shards
                save_network(net, model.optimizers().get(attr), tmp / f"{stem}.dcp")  # type: ignore[operator]
                networks[attr] = f"{stem}.dcp"
                continue
            if ranks.writer:
                meta = {"format": FORMAT, "network": attr, "iteration": str(iteration)}
                save_safetensors(plain_tensors(state, attr), tmp / f"{stem}.safetensors", meta)
            networks[attr] = f"{stem}.safetensors"
        extra = {k: v for k, v in model.state_dict().items() if "." not in k}
        if extra and ranks.writer:
            _check_not_teacher(extra, teacher, "model")
            save_safetensors(plain_tensors(extra, "model"), tmp / f"{EXTRA}.safetensors", {"format": FORMAT})
        return networks

    def _write_state(
        self, model: nn.Module, tmp: Path, grad_scaler: torch.amp.GradScaler | None, ranks: Ranks,
        networks: dict[str, str],
    ) -> None:
        """optim.pt from rank 0; the RNG states as rng.pt, or one file per rank when sharded."""
        if ranks.writer:
            save_torch(_optim_state(model, grad_scaler, networks), tmp / "optim.pt")
        rng = tmp / (rng_file(ranks.rank) if ranks.active else "rng.pt")
        rng.parent.mkdir(exist_ok=True)
        save_torch(capture_rng_state(), rng)

    def _write_manifest(self, tmp: Path, iteration: int, networks: dict[str, str], ranks: Ranks) -> None:
        paths = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != "PAUSED")
        files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths}
        manifest = {"format": FORMAT, "iteration": iteration, "networks": networks, "files": files,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if ranks.active:
            manifest["world_size"] = ranks.world_size
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            if p.suffix == ".json":
                fsync_file(p)
        for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(directory)

    def _replace_dir(self, tmp: Path, final: Path) -> None:
        trash = None
        if final.exists():  # the same iteration saved again (e.g. after resuming from an older checkpoint)
            trash = self.directory / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
        os.replace(tmp, final)
        fsync_dir(self.directory)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_temporaries(self) -> None:
        for path in self.directory.iterdir():
            if path.is_dir() and path.name.startswith((".tmp-", ".trash-")):
                pid = path.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                    continue
                logger.warning("removing {}, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self, iteration: int) -> None:
        """Keep the last ``keep_last`` checkpoints up to ``iteration``; newer ones (from a history the run
        resumed before) are left alone and replaced when the run saves those iterations again."""
        if self.keep_last is None:
            return
        older = [p for p in self.list_checkpoints() if _iteration_of(p) <= iteration]
        for path in older[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def resume(self, model: nn.Module, *, grad_scaler: torch.amp.GradScaler | None = None) -> LoadedCheckpoint | None:
        """Auto-resume: load everything from :meth:`find_resumable`, or return None when there is no checkpoint."""
        path = checkpoint_ranks(model).from_rank0(self.find_resumable)
        return None if path is None else self.load(model, path, grad_scaler=grad_scaler)

    def load(
        self, model: nn.Module, path: str | Path, *, grad_scaler: torch.amp.GradScaler | None = None,
        restore_rng: bool = True,
    ) -> LoadedCheckpoint:
        """Full resume from checkpoint directory ``path``: every network, the model's buffers, optimizers,
        schedulers, the grad scaler and the RNG states. Verifies checksums first."""
        return load_checkpoint(model, path, grad_scaler=grad_scaler, restore_rng=restore_rng)


def load_checkpoint(
    model: nn.Module, path: str | Path, *, grad_scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True,
) -> LoadedCheckpoint:
    """Full resume (see :meth:`DistillCheckpointer.load`)."""
    path = Path(path)
    manifest = checkpoint_ranks(model).from_rank0(lambda: verify_checkpoint(path))
    wanted = network_files(model)
    missing = [attr for attr in wanted if attr not in manifest["networks"]]
    if missing:
        raise CheckpointError(
            f"{path} has no weights for {missing} (it holds {sorted(manifest['networks'])}): it comes from another "
            "method or config. To start from its student only, use load_networks(model, path, ('student',))."
        )
    optimizers = model.optimizers()  # type: ignore[operator]
    for attr in wanted:
        _load_network(getattr(model, attr), path / manifest["networks"][attr], optimizers.get(attr))
    if f"{EXTRA}.safetensors" in manifest["files"]:
        _load_extra(model, path / f"{EXTRA}.safetensors")
    in_dcp = {attr for attr, file in manifest["networks"].items() if file.endswith(".dcp")}
    _load_optim(model, path / "optim.pt", grad_scaler, in_dcp)
    if restore_rng:
        _restore_rng(path, manifest)
    logger.info("resumed from {} (iteration {})", path, manifest["iteration"])
    return LoadedCheckpoint(
        path=path, iteration=int(manifest["iteration"]),
        trainer_state=json.loads((path / "trainer_state.json").read_text()),
        config=json.loads((path / "config.json").read_text()),
    )


def load_networks(model: nn.Module, path: str | Path, networks: Sequence[str] = ("student",)) -> LoadedCheckpoint:
    """Selective load of weights only (no optimizer, scheduler or RNG state), e.g. a KD run's student into a
    DMD2 model. Names are file stems (``student``, ``ema``, ``critic``, ``discriminator``) or attributes
    (``net``, ...). Loading the student without the EMA resets the EMA to the student."""
    path = Path(path)
    manifest = checkpoint_ranks(model).from_rank0(lambda: verify_checkpoint(path))
    by_stem = {Path(file).stem: attr for attr, file in manifest["networks"].items()}
    attrs = []
    for name in networks:
        attr = by_stem.get(name, name)
        if attr not in manifest["networks"]:
            raise CheckpointError(f"{path} has no '{name}' weights; it holds {sorted(by_stem)}.")
        attrs.append(attr)
    for attr in attrs:
        file = path / manifest["networks"][attr]
        if attr == "net" and "net_ema" not in attrs and hasattr(model, "load_student_state_dict"):
            if file.suffix == ".dcp" or is_sharded(model.net):  # into the student, then reset the EMA to it
                _load_network(model.net, file)
                model.load_student_state_dict(model.net.state_dict())
            else:
                _load_into(file, model.load_student_state_dict)
        else:
            _load_network(getattr(model, attr), file)
    return LoadedCheckpoint(path=path, iteration=int(manifest["iteration"]), trainer_state={}, config={})


def _load_into(file: Path, loader: Any) -> None:
    try:
        loader(load_file(str(file)))
    except RuntimeError as error:
        raise CheckpointError(f"{file} does not fit the network: {error}") from error


def _load_network(net: nn.Module, file: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load one network from its safetensors file or DCP folder (a DCP folder also holds its optimizer)."""
    if file.suffix == ".dcp":
        load_network(net, optimizer, file)
    elif is_sharded(net):
        set_full_state(net, load_file(str(file)))
    else:
        _load_into(file, net.load_state_dict)


@torch.no_grad()
def _load_extra(model: nn.Module, file: Path) -> None:
    for key, value in load_file(str(file)).items():
        target = getattr(model, key, None)
        if not isinstance(target, Tensor) or target.shape != value.shape:
            raise CheckpointError(f"{file}: '{key}' does not match the model's {key} ({type(target).__name__}).")
        target.copy_(value)


def _load_optim(
    model: nn.Module, file: Path, grad_scaler: torch.amp.GradScaler | None, in_dcp: Collection[str] = (),
) -> None:
    """Optimizers (except those of ``in_dcp`` networks, loaded with them), schedulers and the grad scaler."""
    state = torch.load(file, weights_only=True, map_location="cpu")
    for kind, current in (("optimizers", model.optimizers()), ("schedulers", model.lr_schedulers())):  # type: ignore[operator]
        for name, obj in current.items():
            if kind == "optimizers" and name in in_dcp:
                continue
            if name not in state[kind]:
                raise CheckpointError(f"{file} has no {kind[:-1]} state for '{name}' (it has {sorted(state[kind])}).")
            net = getattr(model, name)
            if kind == "optimizers" and is_sharded(net):  # an unsharded run's optimizer into a sharded network
                set_full_optimizer_state(net, obj, state[kind][name])
            else:
                obj.load_state_dict(state[kind][name])
    if grad_scaler is not None and grad_scaler.is_enabled():
        if state["grad_scaler"] is None:
            logger.warning("{} has no grad-scaler state (saved without fp16); the scaler starts fresh.", file)
        else:
            grad_scaler.load_state_dict(state["grad_scaler"])


def _restore_rng(path: Path, manifest: dict[str, Any]) -> None:
    """rng.pt, or this rank's file of a sharded checkpoint; a rank the saving run did not have keeps its state."""
    name = "rng.pt" if "rng.pt" in manifest["files"] else rng_file(process_rank())
    if name not in manifest["files"]:
        logger.warning("{} was saved by {} ranks; rank {} keeps its RNG state.", path, manifest.get("world_size"),
                       process_rank())
        return
    restore_rng_state(torch.load(path / name, weights_only=True, map_location="cpu"))


def _iteration_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from ``path``: the directory itself (it has a manifest), or the newest usable
    checkpoint of a checkpoints directory or of a run directory (``<run_dir>/checkpoints``)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or _NAME.match(path.name):
        return path
    for directory in (path, path / "checkpoints"):
        if (directory / LATEST).is_file() or DistillCheckpointer(directory).list_checkpoints():
            found = DistillCheckpointer(directory).find_resumable()
            if found is not None:
                return found
    raise CheckpointError(
        f"{path} is not a checkpoint: give a checkpoint directory (iter_NNNNNN with {MANIFEST}), a checkpoints "
        "directory, or a run directory holding checkpoints/."
    )
