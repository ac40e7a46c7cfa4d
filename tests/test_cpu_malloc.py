"""`cpu_malloc`: the CPU training process's allocator keeps freed memory (README, "The allocator is the biggest lever
on a CPU"). Each case runs in a fresh interpreter: mallopt settings are per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_moe.cli.cpu_malloc import GLIBC, REUSING

LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
PAGES = (256 << 20) // 4096  # of the 256 MiB tensor below, in 4 KiB pages

# Minor page faults of filling a fresh 256 MiB tensor (then freed), 8 times over, after what argv[1] asks for.
FAULTS = """
import resource, sys, torch
from modeling_moe.cli.cpu_malloc import reuse_freed_memory
print(reuse_freed_memory() if sys.argv[1] == "reuse" else "default")
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*(faults() for _ in range(8)))
"""


def run_faults(mode: str, **env: str) -> tuple[str, list[int]]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    result = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120, env={**clean, **env}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    status, counts = result.stdout.strip().splitlines()
    return status, [int(n) for n in counts.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reused_memory_does_not_fault_again():
    status, default = run_faults("default")
    assert status == "default" and min(default) > PAGES // 2  # every step faults the tensor in afresh
    status, reused = run_faults("reuse")
    assert status == REUSING
    # The heap grows to hold the tensor once or twice (a 64-byte-aligned request does not fit in the first freed
    # chunk alone), then every later one reuses its pages.
    assert sum(count > PAGES // 100 for count in reused) <= 2 and max(reused[-4:]) < PAGES // 100, reused


def test_other_allocators_are_left_as_they_are():
    tunables = "glibc.malloc.mmap_max=0"
    status, _ = run_faults("reuse", GLIBC_TUNABLES=tunables)
    assert status == f"left as is: {GLIBC} (GLIBC_TUNABLES={tunables})"


@pytest.mark.parametrize("library, name", [("libjemalloc.so.2", "jemalloc"), ("libtcmalloc_minimal.so.4", "tcmalloc")])
def test_a_preloaded_allocator_is_named_and_left_as_is(library, name):
    if not (LIBDIR / library).exists():
        pytest.skip(f"needs {LIBDIR / library} (Debian: libjemalloc2 / libgoogle-perftools4)")
    status, _ = run_faults("reuse", LD_PRELOAD=str(LIBDIR / library))
    assert status == f"left as is: {name}"
