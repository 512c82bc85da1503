"""Keeping the CPU worker's resident memory flat across training steps and jobs.

Nothing in the training loop keeps a step's tensors (losses are Python floats, the step's batch
and loss are dropped before the next step, events and CSV rows are written out, not kept), and
a job's model, optimizer and tokenizer are local to it. What remains is the C heap: PyTorch's
CPU allocator takes tensor memory from ``malloc``; every step allocates and frees some hundreds
of megabytes of activations whose sizes change from step to step (length-grouped batches differ
in width), and the worker runs each job in a thread, whose ``malloc`` arena keeps freed chunks
resident until ``malloc_trim`` hands their pages back. :func:`trim` is called every
``TRIM_EVERY_STEPS`` steps by the CPU backend and :func:`release` (a garbage collection for
objects held in reference cycles, then a trim) after every job by the worker.
``bench/trainer_memory.py`` samples a real worker's resident memory over two jobs.
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
