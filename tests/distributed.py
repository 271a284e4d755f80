"""Launch a test function on N CPU processes with the gloo backend and collect what each rank returns.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes (one thread each), initialises the
default process group through a file store (no ports), calls ``fn(rank, world_size, *args)`` in each and
returns the ranks' results in rank order (``torch.save``-able objects). A failing rank fails the call with
its traceback. ``fn`` must be importable (a module-level function of a test module).
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store: str, out: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        result = ("error", traceback.format_exc())
    try:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # Tear down together: a rank that destroyed its gloo context while a peer still used the connection once
        # aborted ("terminate called without an active exception", SIGABRT, once in a CI run; not reproduced alone).
        dist.monitored_barrier(timeout=timedelta(seconds=60))
    except RuntimeError:  # a peer that failed or hangs: its own result says why (or the parent's timeout does)
        pass
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each run in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        context = mp.start_processes(
            _worker, args=(world_size, store, tmp, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:  # a hung collective: stop every rank and say so
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} processes ran past {timeout:.0f} s (a deadlock?).")
        results = []
        for rank in range(world_size):
            file = Path(tmp) / f"rank{rank}.pt"
            if not file.exists():
                raise RuntimeError(f"rank {rank} of {world_size} wrote no result (it crashed before returning).")
            status, value = torch.load(file, weights_only=False)
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
        return results
