"""glibc malloc settings (distill_mixins/allocator.py): page faults of a repeated large allocation, measured in a
fresh process (the suite's own process is tuned by conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import distill_mixins.allocator as allocator
import distill_mixins.cli as cli

PROBE = """
import ctypes, json, resource, sys, torch
from distill_mixins.allocator import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
tuned = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
mapped = libc.mallinfo2().hblkhd
x = torch.empty(5 * 2**20)  # 20 MiB
mapped = libc.mallinfo2().hblkhd - mapped  # bytes of it served by mmap
del x

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(16):  # a step's activations: five 16 MiB blocks live at once, then freed
        xs = [torch.empty(4 * 2**20).fill_(1.0) for _ in range(5)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(json.dumps({"tuned": tuned, "mapped": mapped, "faults": faults()}))
"""


def _probe(mode: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("DISTILL_MIXINS_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=clean, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None or not hasattr(allocator._glibc(), "mallinfo2"),
                    reason="the C library is not glibc >= 2.33 (nothing to tune, or no mallinfo2 to read)")
def test_tuned_glibc_keeps_freed_large_blocks_instead_of_faulting_them_in_again():
    default, tuned = _probe("default"), _probe("tuned")
    assert default["mapped"] >= 20 * 2**20, default  # glibc's own settings: a fresh 20 MiB block is mmapped
    assert tuned["tuned"] is True and tuned["mapped"] == 0, tuned  # tuned: it comes from the heap
    assert tuned["faults"] < 5 * 16 * 2**20 // 4096 // 4, tuned  # and freed blocks are reused without new faults


def _tunes(**env: str) -> bool:
    """Whether a fresh process with ``env`` (no other malloc settings) tunes the allocator."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("DISTILL_MIXINS_MALLOC", "GLIBC_TUNABLES")}
    code = "from distill_mixins.allocator import tune_cpu_allocator; print(tune_cpu_allocator())"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.skipif(allocator._glibc() is None, reason="the C library is not glibc (nothing to tune)")
def test_the_environment_opts_out():
    assert _tunes() is True
    assert _tunes(DISTILL_MIXINS_MALLOC="default") is False
    assert _tunes(MALLOC_TRIM_THRESHOLD_="131072") is False  # a user's own glibc setting wins
    assert _tunes(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072") is False
    assert _tunes(MALLOC_ARENA_MAX="2") is True  # another glibc setting: not ours to respect


def test_the_command_tunes_at_start(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    calls.clear()
    cli.main(["demo-analytic", "--pairs", "0"])  # a usage error after the start: still tuned once
    assert calls == [1]
    assert "must be >= 1" in capsys.readouterr().err
