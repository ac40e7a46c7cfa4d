"""The C allocator behind a CPU training process (README, "The allocator is the biggest lever on a CPU").

With glibc's default `malloc`, every allocation above 32 MiB (gradients, logits, activations) is a fresh `mmap` that
is returned to the system when freed, so its pages fault afresh on first touch in every step: a MoE model has many
times the dense model's gradient bytes. The command-line tools make glibc keep freed memory for reuse instead, the
run-time form of `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
GLIBC = "glibc malloc"
REUSING = f"{GLIBC} keeps freed memory for reuse (mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)"


def allocator_name() -> str:
    """The malloc this process runs with: a preloaded tcmalloc or jemalloc, glibc's with the `GLIBC_TUNABLES` it was
    started with, or glibc's default."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return "system malloc"
    preloaded = next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), None)
    if preloaded is not None:
        return preloaded
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"{GLIBC} (GLIBC_TUNABLES={tunables})" if tunables else GLIBC


def reuse_freed_memory() -> str:
    """Make glibc's `malloc` serve every allocation from its heap (no `mmap`) and never give freed memory back to the
    system, so that a training step reuses the pages of the previous one. The process keeps its peak memory, as
    PyTorch's CUDA caching allocator does on a GPU. Only where glibc's default serves the process: a preloaded
    tcmalloc or jemalloc, or `GLIBC_TUNABLES` set by the user, are left as they are.

    Returns what it did, for the log.
    """
    name = allocator_name()
    if name != GLIBC:
        return f"left as is: {name}"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return "left as is: not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt(3): M_MMAP_MAX 0 "disables the use of mmap"; M_TRIM_THRESHOLD -1 "disables trimming completely".
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, -1) != 1:
        return f"left as is: mallopt failed ({GLIBC})"
    return REUSING
