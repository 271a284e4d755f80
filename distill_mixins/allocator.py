"""glibc malloc settings for training on a CPU: large tensor blocks stay in the process between steps.

glibc serves blocks above its mmap threshold (128 KiB at start, raised as mmapped blocks are freed, up to 32 MiB)
with ``mmap`` and returns the heap's free top above 128 KiB to the system. A CPU training step allocates and frees
the same large activations every call, so each step faults their pages in again: on the 2-core AMD EPYC dev machine
(float32, one thread) the sCM step with the JVP of ``benchmarks/scm_step.py`` spent ~15% of its time in the kernel,
and a Self-Forcing stage of ``demo-causal`` ~12% (system time 9.7 s of 82 s; wall 72 -> 68 s once tuned, the same
figures). :func:`tune_cpu_allocator` fixes the mmap threshold at 32 MiB (glibc's ceiling) and the trim threshold at
1 GiB, as PyTorch's CPU performance guide suggests with jemalloc or tcmalloc. The cost: memory a process freed stays
mapped (its resident size keeps its peak).

The ``distill-mixins`` command calls it at start; a Python training loop may call it once. ``DISTILL_MIXINS_MALLOC=
default``, or the user's own glibc settings of the same thresholds (:data:`USER_VARIABLES`, ``GLIBC_TUNABLES``),
leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "USER_VARIABLES", "tune_cpu_allocator", "user_malloc_settings"]

MMAP_THRESHOLD = 32 * 2**20
"""Bytes: blocks up to this size come from the heap (glibc refuses more than 32 MiB on 64-bit systems)."""
TRIM_THRESHOLD = 2**30
"""Bytes of free heap top kept before glibc returns memory to the system."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_tuned = False


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (has ``mallopt``), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
"""glibc's environment variables for the same settings; any of them set (or ``GLIBC_TUNABLES`` naming one) wins."""


def user_malloc_settings() -> list[str]:
    """The user's own glibc settings of what :func:`tune_cpu_allocator` would set (environment names)."""
    named = [name for name in USER_VARIABLES if name in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return named + [f"GLIBC_TUNABLES ({key})" for key in ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")
                    if f"glibc.malloc.{key}" in tunables]


def tune_cpu_allocator() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True when they are set (now or by an earlier call),
    False when the C library is not glibc or the environment opts out."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("DISTILL_MIXINS_MALLOC", "tuned") == "default":
        return False
    if user_malloc_settings():
        return False  # the user's own glibc settings win
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _tuned = ok
    return ok
