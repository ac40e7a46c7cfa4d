"""The C allocator behind a CPU training process (README, "The allocator is the biggest lever on a CPU").

With glibc's default `malloc`, every allocation above 32 MiB (gradients, logits, activations) is a fresh `mmap` that
is returned to the system when freed, so its pages fault afresh on first touch in every step: a MoE model has many
times the dense model's gradient bytes. The command-line tools make glibc keep freed memory for reuse instead, the
run-time form of `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`.

`peak_resident_growth` measures a call's peak memory on a CPU, where torch keeps no allocator statistics: the growth
of the process's resident set, after glibc has given its free memory back; `malloc_for_measuring` makes that growth
the peak of the live memory.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Callable
from pathlib import Path

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_MMAP_MAX_DEFAULT = 65536
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


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _glibc_malloc() -> ctypes.CDLL | None:
    """glibc, where its `malloc` serves this process (not a preloaded tcmalloc or jemalloc); else None."""
    return _glibc() if allocator_name().startswith(GLIBC) else None


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
    libc = _glibc()
    if libc is None:
        return "left as is: not glibc"
    mallopt = libc.mallopt
    # mallopt(3): M_MMAP_MAX 0 "disables the use of mmap"; M_TRIM_THRESHOLD -1 "disables trimming completely".
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, -1) != 1:
        return f"left as is: mallopt failed ({GLIBC})"
    return REUSING


def malloc_for_measuring() -> bool:
    """Set glibc's `malloc` so that the resident set follows the live memory, for `peak_resident_growth`: every
    allocation of 128 KiB or more is its own `mmap`, unmapped when freed (glibc's default until its threshold adapts
    upwards; `GLIBC_TUNABLES` are overridden), and every thread that starts from now on allocates the rest from the
    main arena, all of whose free memory `malloc_trim` hands back (it trims the tops of other threads' arenas only
    as they free). Slower: for a process that measures memory, before it starts threads. False where glibc is not
    the allocator."""
    libc = _glibc_malloc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    return all(
        mallopt(option, value) == 1
        for option, value in ((_M_MMAP_MAX, _MMAP_MAX_DEFAULT), (_M_MMAP_THRESHOLD, 128 * 1024), (_M_ARENA_MAX, 1))
    )


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (`VmRSS`, `VmHWM`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field} field")


def can_measure_resident_growth() -> bool:
    """Whether `peak_resident_growth` can measure here: glibc's `malloc` and a kernel whose high-water mark a process
    can reset (Linux `/proc/self/clear_refs`)."""
    return _glibc_malloc() is not None and os.access("/proc/self/clear_refs", os.W_OK)


def peak_resident_growth(fn: Callable[[], object]) -> int | None:
    """Bytes by which the process's resident set peaks above its size before `fn()`, or None where it cannot be told
    (not Linux, or an allocator other than glibc's, which keeps freed memory resident that `malloc_trim` cannot hand
    back, so reusing it would not show).

    glibc first returns its free memory (`malloc_trim`) and the kernel's high-water mark is reset
    (`/proc/self/clear_refs`, "5"), so the growth counts every page `fn` touches afresh in any thread: tensors,
    temporaries inside kernels, malloc's own overhead, freed memory malloc keeps. In a process set by
    `malloc_for_measuring` that is the peak of the live memory, to within malloc's small allocations. Otherwise the
    growth also counts freed memory that malloc did not reuse, and misses what threads other than the main one kept
    at the top of their malloc arenas from earlier calls (glibc trims that only as it frees) and `fn` reuses.
    """
    if not can_measure_resident_growth():
        return None
    gc.collect()
    _glibc().malloc_trim(0)  # glibc's malloc serves the process: `can_measure_resident_growth` asked
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
    except OSError:
        return None
    fn()
    return max(_status_bytes("VmHWM") - before, 0)
