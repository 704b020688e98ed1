"""The training workers' memory allocator: tcmalloc where installed, else glibc keeping freed memory.

A training step allocates and frees the same few hundred megabytes of activations every time, from
two threads (the loop's and PyTorch's OpenMP helper), in a Ray worker whose other threads (Ray's,
gRPC's) have arenas of their own. glibc's defaults return large blocks to the kernel as soon as they
are freed, so the next step faults every page in again (375,000 page faults per step of the
squad-minilm preset, 15 % of the machine's CPU in the kernel); told to keep them (``keep_freed_memory``:
blocks up to 256 MB from the heap, trimmed only past 1 GB free) it runs 1.19x faster, but each arena
keeps its own high-water mark: between steps 57-64 % of what the arenas hold is free. gperftools'
tcmalloc (Debian/Ubuntu ``libtcmalloc-minimal4``), preloaded into the workers' processes, keeps freed
memory too but in one heap all threads share: the preset's worker on 8,000 questions peaked at
1,323 MiB instead of 1,817 at 1.09x the windows/s, the same losses (BENCHMARKS.md, "tcmalloc for
the training workers"). jemalloc was as light but 0.76x the speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

ALLOCATORS = ("auto", "tcmalloc", "glibc")
DEFAULT_ALLOCATOR = "auto"  # tcmalloc where installed
TCMALLOC = "tcmalloc_minimal"  # gperftools' allocator without its profilers
TCMALLOC_PACKAGE = "libtcmalloc-minimal4"  # Debian's and Ubuntu's package of it
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 2**20  # blocks up to this size come from the heap and are reused
TRIM_THRESHOLD = 2**30  # free memory at a heap's top is returned to the kernel only past this


def tcmalloc_library() -> str | None:
    """tcmalloc's shared library as the dynamic loader finds it (its soname), None where not installed."""
    return ctypes.util.find_library(TCMALLOC)


def worker_runtime_env(choice: str) -> dict:
    """The Ray runtime environment of training workers for ``--allocator`` ``choice``: tcmalloc
    preloaded for ``auto`` and ``tcmalloc`` where the library is installed, nothing otherwise. Looked
    up where the run is started: a cluster's worker nodes need the same package (cluster/Dockerfile
    installs it), and a worker on a node without it starts on glibc, as ``allocator`` in the run's
    metrics then says. Ray expands ``${LD_PRELOAD}`` from the node's environment as it starts a
    worker, so what the node already preloads stays preloaded, after tcmalloc."""
    library = tcmalloc_library() if choice != "glibc" else None
    return {"env_vars": {"LD_PRELOAD": f"{library}:${{LD_PRELOAD}}"}} if library else {}


def active_allocator() -> str:
    """``tcmalloc`` when this process runs on it (it is mapped), else ``glibc`` (the C library's own)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "tcmalloc" if f"lib{TCMALLOC}" in maps else "glibc"


def set_up_allocator() -> str:
    """In a CPU training worker: on glibc keep freed memory for the next step (``keep_freed_memory``);
    returns the allocator the process runs on, for the run's metrics."""
    allocator = active_allocator()
    if allocator == "glibc":
        keep_freed_memory()
    return allocator


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process (a training worker); False where the C library is not
    glibc (macOS, musl), which then keeps its own allocator's behaviour."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
