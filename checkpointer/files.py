"""Durable file operations: fsync, atomic replace, checksums, and safetensors without shared storage."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated, or fails its checksum; the message names the file."""


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (POSIX fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file inside it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_problem(path: Path, size: int, sha256: str) -> str | None:
    """Why ``path`` is not the recorded file (missing, truncated or altered, corrupt), or None when it matches."""
    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    if actual != size:
        return f"is truncated or altered: {actual} bytes, the manifest says {size}"
    if sha256_file(path) != sha256:
        return "fails its checksum (its sha256 differs from the manifest's): the file is corrupt"
    return None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` writes a temporary file beside it (and fsyncs it), then a rename
    and an fsync of the directory. A crash leaves the previous ``path`` whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`write_atomic`)."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        fsync_file(tmp)

    write_atomic(path, write)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def plain_tensors(state: dict[str, Tensor], owner: str) -> dict[str, Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{owner} state entry '{key}' is a {type(value).__name__}, not a tensor; safetensors stores "
                "tensors only. Make it a buffer, or keep it out of the network's state_dict."
            )
        tensor = value.detach()
        storage = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[key] = tensor.to("cpu").contiguous()
    return out


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` then fsync."""
    save_file(tensors, str(path), metadata=metadata)
    fsync_file(path)


def save_torch(obj: object, path: Path) -> None:
    """``torch.save`` of plain containers of tensors and numbers (loadable with ``weights_only=True``), then fsync."""
    torch.save(obj, path)
    fsync_file(path)
