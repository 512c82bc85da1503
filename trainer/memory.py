"""Keeping the CPU worker's resident memory flat across training steps and jobs.

PyTorch's CPU allocator takes tensor memory from the C library's ``malloc``. Every training step
allocates and frees some hundreds of megabytes of activations whose sizes change from step to
step (length-grouped batches have different widths), and a worker runs each job in a thread,
whose ``malloc`` arena glibc grows in the middle rather than at the top. Freed chunks inside an
arena stay resident until ``malloc_trim`` hands their pages back, so resident memory climbs with
the number of distinct shapes seen (3.2 -> 8.8 GiB over one 678-step job) though nothing leaks
in Python. :func:`release` (a garbage collection, for peft's reference cycles between jobs, and
``malloc_trim(0)``) is called every few steps and after every job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from functools import cache

TRIM_EVERY_STEPS = 8  # malloc_trim costs a few ms; a step on CPU takes about a second


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 (glibc only: musl and macOS have none)
    except (OSError, AttributeError):
        return None
    return lib


def trim() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


def release() -> None:
    """After a job: drop unreachable objects (models held in cycles), then trim."""
    gc.collect()
    trim()


def rss_bytes() -> int:
    """Resident memory of this process, bytes (Linux: /proc; elsewhere 0)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
