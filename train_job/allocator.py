"""Keep freed memory in the process for the next training step instead of handing it back to the kernel.

A training step allocates and frees the same few hundred megabytes of activations every time. glibc's
defaults return large blocks to the kernel as soon as they are freed (blocks over 32 MB are mapped and
unmapped one by one; a heap's free top is trimmed past 2x the last such block), so the next step
faults every page in again, zero-filled by the kernel: in a Ray Train worker, where the loop runs in
a thread of its own with its own malloc arena, about 375,000 page faults per step of the squad-minilm
preset and 15 % of the machine's CPU time in the kernel. Serving blocks up to 256 MB from the heap and
trimming it only past 1 GB free made the preset's steps 1.19x faster (BENCHMARKS.md, "Training near
the machine's limit"); the worker's peak memory is still the step's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 2**20  # blocks up to this size come from the heap and are reused
TRIM_THRESHOLD = 2**30  # free memory at a heap's top is returned to the kernel only past this


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process (a training worker); False where the C library is not
    glibc (macOS, musl), which then keeps its own allocator's behaviour."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
